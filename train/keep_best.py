"""`--keep N`: the N best evaluated EMA checkpoints of a run by val AP, beside `last.pth` and `best.pth`.

Each is `best-epoch{E}-ap{AP:.4f}.pth`, in the format of `best.pth` (so `-mode eval|infer --weights` take
it). The ranking is read from the file names, so it survives a resume; ties keep the earlier epoch.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from utils.weights import atomic_torch_save

_NAME = re.compile(r"best-epoch(\d+)-ap(\d+\.\d{4})\.pth")


class Kept(NamedTuple):
    ap: float
    epoch: int
    path: Path


def kept_checkpoints(folder: str | Path) -> list[Kept]:
    """The `best-epoch*-ap*.pth` of `folder`, best first (higher AP, then earlier epoch)."""
    found = [(m, p) for p in Path(folder).glob("best-epoch*-ap*.pth") if (m := _NAME.fullmatch(p.name))]
    return sorted((Kept(float(m[2]), int(m[1]), p) for m, p in found), key=lambda k: (-k.ap, k.epoch))


def keep_best(folder: str | Path, checkpoint: dict, epoch: int, ap: float, keep: int) -> Path | None:
    """Save `checkpoint` (evaluated at `epoch` with `ap`) if it ranks among the `keep` best of `folder`, and
    delete the ranked checkpoints beyond `keep`. Returns the path written, or None."""
    folder = Path(folder)
    new = Kept(round(ap, 4), epoch, folder / f"best-epoch{epoch}-ap{ap:.4f}.pth")
    existing = kept_checkpoints(folder)
    stale = [k for k in existing if k.epoch == epoch and k.path != new.path]  # a resumed run redid this evaluation
    ranked = sorted([k for k in existing if k.epoch != epoch] + [new], key=lambda k: (-k.ap, k.epoch))
    written = None
    if new in ranked[:keep]:
        atomic_torch_save(checkpoint, new.path)
        written = new.path
    for k in ranked[keep:] + stale:
        k.path.unlink(missing_ok=True)
    return written
