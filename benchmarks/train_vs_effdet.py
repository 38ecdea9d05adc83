"""Train this project's EfficientDet-D0 and effdet's `tf_efficientdet_d0` from scratch side by side on the shapes
dataset, and compare their COCO AP at equal numbers of training images seen.

    pip install -r benchmarks/requirements.txt     # effdet 0.4.1, the peer (benchmark-only dependency)
    python benchmarks/train_vs_effdet.py            # 12 epochs of the 2000-image split, eval at 4k 8k 16k 24k
    python benchmarks/train_vs_effdet.py --nms hard      # docs/training.md's table (both sides per-class hard NMS)

What is compared: the two implementations (network, anchors, target assignment, loss), everything else equal.
* Same data: one DataLoader of the shapes train split with `TrainTransform` (the README's quick start: 256 px,
  batch 8, jitter 0.5-1.5, flip), in the trainer's seeded per-epoch order; every batch goes to both models.
* Ours: `build_model`, `TargetAssigner` (official ArgMax matcher), `detection_loss`, as `train/trainer.py`.
  effdet: `create_model(..., bench_task="train", bench_labeler=True, pretrained_backbone=False)`, i.e. its
  `DetBenchTrain`: its model, anchors, `AnchorLabeler` and `DetectionLoss`.
* Same optimisation for both: `build_optimizer` (SGD momentum 0.9, official L2 4e-5 on conv/dense weights,
  per-tensor-then-global clipping at 10; effdet's fusion weights are also `edge_weights`, clipped per
  element), the trainer's warm-up + cosine schedule over `--epochs`, `ModelEMA` (0.9998, official warm-up),
  channels_last on CPU as the trainer, fp32, `main.py`'s training allocator setting (`utils/allocator.py`).
  Each side's steps are timed separately (they alternate, the order swapped every step, in one process, so a
  noisy neighbour hits both alike).
* Evaluation of both EMA copies at `--eval-at` images seen on the same val images with the same pycocotools
  code (`eval.evaluator.evaluate`): ours through `Detector` (the official evaluation path, per-class soft-NMS,
  as `-mode eval`); effdet through its own decoding (`_post_process` + `generate_detections`: its anchors, its
  gaussian soft-NMS), its boxes scaled back by the same letterbox `image_scale`. `--nms hard`: both sides
  per-class hard NMS (IoU 0.5) instead.
* Converted conventions (`benchmarks/effdet_adapter.py`): effdet's targets take the same yxyx network-input
  pixel boxes, classes 1-based (it subtracts 1), padding rows cls -1; its detections come back xyxy with
  1-based classes. Checked on the first batch before training: effdet's positive anchors must coincide with
  ours (IoU of the positive sets >= 0.7; its aspect ratios are rounded to 1.4 / 0.7) with the same classes;
  `first_batch.png` shows the boxes effdet receives drawn on the images.

Writes OUTPUT/results.json (the table, losses per step, the conversion check), OUTPUT/curves.png (AP@0.5 and
loss of both against images seen) and OUTPUT/first_batch.png; prints the table as markdown.

Its table and curves live in docs/training.md (Side by side with effdet).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.coco import CocoDetection, collate_detection  # noqa: E402
from data.shapes import make_shapes_dataset  # noqa: E402
from data.transforms import TrainTransform  # noqa: E402
from eval.evaluator import Detector, evaluate  # noqa: E402
from model import AnchorGenerator, build_model, get_config  # noqa: E402
from train.assign import TargetAssigner  # noqa: E402
from train.ema import ModelEMA  # noqa: E402
from train.loss import detection_loss  # noqa: E402
from train.optim import CosineLrSchedule, build_optimizer, run_warmup_epochs  # noqa: E402
from train.trainer import epoch_order  # noqa: E402
from utils.allocator import reuse_freed_memory  # noqa: E402
from data.atomic import atomic_open, check_writable_dir, write_json  # noqa: E402
from utils.cli import SHAPES_ROOT, number  # noqa: E402
from model.cpu import describe  # noqa: E402

from effdet_adapter import EffdetDetector, check_target_conversion, create_effdet_train, effdet_target  # noqa: E402

MODEL, PEER_VARIANT = "efficientdet-d0", "d0"
SIDES = ("ours", "effdet")
LOSS_WINDOW = 25  # steps of the moving average of the loss drawn in curves.png (at most)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=number(int, 128), default=256,
                        help="square input side, a multiple of 128")
    parser.add_argument("--batch-size", type=number(int, 1), default=8)
    parser.add_argument("--epochs", type=number(float, 0, low_open=True), default=12,
                        help="schedule length in epochs of the 2000-image train split")
    parser.add_argument("--lr", type=number(float, 0, low_open=True), default=0.08)
    parser.add_argument("--warmup-epochs", type=number(float, 0), default=1.0,
                        help="linear warm-up (shortened to a tenth of the run, as the trainer does)")
    parser.add_argument("--jitter", type=number(float, 0, low_open=True), nargs=2, default=(0.5, 1.5),
                        metavar=("MIN", "MAX"))
    parser.add_argument("--eval-at", type=number(int, 1), nargs="+", default=[4000, 8000, 16000, 24000],
                        metavar="IMAGES", help="evaluate both EMA models after this many training images")
    parser.add_argument("--stop-after", type=number(int, 1), default=None, metavar="IMAGES",
                        help="stop after this many images (a prefix of the same schedule)")
    parser.add_argument("--val-max-images", type=number(int, 1), default=None,
                        help="evaluate on the first K val images (default: all 200)")
    parser.add_argument("--nms", choices=["soft", "hard"], default="soft",
                        help="NMS of both evaluations: soft (ours the official per-class gaussian, effdet its own; "
                             "effdet's is a Python loop, seconds per image early on) or hard (per class, IoU 0.5)")
    parser.add_argument("--workers", type=number(int, 0), default=2, help="DataLoader worker processes")
    parser.add_argument("--seed", type=number(int, 0), default=0)
    parser.add_argument("--output", default="runs/train-vs-effdet")
    args = parser.parse_args(argv)
    if args.image_size % 128:
        parser.error(f"argument --image-size: expected a multiple of 128 (D0's largest stride, where both "
                     f"implementations build the same anchor grid), got {args.image_size}")
    if args.jitter[0] > args.jitter[1]:
        parser.error(f"argument --jitter: expected MIN <= MAX, got {args.jitter[0]:g} {args.jitter[1]:g}")
    return args


class Side:
    """One implementation under training: model, loss, optimiser, schedule, EMA, timing and loss records.

    `loss_fn(images [B, 3, S, S] channels_last, gt_boxes [B, M, 4] yxyx px, gt_classes [B, M] 0-based / -1)`
    returns the scalar loss; `net` is the network the optimiser and the EMA see.
    """

    def __init__(self, name: str, net: nn.Module, loss_fn, lr: float, schedule: CosineLrSchedule):
        self.name, self.net, self.loss_fn = name, net, loss_fn
        self.optimizer = build_optimizer(net, lr)  # official L2 4e-5, clip 10, momentum 0.9
        self.scheduler = schedule.scheduler(self.optimizer)
        self.ema = ModelEMA(net, 0.9998)
        self.seconds, self.images, self.non_finite = 0.0, 0, 0
        self.losses: list[float] = []

    def step(self, images: torch.Tensor, gt_boxes: torch.Tensor, gt_classes: torch.Tensor) -> float:
        """One timed optimisation step, as `Trainer.train_step` (a non-finite loss skips the update only, so
        the two schedules stay in step). The first step is not timed: it sets up the kernels (oneDNN
        primitives) for the shapes, seconds under load, a one-off cost of either side's first batch."""
        start = time.perf_counter()
        loss = self.loss_fn(images.contiguous(memory_format=torch.channels_last), gt_boxes, gt_classes)
        value = float(loss.detach())
        if math.isfinite(value):
            loss.backward()
            self.optimizer.step()
        else:
            self.non_finite += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.ema.update(self.net)
        if self.losses:
            self.seconds += time.perf_counter() - start
            self.images += len(images)
        self.losses.append(value)
        return value


