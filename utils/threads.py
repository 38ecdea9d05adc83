"""Torch's intra-op thread count for a block of code: one thread for the torch work beside another engine.

An exported network runs on ONNX Runtime's or OpenVINO's own thread pool; only the work around it (the
post-processing, the finiteness check) runs in torch. With torch's default thread count, torch's idle OpenMP
workers keep spinning for a while after each post-processing and take a core from the engine's next call.
`-mode infer`'s detector (`eval.evaluator.Detector`: network, finiteness check, hard NMS), batch 1, before /
after, `main.py`'s allocator setting, separate processes alternated, median of 3 (AMD EPYC, 2 vCPUs,
2026-12-06): ONNX Runtime D0 at 512 px 26.1 -> 31.0 img/s, Lite0 at 320 px 47.9 -> 88.2; OpenVINO D0 25.0 ->
30.8, Lite0 66.4 -> 85.0 (docs/speed.md). The post-processing itself costs ~10 % more on one thread.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with `count` torch intra-op threads (None: as they are), then restore the previous count
    (~35 us per change). The count is the process's: another thread running torch meanwhile sees it too."""
    previous = torch.get_num_threads()
    if count is None or previous == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
