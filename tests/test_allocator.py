"""utils.allocator: with freed memory kept for reuse, allocating a large buffer again costs no page faults;
the training setting still maps blocks of 32 MiB and more afresh (peak RSS) and reuses smaller ones.

Each probe counts the page faults of the same passes under a setting and under glibc's defaults: their
ratio does not depend on the size of a page (4 KiB, or 2 MiB where transparent huge pages are always on)."""
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


# Each pass allocates two buffers afresh under glibc's defaults: at least 32 faults each, with pages of 2 MiB
# at most (a transparent huge page), or the probe did not measure what it should.
_AFRESH = 5 * 2 * (64 << 20) // (2 << 20)


@pytest.fixture(scope="module")
def system() -> int:
    """Faults of the 64 MiB probe under glibc's defaults, the reference of both tests."""
    faults = _faults("system", 64)
    assert faults >= _AFRESH  # glibc maps each buffer afresh: its pages fault in again
    return faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_reuse_freed_memory_stops_refaulting_large_buffers(system):
    reuse = _faults("reuse")
    assert reuse < system / 5  # an odd buffer may fault in again (the host can reclaim idle pages), not all


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_training_setting_maps_large_blocks_afresh_and_reuses_smaller_ones(system):
    large = _faults("train", 64)  # 64 MiB blocks: above the training mmap threshold (32 MiB)
    assert large > system / 2  # unmapped when freed: they fault in again, as with the defaults
    small = _faults("train", 16)  # 16 MiB blocks (a quarter of the faults if mapped afresh): kept in the heap
    assert small < system / 4 / 5  # at most an odd buffer faults in again, as above
