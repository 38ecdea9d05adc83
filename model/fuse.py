"""Frozen-weight building blocks of the inference copy (`model.inference`): BN folding and fast convs.

What pays on CPU (measured in `benchmarks/speed.py`; most ops here are memory-bound, so the levers are
about passes over activations and per-call overheads):
* BN folded into the preceding conv (eval BN is an affine map per channel): no BN pass.
* conv + bias + activation (swish, or relu6 as oneDNN's hardtanh [0, 6] for Lite) as one oneDNN kernel
  (`torch.ops.mkldnn._convolution_pointwise`, the kernel that `torch.compile` itself emits on CPU) with its
  weight pre-packed once: no separate activation pass. Elsewhere (CUDA, builds without oneDNN, under
  torch.compile) the same module runs `F.conv2d` + the activation.
* 1x1 convs on small maps as a GEMM: a oneDNN conv call costs ~50 us whatever its size, a GEMM ~5 us. The GEMM
  is oneDNN's (`torch.ops.mkldnn._linear_pointwise`, weight pre-packed, activation fused), not `F.linear`'s
  MKL sgemm + a separate activation pass: 1.17-1.97x faster on D0's GEMM shapes on an AMD EPYC, where MKL's
  fp32 GEMM reaches 50-80 % of oneDNN's rate (`benchmarks/profile_engines.py`: the P3 class predictor
  7.1 -> 3.7 ms).
* TF 'SAME' padding of strided convs without a padded copy: the kernel is zero-extended at the top/left
  by (after - before) of a side divisible by the stride and run with symmetric padding `before(side) +
  extension` per side, which reads exactly TF's windows for every side length (even and odd).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv2dSame, activation, same_padding

GEMM_MAX_PIXELS = 4096  # 1x1 convs on at most this many pixels (N * H * W) run as a GEMM
_HAS_ONEDNN = torch.backends.mkldnn.is_available()
# act_type -> oneDNN post-op (name, scalars) of `_convolution_pointwise`
_ONEDNN_ACT = {None: ("none", []), "swish": ("swish", []), "relu6": ("hardtanh", [0.0, 6.0])}


def _onednn(x: torch.Tensor) -> bool:
    # Under torch.compile the plain ops are traced instead: inductor (with freezing) packs the weights
    # and fuses conv + swish into the same oneDNN kernel itself.
    return not torch.compiler.is_compiling() and _HAS_ONEDNN and x.device.type == "cpu"


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d | None, scale: float = 1.0,
            input_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`scale * bn(conv(x + input_bias))` as one conv on x: `(weight [O, I, kh, kw], bias [O])`, in float64.

    `input_bias [I]` (a per-channel offset still owed by the producer of x) folds exactly only into a 1x1
    conv: with zero padding a kxk conv would see it partially at the borders.
    """
    w = weight.detach().double()
    b = bias.detach().double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if input_bias is not None:
        if w.shape[-2:] != (1, 1):
            raise ValueError(f"an input bias folds only into 1x1 convs, not {tuple(w.shape[-2:])}")
        b = b + w.flatten(1) @ input_bias.double()
    if bn is not None:
        g = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        w = w * g.view(-1, 1, 1, 1)
        b = (b - bn.running_mean.double()) * g + bn.bias.detach().double()
    return w * scale, b * scale


