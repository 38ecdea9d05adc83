"""utils.allocator: with freed memory kept for reuse, allocating a large buffer again costs no page faults."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_PROBE = """
import resource, sys
import torch
from utils.allocator import reuse_freed_memory
if sys.argv[1] == "reuse" and not reuse_freed_memory():
    sys.exit("reuse_freed_memory() did not take effect")
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.randn(1, 64, 512, 512)  # 64 MiB: above glibc's largest dynamic mmap threshold

def layers():  # a chain of activations, as a forward pass makes them
    y = x * 2
    z = y + 1
    del y
    return (z * 3).sum()

for _ in range(10):  # the heap settles to its working size
    layers()
before = faults()
for _ in range(5):
    layers()
print(faults() - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_reuse_freed_memory_stops_refaulting_large_buffers():
    system, reuse = _faults("system"), _faults("reuse")
    assert system > 5 * 2 * (64 << 20) // 4096  # glibc maps each buffer afresh: its pages fault in again
    assert reuse < system // 50