def build_sides(args, num_classes: int, schedule: CosineLrSchedule, lr: float) -> tuple[dict, TargetAssigner, dict]:
    """Both sides, from the same seed, in the trainer's memory layout (channels_last on CPU)."""
    size = (args.image_size, args.image_size)
    torch.manual_seed(args.seed)
    ours = build_model(MODEL, num_classes=num_classes).to(memory_format=torch.channels_last).train()
    generator = AnchorGenerator.from_config(ours.config)
    assigner = TargetAssigner.from_generator(generator, size, torch.device("cpu"))

    def our_loss(images, gt_boxes, gt_classes):
        targets = assigner(gt_boxes, gt_classes)
        cls_outs, box_outs = ours(images)
        return detection_loss(cls_outs, box_outs, targets.cls_targets, targets.box_targets,
                              targets.num_positives)["loss"]

    torch.manual_seed(args.seed)
    bench = create_effdet_train(PEER_VARIANT, num_classes, size).to(memory_format=torch.channels_last).train()

    def effdet_loss(images, gt_boxes, gt_classes):
        return bench(images, effdet_target(gt_boxes, gt_classes))["loss"]

    sides = {"ours": Side("ours", ours, our_loss, lr, schedule),
             "effdet": Side("effdet", bench.model, effdet_loss, lr, schedule)}
    return sides, assigner, {"bench": bench, "anchors": generator(size)}


