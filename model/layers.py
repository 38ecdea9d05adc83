"""Building blocks shared by the backbone, the BiFPN and the heads, with TF's conventions.

TF 'SAME' padding: output size ceil(in / stride); the total padding max((out - 1) * stride + k - in, 0) is
split with the extra pixel at the bottom/right. Stride-1 ops (odd kernels) always pad (k - 1) / 2 on each
side, a constant of the module. For strided ops the padding depends on the parity of the input side (a
3x3/2 conv pads 0 before / 1 after an even side, 1 / 1 an odd one): it is computed per call from the
input's (static) shape, which tracing and export record as constants.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .config import BN_EPS, BN_MOMENTUM


def same_padding(kernel_size: int, stride: int, size: int | None = None) -> tuple[int, int]:
    """(before, after) TF 'SAME' padding of one side of length `size` (None: any multiple of `stride`)."""
    if size is None:
        total = max(kernel_size - stride, 0)
    else:
        total = max((-(-size // stride) - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TF 'SAME' padding (asymmetric, extra pixel bottom/right, when strided).

    Input `[N, C_in, H, W]` -> `[N, C_out, ceil(H / stride), ceil(W / stride)]`, any H, W.
    `asym_pad` is the F.pad padding for sides divisible by the stride (None when nn.Conv2d's own symmetric
    padding suffices, i.e. stride 1).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = True):
        before, after = same_padding(kernel_size, stride)
        symmetric = before == after and stride == 1
        super().__init__(in_channels, out_channels, kernel_size, stride,
                         padding=before if symmetric else 0, groups=groups, bias=bias)
        # F.pad order is (left, right, top, bottom).
        self.asym_pad = None if symmetric else (before, after, before, after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asym_pad is not None:
            k, s = self.kernel_size[0], self.stride[0]
            (top, bottom), (left, right) = (same_padding(k, s, n) for n in x.shape[-2:])
            x = F.pad(x, (left, right, top, bottom))
        if (self.groups > 1 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and torch.is_grad_enabled()):
            # oneDNN's bf16 depthwise backward is several times slower than its fp32 one (5x5: ~6x).
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class MaxPool2dSame(nn.Module):
    """Max-pool with TF 'SAME' padding, where padded cells never win (TF pads with -inf, not 0).

    The official `_pool2d` uses kernel stride + 1. TF pads `same_padding(k, s, side)` per side; PyTorch's
    implicit padding (ignored like -inf) covers the part before, and `ceil_mode` lets the last window hang
    over the bottom/right edge exactly where TF pads the rest, so no padded copy is made.
    `[N, C, H, W] -> [N, C, ceil(H / s), ceil(W / s)]` (a 1x1 map stays itself).
    """

    def __init__(self, stride: int):
        super().__init__()
        self.kernel_size = stride + 1
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # int(): a constant padding under torch.jit.trace too (OpenVINO's TorchScript frontend needs one)
        padding = tuple(same_padding(self.kernel_size, self.stride, int(n))[0] for n in x.shape[-2:])
        return F.max_pool2d(x, self.kernel_size, self.stride, padding, ceil_mode=True)

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


# Batch statistics of channels_last CPU tensors. PyTorch's channels_last CPU kernel sums each channel row by
# row in float32 (one running sum per thread over N*H*W / threads rows), its NCHW kernel takes per-(image,
# channel) moments combined pairwise: on D0's stem at 512 px the variance is 3e-4 from float64 against 1e-7,
# and a training step's logits 1.6e-3 from the float64 official step against 1.6e-5 (parity.training). So in
# training the channels_last kernel runs on blocks of STATS_BLOCK_ROWS pixels (rows of the `[N*H*W, C]`
# matrix the memory is), whose moments are combined in float64: within 2x of NCHW's distance from float64 (its
# error grows with the block: 2048 rows put the step's box outputs at 2.5x NCHW's distance, 1024 at 1.2x).
# Measured cost (`benchmarks/bn_stats.py --runs 15`, AMD EPYC, D0 512 batch 4): the fp32 step 1.05x, bf16 AMP
# 1.04x; an NCHW copy for the statistics, as exact, cost 1.29x / 1.14x. The normalisation and the
# backward stay channels_last.
STATS_BLOCK_ROWS = 1024


def _needs_blocked_stats(x: torch.Tensor) -> bool:
    """True for a `[N, C, H, W]` CPU tensor laid out channels_last (and not also NCHW-contiguous) with more than
    one block of pixels: one block is what the channels_last kernel sums exactly enough by itself."""
    return (x.device.type == "cpu" and x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)
            and x.shape[0] * x.shape[2] * x.shape[3] > STATS_BLOCK_ROWS)


def _blocked_batch_stats(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                         momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) `[C]` of a channels_last `x [N, C, H, W]` over (N, H, W), the running
    statistics updated as `nn.BatchNorm2d` does (unbiased variance). Each block of <= STATS_BLOCK_ROWS pixels
    is a `[1, C, 1, rows]` channels_last view of the same memory; the blocks' moments are combined exactly
    (Chan et al.: total M2 = sum of the blocks' M2 + count * (block mean - mean)^2) in float64."""
    n, c, h, w = x.shape
    rows = n * h * w
    starts = range(0, rows, STATS_BLOCK_ROWS)
    counts = [min(STATS_BLOCK_ROWS, rows - start) for start in starts]
    parts = [torch.batch_norm_update_stats(
        torch.as_strided(x, (1, c, 1, k), (k * c, 1, k * c, c), x.storage_offset() + start * c), None, None, 0.0)
        for start, k in zip(starts, counts)]
    means = torch.stack([m for m, _ in parts]).double()  # [B, C]
    variances = torch.stack([v for _, v in parts]).double()  # batch_norm_update_stats: biased
    weights = torch.tensor(counts, dtype=torch.float64)[:, None] / rows
    mean = (weights * means).sum(0)
    var = (weights * (variances + (means - mean) ** 2)).sum(0)
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_((var * rows / max(rows - 1, 1)).to(running_var.dtype), alpha=momentum)
    return mean.to(running_mean.dtype), var.to(running_var.dtype)  # the dtype of the parameters (bf16 AMP: fp32)


class BatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` (same parameters, buffers and state_dict) whose training-mode batch statistics of a
    channels_last CPU input are as exact as NCHW's (`_blocked_batch_stats`); otherwise `nn.BatchNorm2d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _needs_blocked_stats(x):
            self.num_batches_tracked.add_(1)
            return _BatchNormAct.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                       self.momentum, self.eps, False)
        return super().forward(x)


def batch_norm(channels: int) -> BatchNorm2d:
    """BatchNorm with the official eps 1e-3 and TF momentum 0.99 (PyTorch momentum 0.01)."""
    return BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class _BatchNormAct(torch.autograd.Function):
    """batch_norm(x) in training mode, followed by swish when `swish`, keeping only x for backward.

    Composed of modules, autograd would keep x (for BN), the BN output (for swish) and hand the swish output
    to the next layer: the BN output is one activation-sized tensor per BN-swish pair that is cheap to
    recompute from x and the batch statistics. Same running-statistics update as nn.BatchNorm2d; the batch
    statistics of a channels_last CPU `x` by `_blocked_batch_stats`, applied to `x` as it is.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float, swish: bool):
        if _needs_blocked_stats(x):
            mean, var = _blocked_batch_stats(x, running_mean, running_var, momentum)
            invstd = torch.rsqrt(var + eps)
            y = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
        else:
            y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum,
                                                      eps)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.eps, ctx.swish = eps, swish
        return F.silu(y, inplace=True) if swish else y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        grad_y = grad_out
        if ctx.swish:  # the BN output again, by the eval kernel fed the batch statistics (var = invstd^-2 - eps)
            y = torch.batch_norm(x, weight, bias, mean, invstd.pow(-2) - ctx.eps, False, 0.0, ctx.eps, False)
            grad_y = torch.ops.aten.silu_backward(grad_out, y)
            del y
        grads = torch.ops.aten.native_batch_norm_backward(grad_y, x, weight, None, None, mean, invstd, True,
                                                          ctx.eps, list(ctx.needs_input_grad[:3]))
        return (*grads, None, None, None, None, None)


def bn_swish(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """`swish(bn(x))`, `[N, C, H, W]` in and out; when training with autograd, with `_BatchNormAct`."""
    # SyncBatchNorm (--sync-bn) must go through its own module to synchronise the batch statistics.
    if not (isinstance(bn, nn.BatchNorm2d) and bn.training and torch.is_grad_enabled()):
        return F.silu(bn(x))
    bn.num_batches_tracked.add_(1)
    return _BatchNormAct.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.momentum, bn.eps, True)


def activation(x: torch.Tensor, act_type: str, inplace: bool = False) -> torch.Tensor:
    """Official `utils.activation_fn` for the variants' act_type: "swish" (x * sigmoid(x)) or "relu6"."""
    if act_type == "swish":
        return F.silu(x, inplace=inplace)
    if act_type == "relu6":
        return F.relu6(x, inplace=inplace)
    raise ValueError(f"act_type {act_type!r}: expected 'swish' or 'relu6'")