class FrozenConv(nn.Module):
    """Conv with fixed weights (BN folded in) and optional activation `act` (None, "swish", "relu6"); TF 'SAME'.
    `[N, I, H, W] -> [N, O, ceil(H / s), ceil(W / s)]`, any H, W.

    Asymmetric SAME padding (strided convs) is turned into symmetric padding by zero-extending the kernel
    at the top/left by `e` = (after - before) of a side divisible by the stride, so no padded copy of the
    input is made. A side of length n is then padded by `before(n) + e` on both ends: the extended window
    starts at `-before(n) - e` and its first `e` rows are zero, so it reads TF's window from `-before(n)`;
    the count of windows is TF's `ceil(n / s)` (odd k, stride 2: `e` = 1 for k > 1; n even: `before` =
    (k - 2) / 2, odd: (k - 1) / 2), and what hangs over the end is padding TF has too. Odd kernels and
    strides 1 and 2 only (all EfficientDet has).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, groups: int,
                 act: str | None, pad: tuple[int, int]):
        super().__init__()
        if act not in _ONEDNN_ACT:
            raise ValueError(f"act {act!r}: expected None, 'swish' or 'relu6'")
        before, after = pad
        self.kernel_size, self.extension = weight.shape[-1], after - before
        weight = F.pad(weight, (self.extension, 0, self.extension, 0))
        self.register_buffer("weight", weight.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.float())
        self.stride, self.groups, self.act = stride, groups, act
        self._stride1_padding = [same_padding(self.kernel_size, 1)[0]] * 2
        # (padding H, W) | GEMM rows -> (weight, packed)
        self._packed: dict[tuple[int, int] | int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pointwise = weight.shape[-2:] == (1, 1) and stride == 1 and groups == 1

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, act: str | None = None,
                  scale: float = 1.0, input_bias: torch.Tensor | None = None) -> "FrozenConv":
        w, b = fold_bn(conv.weight, conv.bias, bn, scale, input_bias)
        asym = isinstance(conv, Conv2dSame) and conv.asym_pad is not None
        pad = conv.asym_pad[2:] if asym else (conv.padding[0],) * 2
        if conv.kernel_size[0] % 2 == 0 or conv.stride[0] > 2:
            raise ValueError(f"{conv}: expected an odd kernel and stride 1 or 2 (the padding rule of FrozenConv)")
        if not asym and (conv.stride[0] != 1 or pad != same_padding(conv.kernel_size[0], 1)):
            raise ValueError(f"{conv}: expected TF 'SAME' padding (a Conv2dSame, or a stride-1 conv padded by "
                             f"(k - 1) / 2)")
        has_bias = bn is not None or conv.bias is not None or input_bias is not None
        return cls(w, b if has_bias else None, conv.stride[0], conv.groups, act, pad)

    def padding(self, height: int, width: int) -> list[int]:
        """The symmetric padding `[H, W]` of the (extended) kernel that reads TF's 'SAME' windows of this input
        (stride 1: the same for every size, computed once; this runs on every call)."""
        if self.stride == 1:
            return self._stride1_padding
        return [same_padding(self.kernel_size, self.stride, n)[0] + self.extension for n in (height, width)]

    def _packed_weight(self, key: tuple[int, int] | int, pack) -> torch.Tensor:
        # oneDNN's blocked weight layout, made once by `pack()`: for the conv per padding (one key for every
        # size with the same parities) or, for the GEMM, per number of rows (its packing is tuned to them).
        # Not buffers: opaque MKLDNN tensors, rebuilt if the module is moved or cast.
        cached = self._packed.get(key)
        if cached is None or cached[0] is not self.weight:
            cached = self._packed[key] = (self.weight, pack())
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.pointwise and n * h * w <= GEMM_MAX_PIXELS and x.is_contiguous(memory_format=torch.channels_last):
            # Small maps: a oneDNN conv call costs ~50 us whatever its size, a GEMM ~5 us.
            rows = nhwc(x).reshape(n * h * w, c)
            if _onednn(x) and x.dtype == self.weight.dtype:
                packed = self._packed_weight(
                    n * h * w, lambda: torch.ops.mkldnn._reorder_linear_weight(self.weight.flatten(1), n * h * w))
                y = torch.ops.mkldnn._linear_pointwise(rows, packed, self.bias, *_ONEDNN_ACT[self.act], "")
                return nchw(y.view(n, h * w, -1), h, w)
            y = nchw(F.linear(rows, self.weight.flatten(1), self.bias).view(n, h * w, -1), h, w)
            return activation(y, self.act, inplace=True) if self.act else y
        padding = self.padding(h, w)
        if _onednn(x) and x.dtype == self.weight.dtype:
            packed = self._packed_weight(tuple(padding), lambda: torch.ops.mkldnn._reorder_convolution_weight(
                self.weight, padding, [self.stride] * 2, [1, 1], self.groups, list(x.shape)))
            return torch.ops.mkldnn._convolution_pointwise(
                x, packed, self.bias, padding, [self.stride] * 2, [1, 1], self.groups, *_ONEDNN_ACT[self.act], "")
        x = F.conv2d(x, self.weight, self.bias, self.stride, padding, 1, self.groups)
        return activation(x, self.act, inplace=True) if self.act else x


def nhwc(x: torch.Tensor) -> torch.Tensor:
    """`[N, C, H, W]` (channels_last) -> `[N, H * W, C]` view."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c)


def nchw(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """`[N, H * W, C]` -> `[N, C, H, W]` channels_last view."""
    return x.view(x.shape[0], h, w, x.shape[2]).permute(0, 3, 1, 2)
