"""Keep freed memory in the process for reuse (glibc malloc): a large CPU speed-up, nothing to install.

glibc serves every allocation above its mmap threshold (dynamic, 32 MiB at most) with a fresh `mmap` and
unmaps it on `free`, and it trims the heap top back to the OS past 128 KiB. A network allocates and frees
the same large activations on every pass, so every pass page-faults them in again and the kernel zeroes
every page: D0 at 512 px spends ~30 % of an inference pass at batch 8 and of a training step at batch 4 in
the kernel (`benchmarks/speed.py` measures it). PyTorch's CPU performance guide cures this with jemalloc or
tcmalloc through `LD_PRELOAD`; raising glibc's two thresholds with `mallopt` does the same for this
process.

The price is peak RSS, and it depends on what the process does, hence two settings:

* Inference (`INFERENCE`): mmap threshold 1 GiB, heap top never trimmed. Only a few activations are alive
  at a time, so fragmentation stays small.
* Training (`TRAINING`): autograd keeps a whole forward's activations alive until the backward frees them
  while it allocates gradients of other sizes. With every block in the heap, its holes add up within a
  step and grow from step to step: D0 512 px, batch 4, fp32, `VmHWM` per step 2761 -> 2997 MB over 7 steps
  against 2417 -> 2504 MB with glibc's defaults (the live set). `malloc_trim` after each step does not
  help (the peak is inside the step: 2825 -> 2938 MB) and costs ~1 s a step; one arena (M_ARENA_MAX=1)
  changes nothing. Handing blocks of 32 MiB and more to `mmap` again keeps the big activations and
  gradients out of the heap (peak 2504 MB for 3 steps, as the defaults), and trimming the heap top past
  512 MiB stops the growth across steps: 2455 MB after 1 step, 2616 MB from the 5th to the 20th (never
  trimming: 2703 after 7; trimming past 128 MiB: 2546 MB from the 2nd, but slower, see below; threshold
  16 MiB, trim 128 MiB: 2465 MB at ~3 s a step, as the defaults). The price is speed: those blocks fault
  in again on every step (same process, steps alternated, median of 7: fp32 2.47 s a step vs 1.94 s with
  the inference setting, bf16 1.83 vs 1.72 s). The 32 MiB threshold would also cost inference at batch 8
  (D0 fp32 11.45 -> 9.64 img/s), hence two settings.

Measured with `benchmarks/speed.py --modes train --precisions fp32 bf16 --runs 5` (D0 512 px, batch 4, vs
effdet's fp32 step with glibc's defaults; AMD EPYC, 2 vCPU, a noisy VM), three runs each. This setting:
fp32 1.71-1.94x the speed at 0.76-0.80x effdet's peak RSS, bf16 autocast 1.80-2.24x at 0.67-0.68x.
Trimming past 128 MiB instead: fp32 1.46-1.67x at 0.75-0.77x, bf16 1.86-2.19x at 0.65x. The inference
setting in training (one run): fp32 2.23x at 0.92x, bf16 2.94x at 0.69x.

`main.py` calls `reuse_freed_memory(training=...)` at start-up (`--system-malloc` keeps glibc's defaults).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import NamedTuple

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h> parameter numbers
_M_MMAP_THRESHOLD = -3


class Setting(NamedTuple):
    """glibc thresholds in bytes (`mallopt` takes an int). A fixed mmap threshold also stops glibc's dynamic one."""
    mmap_threshold: int  # blocks of this size and above get their own mapping and go back to the OS when freed
    trim_threshold: int  # free memory at the heap top beyond this goes back to the OS


INFERENCE = Setting(mmap_threshold=1 << 30, trim_threshold=(1 << 31) - 1)  # never trim in practice
TRAINING = Setting(mmap_threshold=32 << 20, trim_threshold=512 << 20)


def reuse_freed_memory(training: bool = False) -> bool:
    """Make glibc keep freed blocks for the next allocation instead of returning them to the OS.

    training: the process trains (`TRAINING`: large blocks still mapped afresh, see the module docstring);
    otherwise `INFERENCE`. Process-wide, from the next allocation on (forked DataLoader workers inherit it).
    Returns whether it took effect: False off glibc (macOS, Windows, musl), where nothing is changed.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    setting = TRAINING if training else INFERENCE
    return (bool(mallopt(_M_MMAP_THRESHOLD, setting.mmap_threshold))
            and bool(mallopt(_M_TRIM_THRESHOLD, setting.trim_threshold)))
