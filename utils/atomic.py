"""Atomic file writes: write to a temp file beside the target, then rename over it.

Readers never see a half-written file, and an interrupted write leaves the previous file intact.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb"):
    """`with atomic_open(path, "w") as f: ...` writes `path` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(obj, path: str | os.PathLike, **kwargs) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, **kwargs)
