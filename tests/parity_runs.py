"""One run of `parity.tf_parity` per fixture folder, precision and pytest process (the training step takes ~1
minute in float32, ~2 in float64)."""
from __future__ import annotations

import functools
from pathlib import Path

from parity.tf_parity import run


@functools.lru_cache(maxsize=None)
def parity_run(folder: Path, float64: bool = False) -> dict:
    return run(folder, float64)