def epoch_loader(train_set: CocoDetection, epoch: int, steps_per_epoch: int, args) -> DataLoader:
    """The trainer's batches of `epoch` (single process): seeded permutation, per-epoch augmentation draws."""
    order = epoch_order(len(train_set), args.seed, epoch, steps_per_epoch * args.batch_size)
    train_set.set_epoch(epoch)
    return DataLoader(Subset(train_set, order.tolist()), batch_size=args.batch_size, num_workers=args.workers,
                      collate_fn=collate_detection, drop_last=True,
                      generator=torch.Generator().manual_seed(args.seed))


def draw_first_batch(images: torch.Tensor, target: dict, mean_rgb, stddev_rgb, path: Path, count: int = 4) -> None:
    """The first `count` images with the boxes effdet receives (`target["bbox"]` yxyx, 1-based `cls` written)."""
    mean, std = torch.tensor(mean_rgb).view(3, 1, 1), torch.tensor(stddev_rgb).view(3, 1, 1)
    tiles = []
    for image, boxes, classes in list(zip(images, target["bbox"], target["cls"]))[:count]:
        tile = Image.fromarray((image * std + mean).clamp(0, 255).byte().permute(1, 2, 0).numpy())
        draw = ImageDraw.Draw(tile)
        for (y0, x0, y1, x1), cls in zip(boxes.tolist(), classes.tolist()):
            if cls > 0:
                draw.rectangle([x0, y0, x1, y1], outline=(255, 0, 0))
                draw.text((x0 + 1, y0 + 1), str(int(cls)), fill=(255, 0, 0))
        tiles.append(tile)
    sheet = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (i * tiles[0].width, 0))
    with atomic_open(path, "wb") as f:
        sheet.save(f, format="PNG")


def evaluate_both(sides: dict, val_set: CocoDetection, args) -> dict:
    """COCO stats of both EMA models on the same val images with the same pycocotools code."""
    size = (args.image_size, args.image_size)
    detectors = {"ours": Detector(sides["ours"].ema.module, size, "eval", args.nms),
                 "effdet": EffdetDetector(sides["effdet"].ema.module, soft_nms=args.nms == "soft")}
    stats = {}
    for name, detector in detectors.items():
        stats[name], _, run = evaluate(detector, val_set, args.batch_size, args.workers, torch.device("cpu"),
                                       args.val_max_images)
        stats[name]["eval_seconds"] = round(run["seconds"], 1)
    return stats


