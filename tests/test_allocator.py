"""utils.allocator: with freed memory kept for reuse, allocating a large buffer again costs no page faults;
the training setting still maps blocks of 32 MiB and more afresh (peak RSS) and reuses smaller ones."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_PROBE = """
import resource, sys
import torch
from utils.allocator import reuse_freed_memory
if sys.argv[1] != "system" and not reuse_freed_memory(training=sys.argv[1] == "train"):
    sys.exit("reuse_freed_memory() did not take effect")
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.randn(1, int(sys.argv[2]), 512, 512)  # 1 MiB per channel; 64 MiB: above glibc's dynamic mmap threshold

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


def _faults(mode: str, channels: int = 64) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode, str(channels)], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_reuse_freed_memory_stops_refaulting_large_buffers():
    system, reuse = _faults("system"), _faults("reuse")
    assert system > 5 * 2 * (64 << 20) // 4096  # glibc maps each buffer afresh: its pages fault in again
    assert reuse < system // 5  # an odd buffer may fault in again (the host can reclaim idle pages), not all


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_training_setting_maps_large_blocks_afresh_and_reuses_smaller_ones():
    large = _faults("train", 64)  # 64 MiB blocks: above the training mmap threshold (32 MiB)
    assert large > 5 * 2 * (64 << 20) // 4096  # unmapped when freed: they fault in again, as with the defaults
    small = _faults("train", 16)  # 16 MiB blocks: kept in the heap
    assert small < 5 * 2 * (16 << 20) // 4096 // 5  # at most an odd buffer faults in again, as above
