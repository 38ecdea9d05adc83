"""A small custom dataset, as a user brings one: train from scratch, evaluate every epoch, print the curve.

    python benchmarks/train_small_dataset.py                      # 30 epochs, the default lr (0.01 at batch 8)
    python benchmarks/train_small_dataset.py --epochs 12 -- --lr 0.04 --jitter 0.5 1.5   # after --: main.py flags

Dataset: a variant of the built-in shapes generator (`data/shapes.py`): 400 train / 100 val images with
sides 160-480 px (non-square), 4 classes, 10 % of the images without objects; its COCO jsons are rewritten
as a user's would look: non-contiguous category ids (3, 7, 12, 20) and 5 % of the annotations marked
`iscrowd` (dropped in training as official, ignored by the evaluation). The run is
`main.py -mode trainval --image-size 256 --batch-size 8 --epochs 30 --val-nms hard` with these files; the table
lists the EMA weights' val AP per epoch with the mean training loss, and the run folder has `curves.png`.

Overfitting check: the run keeps every epoch's EMA checkpoint (`--keep`), and every `--check-every` epochs
that checkpoint is also evaluated on the first 100 training images (no augmentation, hard NMS, as the val
evaluations): a val AP that falls while the train AP keeps rising is memorisation of the 400 images; both
falling is the optimisation (rate, EMA, BN statistics).

Its table lives in docs/training.md (A small dataset).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.train_runs import eval_rows, median_rate, print_eval_table, read_json, run_main  # noqa: E402
from data.shapes import make_shapes_dataset  # noqa: E402
from train.curves import read_metrics  # noqa: E402
from train.keep_best import kept_checkpoints  # noqa: E402
from model.cpu import describe  # noqa: E402

CATEGORY_IDS = (3, 7, 12, 20)  # a user's ids: not 1..K
CROWD_FRACTION = 0.05


def user_style_annotations(source: Path, target: Path, seed: int = 0) -> None:
    """Rewrite a shapes json with non-contiguous category ids and a share of crowd annotations."""
    data = json.loads(source.read_text())
    remap = {c["id"]: new for c, new in zip(data["categories"], CATEGORY_IDS)}
    for category in data["categories"]:
        category["id"] = remap[category["id"]]
    rng = np.random.default_rng(seed)
    for ann in data["annotations"]:
        ann["category_id"] = remap[ann["category_id"]]
        ann["iscrowd"] = int(rng.random() < CROWD_FRACTION)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="data/shapes-small", help="where the images are generated (cached)")
    parser.add_argument("--epochs", type=float, default=30)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", default="runs/bench-small", help="run folder (replaced)")
    parser.add_argument("--check-every", type=int, default=3, help="evaluate every N-th epoch on training images")
    parser.add_argument("extra", nargs="*", help="more main.py flags, after --")
    args = parser.parse_args()
    root = make_shapes_dataset(REPO / args.root, num_train=400, num_val=100, image_size=(160, 480), seed=11,
                               num_classes=len(CATEGORY_IDS), empty_fraction=0.1)
    output = REPO / args.output
    shutil.rmtree(output, ignore_errors=True)
    annotations = output.parent / f"{output.name}-annotations"  # beside the run folder, which main.py creates
    for split in ("train", "val"):
        user_style_annotations(root / "annotations" / f"instances_{split}2017.json",
                               annotations / f"{split}.json", seed={"train": 1, "val": 2}[split])
    seconds = run_main(["-mode", "trainval", "-model", "efficientdet-d0",
                        "--train-ann", str(annotations / "train.json"), "--train-images", str(root / "train2017"),
                        "--val-ann", str(annotations / "val.json"), "--val-images", str(root / "val2017"),
                        "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                        "--epochs", str(args.epochs), "--output", str(output), "--val-nms", "hard",
                        "--keep", str(math.ceil(args.epochs)), *args.extra])
    rows = eval_rows(output)
    train_ap = {}
    for kept in sorted(kept_checkpoints(output), key=lambda k: k.epoch):
        if kept.epoch % args.check_every == 0 or kept.epoch == rows[-1]["epoch"]:
            folder = output / "train-check" / f"epoch{kept.epoch}"
            run_main(["-mode", "eval", "--weights", str(kept.path), "--val-ann", str(annotations / "train.json"),
                      "--val-images", str(root / "train2017"), "--max-images", "100", "--nms", "hard",
                      "--output", str(folder)])
            train_ap[kept.epoch] = read_json(folder / "metrics_val.json")["stats"]["AP50"]
    print(f"\n{describe()}")
    rate = median_rate(read_metrics(output / "metrics.jsonl"))
    print(f"small dataset, {args.epochs:g} epochs in {seconds / 60:.1f} min, median {rate:.1f} img/s; "
          f"curve: {output / 'curves.png'}")
    print_eval_table(rows)
    print("\n| epoch | val AP@0.5 | train AP@0.5 (first 100 training images) |\n|---|---|---|")
    for r in rows:
        if r["epoch"] in train_ap:
            print(f"| {r['epoch']} | {r['AP50']:.3f} | {train_ap[r['epoch']]:.3f} |")


if __name__ == "__main__":
    main()
