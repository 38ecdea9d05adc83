"""COCO AP and time of each test-time augmentation (`--tta`) against none, on a trained model's val split.

    python benchmarks/tta.py                                     # runs/shapes12/best.pth on the shapes val split
    python benchmarks/tta.py --weights runs/bench-shapes/full/best.pth --tta none flip

The weights are the README's 12-epoch shapes recipe's best.pth (docs/training.md: `--output runs/shapes12`,
or `benchmarks/train_shapes.py --recipe full` -> runs/bench-shapes/full/). Each setting evaluates the whole
val split through `eval.evaluator.evaluate`, the loop of `-mode eval` (official soft-NMS path, fp32, torch
backend), with a `Detector(tta=...)` built for it and warmed up on one batch first. Printed: the CPU, the date
and a table of AP, AP@0.5, AP@0.75, APs/m/l, seconds, ms per image and the time relative to no TTA.

Its table lives in docs/tta.md (Measured).
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import torch  # noqa: E402

from data.coco import CocoDetection  # noqa: E402
from eval.evaluator import Detector, evaluate  # noqa: E402
from eval.tta import TTA_CHOICES  # noqa: E402
from model.cpu import describe  # noqa: E402
from utils.cli import SHAPES_ROOT  # noqa: E402
from utils.image_size import resolve_image_size  # noqa: E402
from utils.weights import detector_from_weights  # noqa: E402


def val_split(data: str) -> tuple[Path, Path]:
    """(annotation json, image folder) of the val split of `data`: 'shapes' (generated if missing) or a
    COCO-format folder."""
    if data == "shapes":
        from data.shapes import make_shapes_dataset
        root = make_shapes_dataset(SHAPES_ROOT)
    else:
        root = Path(data)
    return root / "annotations" / "instances_val2017.json", root / "val2017"


def trained_model_and_val(weights: str, data: str):
    """(eval-mode model, weight info, image size (H, W), val `CocoDetection`) of a weight file written by training
    and the val split of `data`; exits with a one-line message when the file is missing."""
    weights = Path(weights)
    if not weights.is_file():
        sys.exit(f"--weights {weights}: not found; train it first (docs/training.md, the 12-epoch recipe)")
    model, info = detector_from_weights(weights, None, "--weights")
    model.eval()
    size = resolve_image_size(model.config, info["image_size"])
    ann, images = val_split(data)
    dataset = CocoDetection(ann, images, train=False, image_size=size, mean_rgb=model.config.mean_rgb,
                            stddev_rgb=model.config.stddev_rgb)
    return model, info, size, dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="runs/shapes12/best.pth", help="a .pth written by training")
    parser.add_argument("--data", default="shapes", help="'shapes' or a COCO-format dataset folder")
    parser.add_argument("--tta", nargs="+", choices=["none", *TTA_CHOICES], default=["none", *TTA_CHOICES])
    parser.add_argument("--nms", choices=["soft", "hard"], default="soft")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-images", type=int, default=None, help="only the first K val images (default: all)")
    args = parser.parse_args()

    weights = Path(args.weights)
    model, info, size, dataset = trained_model_and_val(args.weights, args.data)
    ann = dataset.ann_file
    count = min(args.max_images or len(dataset), len(dataset))
    device = torch.device("cpu")
    rows = []
    for name in args.tta:
        detector = Detector(model, size, "eval", args.nms, tta=None if name == "none" else name)
        sizes = [(p.size, p.flip) for p in detector.tta.passes] if detector.tta else [(detector.image_size, False)]
        passes = [f"{h if h == w else f'{h}x{w}'}{' flip' if flip else ''}" for (h, w), flip in sizes]
        evaluate(detector, dataset, args.batch_size, args.workers, device, args.batch_size, progress=False)  # warm-up
        start = time.perf_counter()
        stats, _, run = evaluate(detector, dataset, args.batch_size, args.workers, device, args.max_images)
        seconds = time.perf_counter() - start
        rows.append((name, passes, stats, seconds))
        print(f"{name}: AP {stats['AP']:.4f}, AP@0.5 {stats['AP50']:.4f} in {seconds:.1f} s ({run['images']} images)",
              flush=True)

    base = next((s for n, _, _, s in rows if n == "none"), None)
    print(f"\n{describe()}, {datetime.date.today().isoformat()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{weights} ({info['model_name']}, {size[0]}x{size[1]} HxW), {ann}: {count} images, "
          f"{args.nms} NMS, batch {args.batch_size}")
    print("| TTA | passes (px, HxW) | AP | AP@0.5 | AP@0.75 | APs | APm | APl | time | ms / image | x time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, passes, stats, seconds in rows:
        ratio = f"{seconds / base:.2f}" if base else "-"
        print(f"| {name} | {', '.join(passes)} | {stats['AP']:.3f} | {stats['AP50']:.3f} | {stats['AP75']:.3f} | "
              f"{stats['APs']:.3f} | {stats['APm']:.3f} | {stats['APl']:.3f} | {seconds:.1f} s | "
              f"{1000 * seconds / count:.0f} | {ratio} |")
    print("(this table belongs in docs/tta.md, section Measured)")


if __name__ == "__main__":
    main()
