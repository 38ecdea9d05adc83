"""Unreadable images met while training or evaluating: counted as they happen, and a run stops as soon as
their count passes `--max-bad-images` (a number of images, or a percentage of the images of the pass).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from tqdm import tqdm


@dataclass(frozen=True)
class BadImage:
    """An image of a dataset that could not be read: `reason` "missing" / "cannot decode" / "truncated" /
    "unsupported" (see `data.image_io`), `detail` the decoder's words."""
    image_id: int
    file_name: str
    reason: str
    detail: str


@dataclass(frozen=True)
class BadImageLimit:
    """`--max-bad-images`: `count` images, or `percent` % of the images of a pass (rounded down)."""
    count: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, text: str) -> "BadImageLimit":
        """"N" (an integer >= 0) or "P%" (0 <= P <= 100); ValueError otherwise."""
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*", text)
        if match and float(match.group(1)) <= 100:
            return cls(percent=float(match.group(1)))
        if re.fullmatch(r"\s*\d+\s*", text):
            return cls(count=int(text))
        raise ValueError(f"expected a number of images (e.g. 10) or a percentage from 0% to 100% (e.g. 1%), "
                         f"got {text!r}")

    def of(self, total: int) -> int:
        return self.count if self.count is not None else math.floor(self.percent * total / 100 + 1e-9)

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.percent:g}%"


class BadImageBudget:
    """Counts the unreadable images of one pass (an epoch, an evaluation) over `total` images.

    `add(failures, count)` says `skipping <file>: <reason> (<detail>)` for each of this process's failures
    (if `speak`) and adds `count` (default: their number; under DDP the all-reduced count of every rank) to
    the tally; past `limit.of(total)` it raises a RuntimeError that sums the failures up by reason.
    """

    def __init__(self, limit: BadImageLimit, total: int, what: str, speak: bool = True):
        self.limit, self.total, self.what, self.speak = limit, total, what, speak
        self.allowed = limit.of(total)
        self.count, self.reasons, self.first = 0, Counter(), []

    def add(self, failures: list[BadImage], count: int | None = None) -> None:
        for bad in failures:
            self.reasons[bad.reason] += 1
            if len(self.first) < 3:
                self.first.append(f"{bad.file_name} ({bad.reason})")
            if self.speak:
                tqdm.write(f"skipping {bad.file_name}: {bad.reason} ({bad.detail})")
        self.count += len(failures) if count is None else count
        if self.count > self.allowed:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.reasons.items(),
                                                                       key=lambda kv: (-kv[1], kv[0])))
            raise RuntimeError(
                f"{self.what}: {self.count} unreadable images, more than --max-bad-images {self.limit} "
                f"(= {self.allowed} of {self.total} images); stopped"
                + (f": {reasons}; first {', '.join(self.first)}" if reasons else ""))
