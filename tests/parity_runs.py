"""One run of `parity.tf_parity` per fixture folder, precision and pytest process (the training step takes ~1
minute in float32, ~2 in float64), and one run of the training step per precision and trainer flags."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from parity.checks import read_meta
from parity.tf_parity import run
from parity.training import run_step


@functools.lru_cache(maxsize=None)
def parity_run(folder: Path, float64: bool = False) -> dict:
    return run(folder, float64)


@functools.lru_cache(maxsize=None)
def step_run(folder: Path, float64: bool = False, flags: tuple[str, ...] = ()) -> dict:
    """`parity.training.run_step` on the training fixture at `folder`: the model in float64 or float32, with
    the trainer's `flags` (e.g. `--nchw`)."""
    return run_step(folder, read_meta(folder), torch.float64 if float64 else torch.float32, flags)
