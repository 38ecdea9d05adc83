"""What defines a training run, as its checkpoint records it: the flags `--resume` must be given unchanged,
their plain-data form, and the metrics log rolled back to a checkpoint's step."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from data.atomic import atomic_open

# Flags that define a run: --resume must be given the same ones.
RUN_FLAGS = ("model", "image_size", "batch_size", "epochs", "lr", "warmup_epochs", "weight_decay", "clip_norm",
             "ema_decay", "label_smoothing", "jitter", "autoaugment", "assigner", "amp", "seed", "freeze")


def plain(value):
    """A flag's value as plain data (a checkpoint holds nothing else): tuples as lists, objects as text."""
    if isinstance(value, tuple):
        return list(value)
    return value if value is None or isinstance(value, (bool, int, float, str, list)) else str(value)


def run_config(args: argparse.Namespace) -> dict:
    """Every flag of the run as plain data, for the checkpoint."""
    return {k: plain(v) for k, v in vars(args).items()}


def changed_run_flags(saved: dict, args: argparse.Namespace) -> list[str]:
    """`--flag old -> new` for each of `RUN_FLAGS` that `args` sets differently from the `saved` config."""
    return [f"--{k.replace('_', '-')} {saved.get(k)} -> {getattr(args, k)}" for k in RUN_FLAGS
            if plain(saved.get(k)) != plain(getattr(args, k))]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of `metrics.jsonl` logged after `step` (a resumed run redoes those steps)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    with atomic_open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))