def bn_act(bn: nn.BatchNorm2d, x: torch.Tensor, act_type: str) -> torch.Tensor:
    """`act(bn(x))`, `[N, C, H, W]` in and out; swish goes through the memory-saving `bn_swish`."""
    if act_type == "swish":
        return bn_swish(bn, x)
    return activation(bn(x), act_type, inplace=True)


def squeeze_excite_project(x: torch.Tensor, se: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """`conv1x1(x * se(mean_hw(x)))` without bias: `x [N, C, H, W]`, `se`: `[N, C, 1, 1]` pooled -> gate of the
    same shape, `weight [O, C, 1, 1]` -> `[N, O, H, W]` (x's memory format).

    When autograd records: one batched matmul with the gate folded into per-image weights, so the gated
    activation is never made and autograd keeps x alone instead of x and x * gate; and the mean is taken
    from the matmul's view of x, so that autograd adds its gradient into the matmul's in place instead of
    allocating their sum. Otherwise the plain op order, whose float32 rounding the parity tests pin.
    Under `torch.jit.trace` always the plain order: the tracer records with autograd on and checks its
    trace with autograd off, and two op sequences fail that check ("Graphs differed across invocations").
    """
    if torch.jit.is_tracing() or not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return F.conv2d(x * se(x.mean((2, 3), keepdim=True)), weight)
    n, c, h, w = x.shape
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    flat = x.permute(0, 2, 3, 1).reshape(n, h * w, c) if nhwc else x.reshape(n, c, h * w)
    gate = se(flat.mean(1 if nhwc else 2).view(n, c, 1, 1)).view(n, 1, c)
    weights = weight.flatten(1)[None] * gate  # [N, O, C]
    if nhwc:
        return torch.bmm(flat, weights.transpose(1, 2)).view(n, h, w, -1).permute(0, 3, 1, 2)
    return torch.bmm(weights, flat).view(n, -1, h, w)


def checkpointed(module: nn.Module, *inputs: torch.Tensor, as_list: bool = False):
    """`module(*inputs)` (`module(list(inputs))` if as_list) keeping none of its activations for backward:
    they are recomputed there.

    Trades one more forward of `module` for memory (large variants). The recomputation must not update
    the BN running statistics a second time, so they are put back after it.
    """
    calls = 0

    def call(args):
        return module(list(args)) if as_list else module(*args)

    def run(*args):
        nonlocal calls
        calls += 1
        if calls == 1:
            return call(args)
        bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [[t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in bns]
        try:
            return call(args)
        finally:  # also when checkpoint stops the recomputation early (once it has what backward needs)
            with torch.no_grad():
                for m, values in zip(bns, saved):
                    for t, v in zip((m.running_mean, m.running_var, m.num_batches_tracked), values):
                        t.copy_(v)
    return torch.utils.checkpoint.checkpoint(run, *inputs, use_reentrant=False)


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
