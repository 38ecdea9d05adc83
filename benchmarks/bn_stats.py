"""A/B: what the exact batch statistics of channels_last training (model/layers.py) cost the trainer's step.

    python benchmarks/bn_stats.py                 # D0, 512 px, batch 4, fp32 and bf16 AMP, 9 timed pairs
    python benchmarks/bn_stats.py --runs 15 --precisions fp32

The step is the trainer's own (`train.step.TrainStep.from_flags`, default flags; `--amp` for bf16): anchor
assignment, forward (channels_last, as the trainer on CPU), `detection_loss`, backward, `EfficientDetSGD` step,
schedule, EMA; random D0 weights, a random batch and random boxes, as the README's speed rows (D0 train
batch 4, fp32 and bf16). Both variants run in this one process on the same step object, alternating which
goes first in each pair: "native" with PyTorch's channels_last BN statistics (the exact path switched off),
"exact" as the trainer runs. Allocator as `main.py` trains (`utils.allocator`, training setting), threads as
benchmarks/speed.py (2). The table gives each variant's median step time and the median over the pairs of
exact / native (the step-time cost of the change).

Its table lives in docs/speed.md (Training in channels_last).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _step(precision: str, size: int, batch: int, seed: int):
    """The trainer's step for `precision` ("fp32" / "bf16") and one fixed random batch."""
    import torch

    from model import build_model
    from train.cli import add_train_args
    from train.step import TrainStep, lr_schedule

    parser = argparse.ArgumentParser()
    add_train_args(parser, validate=False)
    args = parser.parse_args(["--device", "cpu", "--image-size", str(size), "--batch-size", str(batch)]
                             + (["--amp"] if precision == "bf16" else []))
    torch.manual_seed(seed)
    model = build_model("efficientdet-d0").train()
    step = TrainStep.from_flags(model, args, (size, size), lr_schedule(args, 1000, batch), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=gen)
    yx = torch.rand(batch, 8, 2, generator=gen) * size * 0.6
    hw = (torch.rand(batch, 8, 2, generator=gen) * 0.4 + 0.05) * size
    boxes, classes = torch.cat([yx, yx + hw], -1), torch.randint(0, 90, (batch, 8), generator=gen)
    return lambda: step(images, boxes, classes)


def _native_statistics():
    """PyTorch's own channels_last BN statistics: the exact path of model/layers.py switched off."""
    from model import layers
    return mock.patch.object(layers, "_needs_blocked_stats", lambda x: False)


def _time(run, context) -> float:
    with context:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--runs", type=int, default=9, help="timed pairs (one step of each variant)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed pairs first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from utils.allocator import reuse_freed_memory
    reuse_freed_memory(training=True)  # as main.py trains
    import torch

    from model.cpu import describe, unsupported_precision
    torch.set_num_threads(args.threads)
    print(f"CPU: {describe()}, {args.threads} threads, torch {torch.__version__}")
    print(f"D0 {args.size} px, batch {args.batch}: the trainer's step (channels_last), median of {args.runs} "
          f"pairs after {args.warmup}\n")
    print("| precision | native BN statistics (s/step) | exact statistics (s/step) | exact / native (median of "
          "pairs) |")
    print("|---|---|---|---|")
    for precision in args.precisions:
        reason = unsupported_precision(precision)
        if reason:
            print(f"| {precision} | - | - | not run: {reason} |")
            continue
        run = _step(precision, args.size, args.batch, args.seed)
        times = {"native": [], "exact": []}
        for i in range(args.warmup + args.runs):
            order = ("native", "exact") if i % 2 == 0 else ("exact", "native")
            pair = {name: _time(run, _native_statistics() if name == "native" else nullcontext()) for name in order}
            if i >= args.warmup:
                for name, t in pair.items():
                    times[name].append(t)
        ratio = statistics.median(e / n for e, n in zip(times["exact"], times["native"]))
        print(f"| {precision} | {statistics.median(times['native']):.3f} | {statistics.median(times['exact']):.3f} "
              f"| {ratio:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