def draw_curves(rows: list[dict], sides: dict, batch_size: int, path: Path) -> None:
    """AP@0.5 (and AP, dashed) at the evaluations, and the moving-average loss, of both sides."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(figure)
    ap_axes, loss_axes = figure.subplots(1, 2)
    for name, colour in zip(SIDES, ("tab:blue", "tab:orange")):
        seen = [r["images"] for r in rows]
        ap_axes.plot(seen, [r[f"{name}_AP50"] for r in rows], "o-", color=colour, label=f"{name} AP@0.5")
        ap_axes.plot(seen, [r[f"{name}_AP"] for r in rows], "s--", color=colour, label=f"{name} AP")
        losses = np.asarray(sides[name].losses)
        window = max(1, min(LOSS_WINDOW, len(losses) // 5))  # short runs still draw a line
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        loss_axes.plot((np.arange(len(smooth)) + window) * batch_size, smooth, color=colour, label=name)
    ap_axes.set(xlabel="training images seen", ylabel="val AP", title="EMA weights, val split")
    loss_axes.set(xlabel="training images seen", ylabel="loss (moving average)", yscale="log",
                  title="training loss (cls + 50 x box)")
    for axes in (ap_axes, loss_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    with atomic_open(path, "wb") as f:
        figure.savefig(f, format="png", dpi=100)


def _rate(images: int, seconds: float) -> float:
    """Images per second; NaN when no timed step was made (an evaluation right after the untimed first one)."""
    return images / seconds if seconds > 0 else float("nan")


def markdown_table(rows: list[dict], nms: str) -> str:
    ours = "official per-class soft-NMS" if nms == "soft" else "per-class hard NMS (IoU 0.5)"
    lines = [f"ours: {ours}; effdet: its own {nms}-NMS (effdet 0.4.1 generate_detections); AP on the same val "
             f"images, EMA weights",
             "| images seen | ours AP | ours AP@0.5 | effdet AP | effdet AP@0.5 | ours train img/s "
             "| effdet train img/s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['images']} | {r['ours_AP']:.3f} | {r['ours_AP50']:.3f} | {r['effdet_AP']:.3f} | "
              f"{r['effdet_AP50']:.3f} | {r['ours_img_per_s']:.2f} | {r['effdet_img_per_s']:.2f} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        import effdet  # noqa: F401
    except ImportError:
        raise SystemExit("effdet is not installed: `pip install -r benchmarks/requirements.txt` (effdet==0.4.1, "
                         "the peer of this benchmark)") from None
    output = check_writable_dir(args.output)
    # Both sides share this process, so both train with main.py's training allocator setting.
    reuse_freed_memory(training=True)
    config = get_config(MODEL)
    normalization = {"mean_rgb": config.mean_rgb, "stddev_rgb": config.stddev_rgb}
    size = (args.image_size, args.image_size)
    root = make_shapes_dataset(SHAPES_ROOT)
    train_set = CocoDetection.from_root(root, "train", image_size=size, seed=args.seed,
                                        transform=TrainTransform(size, *args.jitter, **normalization))
    val_set = CocoDetection.from_root(root, "val", image_size=size, **normalization)

    steps_per_epoch = len(train_set) // args.batch_size
    total_steps = int(args.epochs * steps_per_epoch)
    warmup = run_warmup_epochs(args.warmup_epochs, args.epochs)  # as the trainer
    if total_steps <= int(warmup * steps_per_epoch):
        raise SystemExit(f"--epochs {args.epochs:g}: {total_steps} steps of {args.batch_size} images, too short")
    stop_step = (total_steps if args.stop_after is None
                 else min(total_steps, math.ceil(args.stop_after / args.batch_size)))
    too_late = [n for n in args.eval_at if math.ceil(n / args.batch_size) > total_steps]
    if too_late:
        raise SystemExit(f"--eval-at {too_late[0]}: beyond the schedule's {total_steps * args.batch_size} images "
                         f"(--epochs {args.epochs:g} x {steps_per_epoch * args.batch_size})")
    eval_steps = sorted(s for s in {math.ceil(n / args.batch_size) for n in args.eval_at} if s <= stop_step)
    if not eval_steps:
        raise SystemExit(f"--stop-after {args.stop_after}: stops before the first --eval-at point {min(args.eval_at)}")

    lr = args.lr
    schedule = CosineLrSchedule(lr, int(warmup * steps_per_epoch), total_steps)
    sides, assigner, peer = build_sides(args, train_set.num_classes, schedule, lr)
    val_count = min(args.val_max_images or len(val_set), len(val_set))
    print(f"{describe()}\ntraining {MODEL} (ours) and effdet tf_efficientdet_{PEER_VARIANT} from scratch on "
          f"{len(train_set)} shapes images at {args.image_size} px: {stop_step} of {total_steps} steps of "
          f"{args.batch_size}, lr {lr:g}, warm-up {int(warmup * steps_per_epoch)} steps; evaluations at "
          f"{[s * args.batch_size for s in eval_steps]} images on {val_count} "
          f"val images -> {output}", flush=True)

    rows, check, step = [], None, 0
    last_seconds = {name: 0.0 for name in SIDES}
    last_images = {name: 0 for name in SIDES}
    bar = tqdm(total=stop_step * args.batch_size, unit="img", dynamic_ncols=True)
    for epoch in range(math.ceil(stop_step / steps_per_epoch)):
        for images, t in epoch_loader(train_set, epoch, steps_per_epoch, args):
            if check is None:  # before any update: the conversion to effdet's conventions
                check = check_target_conversion(peer["bench"], assigner(t["gt_boxes"], t["gt_classes"]).cls_targets,
                                                peer["anchors"], t["gt_boxes"], t["gt_classes"])
                draw_first_batch(images, effdet_target(t["gt_boxes"], t["gt_classes"]), config.mean_rgb,
                                 config.stddev_rgb, output / "first_batch.png")
                tqdm.write(f"target conversion checked on the first batch: {check}")
            order = SIDES if step % 2 == 0 else SIDES[::-1]
            for name in order:
                sides[name].step(images, t["gt_boxes"], t["gt_classes"])
            step += 1
            bar.update(len(images))
            bar.set_postfix({f"{n}_loss": f"{sides[n].losses[-1]:.3f}" for n in SIDES}
                            | {f"{n}_img_s": f"{sides[n].images / max(sides[n].seconds, 1e-9):.2f}" for n in SIDES})
            if step in eval_steps:
                rates = {n: _rate(sides[n].images - last_images[n], sides[n].seconds - last_seconds[n]) for n in SIDES}
                last_images = {n: sides[n].images for n in SIDES}
                last_seconds = {n: sides[n].seconds for n in SIDES}
                stats = evaluate_both(sides, val_set, args)
                row = {"images": step * args.batch_size, "step": step}
                for n in SIDES:
                    row |= {f"{n}_AP": stats[n]["AP"], f"{n}_AP50": stats[n]["AP50"],
                            f"{n}_img_per_s": round(rates[n], 3), f"{n}_loss": sides[n].losses[-1],
                            f"{n}_eval_seconds": stats[n]["eval_seconds"], f"{n}_stats": stats[n]}
                rows.append(row)
                tqdm.write(f"{row['images']} images: ours AP {row['ours_AP']:.4f} AP@0.5 {row['ours_AP50']:.4f} | "
                           f"effdet AP {row['effdet_AP']:.4f} AP@0.5 {row['effdet_AP50']:.4f} (evaluation: ours "
                           f"{row['ours_eval_seconds']:.0f} s, effdet {row['effdet_eval_seconds']:.0f} s)")
                draw_curves(rows, sides, args.batch_size, output / "curves.png")
            if step == stop_step:
                break
    bar.close()

    table = markdown_table(rows, args.nms)
    print(f"\n{describe()}\n{table}")
    command = ["python", "benchmarks/train_vs_effdet.py", *(sys.argv[1:] if argv is None else argv)]
    write_json({"command": " ".join(command),
                "cpu": describe(), "args": vars(args), "steps": step, "total_steps": total_steps,
                "nms": args.nms,
                "conversion_check": check, "rows": rows, "table": table,
                "non_finite_steps": {n: sides[n].non_finite for n in SIDES},
                "train_img_per_s_overall": {n: _rate(sides[n].images, sides[n].seconds) for n in SIDES},
                "loss_per_step": {n: sides[n].losses for n in SIDES}},
               output / "results.json", indent=1)
    print(f"wrote {output}/results.json, curves.png, first_batch.png")


if __name__ == "__main__":
    main()
