"""One run of `parity.tf_parity` per fixture folder and pytest process (the training step takes ~1 minute)."""
from __future__ import annotations

import functools
from pathlib import Path

from parity.tf_parity import run


@functools.lru_cache(maxsize=None)
def parity_run(folder: Path) -> dict:
    return run(folder)
