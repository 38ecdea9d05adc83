"""Building blocks shared by the backbone, the BiFPN and the heads, with TF's conventions.

TF 'SAME' padding: output size ceil(in / stride); the total padding max((out - 1) * stride + k - in, 0) is
split with the extra pixel at the bottom/right. Every strided op in EfficientDet sees an input whose sides
are multiples of its stride (the model only accepts multiples of 2^max_level), so the total padding is the
constant k - stride and is computed once at construction: no per-call work, and the graph traces/exports.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import BN_EPS, BN_MOMENTUM


def same_padding(kernel_size: int, stride: int) -> tuple[int, int]:
    """(before, after) TF 'SAME' padding of one side for an input divisible by `stride`."""
    total = max(kernel_size - stride, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TF 'SAME' padding (asymmetric, extra pixel bottom/right, when strided).

    Input `[N, C_in, H, W]` with H, W divisible by `stride` -> `[N, C_out, H / stride, W / stride]`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = True):
        before, after = same_padding(kernel_size, stride)
        symmetric = before == after
        super().__init__(in_channels, out_channels, kernel_size, stride,
                         padding=before if symmetric else 0, groups=groups, bias=bias)
        # F.pad order is (left, right, top, bottom); None when nn.Conv2d's own symmetric padding suffices.
        self.asym_pad = None if symmetric else (before, after, before, after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asym_pad is not None:
            x = F.pad(x, self.asym_pad)
        return super().forward(x)


class MaxPool2dSame(nn.Module):
    """Max-pool with TF 'SAME' padding, where padded cells never win (TF pads with -inf, not 0).

    The official `_pool2d` uses kernel stride + 1. For an input divisible by the stride, TF pads
    (k - s) // 2 before and the rest after; `ceil_mode` lets the last window hang over the bottom/right
    edge exactly where TF pads, and out-of-range cells are ignored like -inf, so no padded copy is made.
    """

    def __init__(self, stride: int):
        super().__init__()
        self.kernel_size = stride + 1
        self.stride = stride
        self.padding = same_padding(self.kernel_size, stride)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, ceil_mode=True)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class SeparableConv2d(nn.Module):
    """Keras `SeparableConv2D`: depthwise kxk (no bias) -> pointwise 1x1 -> ONE bias.

    `[N, C_in, H, W] -> [N, C_out, H, W]` (stride 1, 'SAME').
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        self.conv_dw = Conv2dSame(in_channels, in_channels, kernel_size, groups=in_channels, bias=False)
        self.conv_pw = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_pw(self.conv_dw(x))


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with the official eps 1e-3 and TF momentum 0.99 (PyTorch momentum 0.01)."""
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def drop_connect(x: torch.Tensor, survival_prob: float, training: bool) -> torch.Tensor:
    """Per-sample stochastic depth as official `utils.drop_connect` (identity in eval)."""
    if not training or survival_prob >= 1.0:
        return x
    keep = torch.floor(survival_prob + torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device))
    return x / survival_prob * keep


# --- TF initializers, so that training from scratch starts where the official code starts. ---
# TF computes fans from its own kernel layout: conv [kh, kw, in, out], depthwise [kh, kw, in, 1].

def _tf_fans(conv: nn.Conv2d) -> tuple[int, int]:
    receptive = conv.kernel_size[0] * conv.kernel_size[1]
    depthwise = conv.groups == conv.in_channels and conv.groups > 1
    out = 1 if depthwise else conv.out_channels
    return receptive * conv.in_channels, receptive * out


def init_efficientnet_conv_(conv: nn.Conv2d) -> None:
    """Official EfficientNet `conv_kernel_initializer`: N(0, sqrt(2 / fan_out)); zero bias."""
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / _tf_fans(conv)[1]))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def init_glorot_uniform_(conv: nn.Conv2d) -> None:
    """Keras default `glorot_uniform` (BiFPN convs); zero bias."""
    fan_in, fan_out = _tf_fans(conv)
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(conv.weight, -limit, limit)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def init_variance_scaling_(conv: nn.Conv2d) -> None:
    """`tf.initializers.variance_scaling()` (heads): truncated normal, scale 1, fan_in; zero bias."""
    # 0.8796... is the std of a unit normal truncated to [-2, 2], which TF divides out.
    std = math.sqrt(1.0 / _tf_fans(conv)[0]) / 0.87962566103423978
    nn.init.trunc_normal_(conv.weight, 0.0, std, -2 * std, 2 * std)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
