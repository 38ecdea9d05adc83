"""Keep freed memory in the process for reuse (glibc malloc): a large CPU speed-up, nothing to install.

glibc serves every allocation above its mmap threshold (dynamic, 32 MiB at most) with a fresh `mmap` and
unmaps it on `free`, and it trims the heap top back to the OS past 128 KiB. A network allocates and frees
the same large activations on every pass, so every pass page-faults them in again and the kernel zeroes
every page: D0 at 512 px spends ~30 % of an inference pass at batch 8 and of a training step at batch 4 in
the kernel (`benchmarks/speed.py` measures it). PyTorch's CPU performance guide cures this with jemalloc or
tcmalloc through `LD_PRELOAD`; raising glibc's two thresholds with `mallopt` does the same for this
process. The price is peak RSS: freed blocks stay mapped, so the heap's fragmentation counts (measured in
the README's speed table).

`main.py` calls `reuse_freed_memory()` at start-up (`--system-malloc` keeps glibc's defaults).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h> parameter numbers
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks above 1 GiB still get their own mapping (and go back to the OS when freed)
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int: never trim the heap top in practice


def reuse_freed_memory() -> bool:
    """Make glibc keep freed blocks for the next allocation instead of returning them to the OS.

    Process-wide, from the next allocation on (forked DataLoader workers inherit it). Returns whether it
    took effect: False off glibc (macOS, Windows, musl), where nothing is changed.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
