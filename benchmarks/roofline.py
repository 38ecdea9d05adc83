"""Roofline arithmetic of `benchmarks/speed.py`: the memory traffic of a STREAM triad, a row's bytes per image,
the time per image its FLOPs and bytes allow on this CPU, and the table cells.

Units: FLOPs and bytes are counts; GEMM peaks in GFLOP/s (1e9 FLOP/s), bandwidths in GB/s (1e9 bytes/s),
times in seconds unless a name says ms. Its columns are in speed.py's tables, which live in docs/speed.md.
"""
from __future__ import annotations

# Bytes per element of the tensors of a row in each precision (`utils.summary.forward_bytes`'s element_size).
ELEMENT_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}
# A training step's traffic as a multiple of its forward's: an approximation. The backward of a conv or matrix
# product reads the output gradient twice, the input and the weights once and writes two gradients (about 2x
# the forward's reads and writes); that of an element-wise op reads its saved input and the output gradient
# and writes the input gradient. The optimizer's and the EMA's passes over the weights are not counted.
TRAIN_BYTES_PER_FORWARD = 3


def triad_bytes(elements: int, element_size: int = 4) -> int:
    """Bytes one STREAM triad `a = b + 3 c` on arrays of `elements` elements moves: read b, read c, write a.
    STREAM's count: the read of a that a write-allocate cache makes before writing it is not counted."""
    return 3 * elements * element_size


def bytes_per_image(activations: float, weights: float, batch: int) -> float:
    """Bytes per image at `batch` from a forward's bytes of activations per image and of weights: the weights
    are read once per batch whatever its size."""
    return activations + weights / batch


def roofline(flops: float, nbytes: float, peak_gflops: float, bandwidth_gbs: float) -> tuple[float, str]:
    """(seconds, bound): the least time `flops` and `nbytes` take at the GEMM peak and the memory bandwidth,
    max(flops / peak, bytes / bandwidth), and which roof binds ("compute" or "memory")."""
    compute = flops / (peak_gflops * 1e9)
    memory = nbytes / (bandwidth_gbs * 1e9)
    return (memory, "memory") if memory > compute else (compute, "compute")


def rate(img_s: float, flops: float, peak: float | None) -> str:
    """`GFLOP/s (% of peak)` cell, for `flops` per image at `img_s` images per second."""
    gflops = img_s * flops / 1e9
    return f"{gflops:.1f} ({100 * gflops / peak:.1f} %)" if peak else f"{gflops:.1f}"


def roofline_cells(flops: float, nbytes: float, peak_gflops: float | None, bandwidth_gbs: float,
                   seconds_per_image: float) -> list[str]:
    """Table cells `roofline ms/img`, `% of roofline` (roofline time / measured time per image: 100 % is at
    the roof) and `bound`, for one image's `flops` and `nbytes`; "-" where the precision has no GEMM peak."""
    if not peak_gflops:
        return ["-"] * 3
    seconds, bound = roofline(flops, nbytes, peak_gflops, bandwidth_gbs)
    return [f"{1e3 * seconds:.2f}", f"{100 * seconds / seconds_per_image:.1f} %", bound]
