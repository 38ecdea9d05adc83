"""Flags of `python main.py -mode train|trainval` (official recipe by default)."""
from __future__ import annotations

import argparse
import sys

from data.autoaugment import AUTOAUGMENT_CHOICES
from train.freeze import FREEZE_PARTS
from utils.cli import add_data_args, add_model_args, add_runtime_args, number


class _JitterRange(argparse.Action):
    """--jitter MIN MAX: two finite numbers with 0 < MIN <= MAX."""

    def __call__(self, parser, namespace, values, option_string=None):
        low, high = values
        if low > high:
            parser.error(f"argument {option_string}: expected MIN <= MAX, got {low:g} {high:g}")
        setattr(namespace, self.dest, tuple(values))


def add_train_args(parser: argparse.ArgumentParser, validate: bool) -> None:
    add_model_args(parser)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--pretrained", action="store_true",
                       help="start from the official COCO weights (weights/<model>.pth); a different number of "
                            "classes keeps everything but the class-prediction layer")
    group.add_argument("--weights", metavar="FILE", help="start from these weights (same rule for the classes)")
    group.add_argument("--backbone-weights", metavar="FILE",
                       help="start the backbone from an EfficientNet .pth (python -m utils.port_tf --backbone-only)")
    parser.add_argument("--download", action="store_true", help="with --pretrained: fetch the checkpoint if missing")
    add_data_args(parser, ("train", "val") if validate else ("train",))
    add_runtime_args(parser, batch_size=8)
    parser.add_argument("--epochs", type=number(float, 0, low_open=True), default=300,
                        help="epochs (official 300; 600 for D7/D7x; fractions allowed)")
    parser.add_argument("--lr", type=number(float, 0, low_open=True), default=None,
                        help="base learning rate (default 0.08 * global batch / 64)")
    parser.add_argument("--warmup-epochs", type=number(float, 0), default=1.0, help="linear warm-up from lr/10")
    parser.add_argument("--weight-decay", type=number(float, 0), default=4e-5, help="L2 on conv/dense weights only")
    parser.add_argument("--clip-norm", type=number(float, 0), default=10.0, help="gradient clipping norm (0: off)")
    parser.add_argument("--ema-decay", type=number(float, 0, 1, high_open=True), default=0.9998,
                        help="EMA decay of weights and BN statistics")
    parser.add_argument("--label-smoothing", type=number(float, 0, 1, high_open=True), default=0.0,
                        help="focal-loss label smoothing")
    parser.add_argument("--jitter", type=number(float, 0, low_open=True), nargs=2, default=(0.1, 2.0),
                        metavar=("MIN", "MAX"), action=_JitterRange, help="random scale range of the image size")
    parser.add_argument("--autoaugment", choices=AUTOAUGMENT_CHOICES, default=None,
                        help="box-aware AutoAugment policy (v0-v3, test) or randaug (RandAugment, 1 layer, "
                             "magnitude 15), before flip and scale jitter as official (default: off)")
    parser.add_argument("--assigner", choices=["iou", "atss"], default="iou",
                        help="anchor assignment: iou (official ArgMax matcher, 0.5) or atss")
    parser.add_argument("--amp", action="store_true", help="mixed precision: bf16 on CPU, fp16 + GradScaler on CUDA")
    parser.add_argument("--nchw", action="store_true",
                        help="train in NCHW memory layout (default on CPU: channels_last, which is faster there)")
    parser.add_argument("--sync-bn", action="store_true", help="synchronised BatchNorm across processes")
    parser.add_argument("--seed", type=number(int, 0, 2**63 - 1), default=0,
                        help="seed of initialisation, data order and augmentation")
    parser.add_argument("--output", default=None, help="run folder for last.pth, best.pth, metrics.jsonl "
                                                       "(default runs/<model>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its last.pth")
    parser.add_argument("--save-every", type=number(int, 1), default=500, help="also save last.pth every N steps")
    parser.add_argument("--log-every", type=number(int, 1), default=20,
                        help="write a metrics.jsonl line every N steps")
    parser.add_argument("--freeze", choices=list(FREEZE_PARTS), default=None,
                        help="fine-tuning: train the heads only (backbone) or the heads and the BiFPN "
                             "(backbone+fpn); frozen parts keep their weights and BN statistics")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard event files to OUTPUT/tensorboard (needs the tensorboard "
                             "package, not a dependency)")
    if validate:
        parser.add_argument("--eval-every", type=number(int, 1), default=1,
                            help="evaluate the EMA weights every N epochs")
        parser.add_argument("--val-nms", choices=["soft", "hard"], default="soft",
                            help="NMS of the per-epoch evaluation (soft: the official evaluation path)")
        parser.add_argument("--val-max-images", type=number(int, 1), default=None,
                            help="evaluate on the first K val images")
        parser.add_argument("--keep", type=number(int, 0), default=0, metavar="N",
                            help="also keep the N best checkpoints by val AP, best-epoch{E}-ap{AP}.pth")


def add_trainval_args(parser: argparse.ArgumentParser) -> None:
    add_train_args(parser, validate=True)


def add_train_only_args(parser: argparse.ArgumentParser) -> None:
    add_train_args(parser, validate=False)


def run_train(args: argparse.Namespace) -> dict:
    """Train; a run stopped by SIGINT / SIGTERM (last.pth saved) says so in one line and exits 130 / 143."""
    from train.interrupt import Interrupted
    from train.trainer import Trainer  # heavy imports only when training
    try:
        return Trainer(args).fit()
    except Interrupted as e:
        if e.speak:
            print(e, file=sys.stderr)
        raise SystemExit(e.exit_code) from None
