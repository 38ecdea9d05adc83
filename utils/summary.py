"""Parameter, multiply-add and memory-traffic counts of the variants, computed on the meta device (no memory,
no init)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from model import VARIANTS, build_model
from model.inference import prepare_for_inference

# Paper (arXiv:1911.09070, Table 2) FLOPs in billions of multiply-adds at each variant's image size
# (the Lite variants are not in the paper).
PAPER_GFLOPS = {"efficientdet-d0": 2.5, "efficientdet-d1": 6.1, "efficientdet-d2": 11, "efficientdet-d3": 25,
                "efficientdet-d4": 55, "efficientdet-d5": 135, "efficientdet-d6": 226, "efficientdet-d7": 325,
                "efficientdet-d7x": 410}


def forward_flops(model: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass of `model` on a tensor of `input_shape` ([N, 3, H, W]) on the model's device
    (the meta device costs no memory or time): 2 x the multiply-adds of every convolution and matrix product,
    as `torch.utils.flop_counter` counts them at the aten level, so functional convs and folded weights count
    too (module forward hooks on `nn.Conv2d` would miss them). Element-wise ops (BN, activations, fusion) are
    not counted, as in the paper's FLOPs."""
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(input_shape, device=device))
    return counter.get_total_flops()


_aten = torch.ops.aten
# aten ops that move no data, besides views and aliases (recognised by their schema, `OpOverload.is_view`: view,
# reshape, expand, permute, slice, select, transpose, t, detach, alias, unsqueeze, squeeze, as_strided ...):
# `_unsafe_view` (a view, though its schema does not say so) and allocations (they write no element).
_NO_DATA = {_aten._unsafe_view, _aten.empty, _aten.empty_strided, _aten.empty_like, _aten.new_empty}
# In-place activations that oneDNN applies inside the conv / GEMM kernel that produced their input (the
# post-ops of `model.fuse.FrozenConv` on CPU), and those producers.
_POST_OPS = {_aten.silu_, _aten.hardtanh_, _aten.relu_}
_POST_OP_HOSTS = {_aten.convolution, _aten.addmm, _aten.mm}


class Traffic(NamedTuple):
    """Bytes one forward pass reads and writes (see `forward_bytes`)."""
    activations: int  # every tensor that is not a parameter or buffer of the model (images, activations, outputs)
    weights: int  # the model's parameters and buffers, each time an op reads them


def _storage(t: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(t.untyped_storage())  # the same for a tensor and all its views


def _tensor_bytes(t: torch.Tensor, element_size: int) -> int:
    """Bytes of the distinct elements of `t`: floating-point ones at `element_size`, others (max-pool indices)
    at their own size. A broadcast (stride-0) dimension re-reads the same elements, so it does not count."""
    if t.numel() == 0:
        return 0
    distinct = math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)
    return distinct * (element_size if t.is_floating_point() else t.element_size())


class _TrafficMode(TorchDispatchMode):
    """Adds up the bytes of the tensor inputs and outputs of every aten op that computes."""

    def __init__(self, weights: set[StorageWeakRef], element_size: int, fused_activations: bool):
        super().__init__()
        self.weights, self.element_size, self.fused_activations = weights, element_size, fused_activations
        self.activations = self.weight_bytes = 0
        self.host = None  # storage of the output of the last op, if a conv or matrix product

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if func.is_view or packet in _NO_DATA:
            return out  # the host of a post-op may be reached through views (FrozenConv's GEMM path)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        fused = self.fused_activations and packet in _POST_OPS and self.host is not None
        if fused and _storage(inputs[0]) == self.host:
            self.host = None
            return out
        self.host = _storage(outputs[0]) if packet in _POST_OP_HOSTS else None
        for t in inputs + outputs:
            if _storage(t) in self.weights:
                self.weight_bytes += _tensor_bytes(t, self.element_size)
            else:
                self.activations += _tensor_bytes(t, self.element_size)
        return out


