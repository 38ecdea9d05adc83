"""Torch's intra-op thread count for a block of code: one thread for the torch work beside another engine.

An exported network runs on ONNX Runtime's or OpenVINO's own thread pool; only the work around it (the
post-processing, the finiteness check) runs in torch. With torch's default thread count, torch's idle OpenMP
workers keep spinning for a while after each post-processing and take a core from the engine's next call.
`-mode infer`'s detector (network + hard NMS), 2 vCPUs, batch 1, before / after, separate processes alternated,
median of 3 (AMD EPYC, 2026-12-06): ONNX Runtime D0 at 512 px 25.6 -> 33.7 img/s, Lite0 at 320 px 60.4 ->
94.6; OpenVINO D0 28.8 -> 31.1, Lite0 69.4 -> 85.6; ONNX Runtime D0 at batch 8 25.7 -> 28.6. The
post-processing itself costs ~10 % more on one thread (D0: ~4.5 against ~4.0 ms), far less than it saves.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` torch intra-op threads, then restore the previous count (~35 us per change)."""
    previous = torch.get_num_threads()
    if previous == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
