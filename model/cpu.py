"""What this CPU can run: its model name, the instruction-set flags that decide low-precision speed and
support, and whether oneDNN (PyTorch's CPU conv/GEMM library) has a bf16 / fp16 path on it.

* bf16: oneDNN needs AVX512 (AVX512-BF16 or AMX-BF16 make it fast; plain AVX512 emulates it).
* fp16: oneDNN needs AVX512-FP16, AVX-NE-CONVERT or AMX-FP16: an AMD EPYC with AVX512-BF16 has none of
  them, and its fp16 convs fail inside oneDNN (`mkldnn_reorder_conv2d_weight: fp16 path needs ...`).
"""
from __future__ import annotations

import functools
import os
import platform
import warnings
from pathlib import Path

import torch

FLAGS = ("amx_bf16", "amx_fp16", "avx512_bf16", "avx512_fp16", "avx_ne_convert", "avx512f", "avx2")


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> dict[str, str]:
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return {}
    info = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> dict[str, bool]:
    """The FLAGS above that this CPU has (from /proc/cpuinfo; all False where it is absent)."""
    present = set(_cpuinfo().get("flags", "").split())
    return {flag: flag in present for flag in FLAGS}


def describe() -> str:
    """One line for benchmark tables: `AMD EPYC (2 CPUs): AMX no, AVX512-BF16 yes, AVX512-FP16 no`, and
    `, oneDNN capped at AVX512_CORE_VNNI` when `ONEDNN_MAX_CPU_ISA` makes oneDNN run as a lesser CPU would (the
    flags are the hardware's; the kernels are the cap's: a table measured under it must say so)."""
    f = {k: "yes" if v else "no" for k, v in cpu_flags().items()}
    cap = onednn_cap()
    return (f"{cpu_name()} ({os.cpu_count()} CPUs): AMX {f['amx_bf16']}, AVX512-BF16 {f['avx512_bf16']}, "
            f"AVX512-FP16 {f['avx512_fp16']}" + (f", oneDNN capped at {cap}" if cap else ""))


def onednn_cap() -> str:
    """`ONEDNN_MAX_CPU_ISA` (or its older name `DNNL_MAX_CPU_ISA`), upper case; "" when unset or ALL: oneDNN
    reads it once per process and then uses no instructions beyond that ISA, as a lesser CPU would (e.g.
    AVX512_CORE_VNNI: no bf16; AVX2: no AVX512)."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return "" if cap in ("ALL", "DEFAULT") else cap


# ONEDNN_MAX_CPU_ISA values below AVX512_CORE_BF16: oneDNN capped at one of them has no bf16 arithmetic
_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def native_bf16() -> bool:
    """Whether oneDNN computes bf16 in hardware here: AVX512-BF16 or AMX, not capped below them by
    `ONEDNN_MAX_CPU_ISA`. Without them (plain AVX512, e.g. Xeons before Cooper Lake) it emulates bf16. True
    where this cannot be told (no x86 flags in /proc/cpuinfo: other OSes and architectures)."""
    if "flags" not in _cpuinfo() or platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    flags = cpu_flags()
    return (flags["avx512_bf16"] or flags["amx_bf16"]) and onednn_cap() not in _CAPS_WITHOUT_BF16


def warn_if_emulated_bf16(precision: str, device: torch.device | str = "cpu") -> None:
    """A one-line warning when inference in `precision` bf16 runs on a CPU without bf16 hardware: slower than fp32,
    for bf16's rounding (D0 and Lite0 at 0.62-0.78x of fp32's speed with oneDNN capped at AVX512_CORE_VNNI on an
    AMD EPYC, docs/cpu_kinds.md). Not for training: bf16 autocast still paid there (1.17x fp32, memory-bound)."""
    if precision != "bf16" or torch.device(device).type != "cpu" or native_bf16():
        return
    where = (f"oneDNN is capped at {onednn_cap()} (ONEDNN_MAX_CPU_ISA)" if onednn_cap() in _CAPS_WITHOUT_BF16
             else f"this CPU ({cpu_name()}) has no bf16 hardware (AVX512-BF16 or AMX)")
    warnings.warn(f"precision bf16: {where}, so PyTorch emulates bf16, slower than fp32, and OpenVINO runs it as "
                  f"f32: use fp32", stacklevel=3)


def unsupported_precision(precision: str, device: torch.device | str = "cpu") -> str | None:
    """Why `precision` ("fp32" / "bf16" / "fp16") cannot run on `device`, or None when it can."""
    if torch.device(device).type != "cpu" or precision == "fp32":
        return None
    if not torch.backends.mkldnn.is_available():
        return f"precision {precision} on CPU needs PyTorch's oneDNN backend, which this build lacks"
    supported = {"bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported,
                 "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported}[precision]
    if supported():
        return None
    need = ("AVX512 (fast with AVX512-BF16 or AMX)" if precision == "bf16"
            else "AVX512-FP16, AVX-NE-CONVERT or AMX-FP16")
    return (f"precision {precision} is not supported on this CPU ({cpu_name()}): oneDNN's {precision} kernels need "
            f"{need}; use --precision fp32" + (" or bf16" if precision == "fp16" and
                                                torch.ops.mkldnn._is_mkldnn_bf16_supported() else ""))