def forward_bytes(model: torch.nn.Module, input_shape: tuple[int, ...], element_size: int,
                  fused_activations: bool = False, autograd: bool = False) -> Traffic:
    """Bytes that one forward pass of `model` on a tensor of `input_shape` ([N, 3, H, W]) moves to and from
    memory, counted at the aten level on the model's device (the meta device costs no memory or time).

    A model of traffic, not a measurement: every aten op that computes reads each of its tensor inputs from
    memory once and writes each of its outputs once; caches are ignored, so data an op finds still in cache
    counts again. Views and other ops that move no data count nothing (see `_NO_DATA`). Floating-point
    tensors count `element_size` bytes per element (4 fp32, 2 bf16 / fp16, 1 int8), whatever the model's dtype;
    integer ones (max-pool indices) their own size. An in-place op counts its operand as read and written, as
    it would the destination of `copy_` or of an `out=` argument, which is only written (EfficientDet's
    forward has neither).

    Weights are the tensors that share storage with a parameter or buffer of `model` (views of them too),
    counted each time an op reads (or writes) them: a module applied to 5 pyramid levels reads its weights 5
    times. Activations scale with N, weights do not: per image at batch B, `activations` / N + `weights` / B.

    fused_activations: an in-place activation (swish, relu6, relu) on the output of the conv or matrix product
        just before it (through views) counts nothing, as oneDNN applies it inside that kernel: pass True for
        the fused inference module (`model.inference.FusedEfficientDet`), whose `model.fuse.FrozenConv` runs
        oneDNN's conv + bias + activation on CPU but, on the meta device, the conv and then the activation.

    autograd: run the forward with autograd recording, as a training step does (a model in training mode then
        takes its training paths: `bn_swish`'s one BN + swish op, the SE gate folded into the projection; D0:
        7 % fewer bytes than its forward under `no_grad`); by default, under `no_grad`. The backward is not run.

    On the plain module, every conv, BN and activation is its own op and pass: an upper bound on the traffic
    that graph needs. On the fused module (BN folded, activations fused, `meta_model(..., fused=True)`) it
    is a fair estimate of what it moves.
    """
    params = [*model.parameters(), *model.buffers()]
    device = params[0].device
    mode = _TrafficMode({_storage(t) for t in params}, element_size, fused_activations)
    with mode, torch.set_grad_enabled(autograd):
        model(torch.empty(input_shape, device=device))
    return Traffic(mode.activations, mode.weight_bytes)


def meta_model(name: str, fused: bool = False, training: bool = False) -> torch.nn.Module:
    """Variant `name` on the meta device, as `benchmarks/speed.py` times it: the fused inference module
    (`prepare_for_inference(model, "fp32", fuse=True)`), or the plain `EfficientDet` in eval / training mode.

    The fused module cannot be built on the meta device (folding turns the BiFPN's fusion weights into Python
    floats, which a meta tensor has not), so it is built from a CPU model with its initial weights (D0: ~0.1 s
    once imported) and then moved to the meta device. Which ops it runs does not depend on the weights.
    """
    if fused:
        return prepare_for_inference(build_model(name).eval(), "fp32", fuse=True).to("meta")
    with torch.device("meta"):
        return build_model(name).train(training)


def variant_summary(name: str, num_classes: int = 90) -> dict:
    """Params and GMACs (conv/matmul multiply-adds, batch 1) of `name` at its official image size."""
    size = VARIANTS[name].image_size
    with torch.device("meta"):
        model = build_model(name, num_classes=num_classes).eval()
    flops = forward_flops(model, (1, 3, *VARIANTS[name].image_hw))
    return {"model": name, "image_size": size, "params": sum(p.numel() for p in model.parameters()),
            "gmacs": flops / 2e9, "paper_gflops": PAPER_GFLOPS.get(name)}


def summary_table(names) -> str:
    lines = [f"{'model':<20}{'image':>6}{'params':>13}{'GMACs':>9}{'paper GFLOPs':>14}"]
    for name in names:
        s = variant_summary(name)
        paper = "-" if s["paper_gflops"] is None else s["paper_gflops"]
        lines.append(f"{name:<20}{s['image_size']:>6}{s['params']:>13,}{s['gmacs']:>9.2f}{paper:>14}")
    return "\n".join(lines)


def add_summary_args(parser) -> None:
    parser.add_argument("-model", default="efficientdet-d0", choices=[*VARIANTS, "all"], help="variant, or all")


def run_summary(args) -> None:
    print(summary_table(list(VARIANTS) if args.model == "all" else [args.model]))
