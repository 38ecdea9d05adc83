"""Inference-only EfficientDet: BN folded into the convs, the activation (swish, Lite: relu6) fused into them,
NHWC throughout.

`prepare_for_inference(model, precision)` returns a module with `EfficientDet.forward`'s signature and
outputs (same shapes, values within float rounding; tensors come back channels_last-strided). The
training model is not touched: folding works on copies of its weights, so it stays trainable and its
state_dict unchanged.

Beyond the per-conv levers of `model.fuse`, whole-block algebra (all exact up to float rounding):
* MBConv projection as a batched matmul on the NHWC view with the SE gate folded into per-image weights
  and the residual as the GEMM's accumulator: the gated activation is never materialised.
* Deferred biases: a block's projection bias is not added over its whole output (a slow broadcast kernel
  in bf16) but folded into the next 1x1 conv that reads it (`FusedMBConv`).
* BiFPN fusion weights (constants in eval) folded into the 1x1 re-projection of their edge when there is
  one (max-pool and nearest upsampling commute with a non-negative scale), else an `add(alpha=)`.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .cpu import unsupported_precision, warn_if_emulated_bf16

from .bifpn import FUSION_EPS, BiFPN, FNode, ResampleFeatureMap
from .efficientdet import EfficientDet, validate_image_size
from .efficientnet import EfficientNet, MBConvBlock, run_tapped
from .fuse import FrozenConv, fold_bn, nchw, nhwc
from .head import HeadNet
from .layers import MaxPool2dSame, activation

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def spatial_mean(flat: torch.Tensor) -> torch.Tensor:
    """`[N, H*W, C] -> [N, C]`: the squeeze-excite mean, as a sum over the pixel axis and one scale.

    ATen's reduction sums in blocks: within ~1e-7 relative of the exact mean over 65,536 pixels, and the
    fastest form measured in both precisions. A GEMV with a `1/(H*W)` row was ~2x slower and, accumulating
    one pixel after another, drifted by up to 1e-3 over the constant padding of a letterboxed photo
    (6e-4 .. 6e-3 on the head outputs of real weights); `mean()` is ~10x slower in bf16 (float casts).

    fp16 tops out at 65,504: a sum over a 256x256 map of activations near 1 passes it and turns the whole
    network's output into NaN/inf (seen on the ported fixture weights at 512 px), so there the sum is
    returned in float32 (ATen accumulates in float32 anyway) and scaled before it is cast back. bf16 has
    float32's exponent range and keeps the faster form.
    """
    if flat.dtype == torch.float16:
        return flat.sum(1, dtype=torch.float32).mul_(1.0 / flat.shape[1]).to(torch.float16)
    return flat.sum(1).mul_(1.0 / flat.shape[1])


def check_finite(cls_outs: list[torch.Tensor], box_outs: list[torch.Tensor], precision: str) -> None:
    """Raise a RuntimeError if any network output holds NaN or inf.

    A non-finite logit never passes a score threshold, so a network that overflows (e.g. fp16 past 65,504)
    would otherwise look like an image with no objects. One sum per output: a sum is finite only if every
    element is (float32 outputs of logits cannot overflow it).
    """
    sums = torch.stack([t.float().sum() for t in cls_outs + box_outs])
    if not bool(torch.isfinite(sums).all()):
        # only fp16 has a narrower range than float32: elsewhere the weights or inputs hold NaN / inf
        hint = ("fp16 overflows on these weights or inputs; use --precision fp32 or bf16" if precision == "fp16"
                else "the weights or inputs hold NaN/inf (e.g. a diverged training run)")
        raise RuntimeError(f"the network's outputs are not finite (NaN or inf) at precision {precision}: {hint}")


class FusedMBConv(nn.Module):
    """Eval `MBConvBlock`: [expand+BN+act] -> dw+BN+act -> SE gate folded into the projection GEMM (Lite, no SE:
    the plain projection GEMM).

    Deferred bias (`defer`): the block returns its output minus `output_bias` (`[C_out]`, float64), which
    the next 1x1 conv folds in; the input may likewise owe `input_bias`. A residual chain passes the sum along. The
    projection's bias would otherwise be a broadcast add over the whole output, a slow kernel in bf16.
    """

    def __init__(self, block: MBConvBlock, input_bias: torch.Tensor | None, defer: bool = True):
        super().__init__()
        if input_bias is not None and not block.expand:
            raise ValueError("a deferred bias needs a 1x1 expansion conv to fold into")
        act = block.act_type
        self.expand = (FrozenConv.from_conv(block.conv_expand, block.bn_expand, act, input_bias=input_bias)
                       if block.expand else None)
        self.dw = FrozenConv.from_conv(block.conv_dw, block.bn_dw, act)
        # SE on `[N, C]` vectors: tiny GEMVs, for which a conv primitive on 1x1 maps costs ~5x more.
        self.se = block.se is not None
        se = (block.se.conv_reduce.weight.detach().flatten(1).clone(), block.se.conv_reduce.bias.detach().clone(),
              block.se.conv_expand.weight.detach().flatten(1).clone(), block.se.conv_expand.bias.detach().clone()
              ) if self.se else (None,) * 4
        for name, value in zip(("se_reduce_weight", "se_reduce_bias", "se_expand_weight", "se_expand_bias"), se):
            self.register_buffer(name, value)
        w, b = fold_bn(block.conv_project.weight, None, block.bn_project)
        self.register_buffer("project_weight", w.flatten(1).t().float().contiguous())  # [C_mid, C_out]
        self.residual = block.residual
        bias = b + input_bias if self.residual and input_bias is not None else b
        # Not deferred when the next block has no 1x1 expansion to fold it into (B1+: the first stage's
        # second block): then it is added here.
        self.output_bias = bias if defer else None
        self.register_buffer("bias", None if defer else bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dw(self.expand(x) if self.expand is not None else x)
        n, c, h, w = out.shape
        flat = nhwc(out)
        if not self.se:
            y = torch.matmul(flat, self.project_weight)
            y = y.add_(nhwc(x)) if self.residual else y
            return nchw(y if self.bias is None else y.add_(self.bias), h, w)
        mean = spatial_mean(flat)
        s = F.silu(F.linear(mean, self.se_reduce_weight, self.se_reduce_bias))
        gate = torch.sigmoid(F.linear(s, self.se_expand_weight, self.se_expand_bias)).view(n, c, 1)
        weight = gate * self.project_weight  # [N, C_mid, C_out]: x * gate @ W == x @ (gate * W)
        y = torch.baddbmm(nhwc(x), flat, weight) if self.residual else torch.bmm(flat, weight)
        if self.bias is not None:
            y = y + self.bias
        return nchw(y, h, w)


class FusedEfficientNet(nn.Module):
    """Eval `EfficientNet`: `images [N, 3, H, W] -> [C3, C4, C5]` (channels_last), each owing the deferred
    bias `tap_biases[i]` (see `FusedMBConv`), which the BiFPN's first 1x1 convs fold in."""

    def __init__(self, net: EfficientNet):
        super().__init__()
        self.stem = FrozenConv.from_conv(net.stem.conv, net.stem.bn, net.stem.act_type)
        blocks, bias = [], None
        for i, block in enumerate(net.blocks):
            # The last block's bias goes to the BiFPN; any other to the next block's expansion, if it has one.
            defer = i + 1 == len(net.blocks) or net.blocks[i + 1].expand
            blocks.append(FusedMBConv(block, bias, defer))
            bias = blocks[-1].output_bias
        self.blocks = nn.ModuleList(blocks)
        self.tap_indices = list(net.tap_indices)
        self.tap_biases = [self.blocks[i].output_bias for i in self.tap_indices]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return run_tapped(self.stem, self.blocks, self.tap_indices, x)


class FusedResample(nn.Module):
    """Eval `ResampleFeatureMap` times a non-negative scale (folded into the projection when present), of an
    input that may owe a deferred bias (folded into the projection, which backbone taps always have).
    `forward(x [N, C_in, H, W], size (H_t, W_t)) -> [N, C_out, H_t, W_t]` (`size` is needed to go up only)."""

    def __init__(self, resample: ResampleFeatureMap, scale: float = 1.0, input_bias: torch.Tensor | None = None):
        super().__init__()
        if input_bias is not None and not resample.project:
            raise ValueError("a deferred bias needs a 1x1 projection conv to fold into")
        self.conv = (FrozenConv.from_conv(resample.conv, resample.bn, scale=scale, input_bias=input_bias)
                     if resample.project else None)
        self.scale = 1.0 if resample.project else scale  # left for the fusion sum to apply
        self.pool: MaxPool2dSame | None = resample.pool
        self.upsample = resample.upsample

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.conv is not None:
            x = self.conv(x)
        if self.pool is not None:
            x = self.pool(x)
        elif self.upsample is not None:
            x = F.interpolate(x, size=tuple(size), mode="nearest")  # the official nearest resize to the target size
        return x


class FusedFNode(nn.Module):
    """Eval `FNode`: sum of (pre-scaled) resampled inputs -> act -> dw -> pw+BN."""

    def __init__(self, node: FNode, input_biases: list[torch.Tensor | None]):
        super().__init__()
        n = len(node.resample)
        if node.edge_weights is None:
            weights = [1.0] * n
        else:
            w = F.relu(node.edge_weights.detach().double())
            weights = (w / (w.sum() + FUSION_EPS)).tolist()
        self.resample = nn.ModuleList(FusedResample(*args) for args in zip(node.resample, weights, input_biases))
        # Sum from a term whose scale is already folded in: one pass then makes the (private) accumulator.
        self.order = sorted(range(n), key=lambda i: self.resample[i].scale != 1.0)
        self.dw = FrozenConv.from_conv(node.conv.conv_dw)
        self.pw = FrozenConv.from_conv(node.conv.conv_pw, node.bn)
        self.act_type = node.act_type
        self.same_level = node.same_level

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        size = inputs[self.same_level].shape[-2:]
        first, second, *rest = self.order
        base, s0 = self.resample[first](inputs[first], size), self.resample[first].scale
        out = torch.add(base if s0 == 1.0 else base * s0, self.resample[second](inputs[second], size),
                        alpha=self.resample[second].scale)
        for i in rest:
            out.add_(self.resample[i](inputs[i], size), alpha=self.resample[i].scale)
        return self.pw(self.dw(activation(out, self.act_type, inplace=True)))


class FusedBiFPN(nn.Module):
    """Eval `BiFPN`: `[C3, C4, C5]` (owing `input_biases`) `-> [P3 .. P_max]`, graph of the source cells."""

    def __init__(self, fpn: BiFPN, input_biases: list[torch.Tensor]):
        super().__init__()
        self.extra_levels = nn.ModuleList(
            FusedResample(r, input_bias=input_biases[-1] if i == 0 else None) for i, r in enumerate(fpn.extra_levels))
        # Only the first cell reads the backbone taps (offsets < len(input_biases)).
        first = [[input_biases[i] if i < len(input_biases) else None for i in offsets]
                 for offsets in fpn.cells[0].inputs]
        self.cells = nn.ModuleList(
            nn.ModuleList(FusedFNode(node, first[j] if c == 0 else [None] * len(offsets))
                          for j, (node, offsets) in enumerate(zip(cell.nodes, cell.inputs)))
            for c, cell in enumerate(fpn.cells))
        self.inputs = [cell.inputs for cell in fpn.cells]
        self.outputs = [cell.outputs for cell in fpn.cells]

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        feats = list(features)
        for resample in self.extra_levels:
            feats.append(resample(feats[-1]))
        for nodes, inputs, outputs in zip(self.cells, self.inputs, self.outputs):
            for node, offsets in zip(nodes, inputs):
                feats.append(node([feats[i] for i in offsets]))
            feats = [feats[i] for i in outputs]
        return feats


class FusedHead(nn.Module):
    """Eval `HeadNet`: shared depthwise convs, per-level pointwise convs (each level's BN folded in)."""

    def __init__(self, head: HeadNet):
        super().__init__()
        self.dw = nn.ModuleList(FrozenConv.from_conv(c.conv_dw) for c in head.convs)
        self.pw = nn.ModuleList(
            nn.ModuleList(FrozenConv.from_conv(c.conv_pw, bn, head.act_type) for bn in bns)
            for c, bns in zip(head.convs, head.bns))
        self.predict = nn.Sequential(FrozenConv.from_conv(head.predict.conv_dw),
                                     FrozenConv.from_conv(head.predict.conv_pw))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        for level, x in enumerate(features):
            for dw, pws in zip(self.dw, self.pw):
                x = pws[level](dw(x))
            outputs.append(self.predict(x))
        return outputs


class FusedEfficientDet(nn.Module):
    """Inference copy of an `EfficientDet` (eval semantics, no gradients): same forward and outputs.

    Weights are buffers in `dtype`; images are cast to it and channels_last on entry, outputs are cast
    back to the images' dtype.
    """

    def __init__(self, model: EfficientDet, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = model.config
        self.backbone = FusedEfficientNet(model.backbone)
        self.fpn = FusedBiFPN(model.fpn, self.backbone.tap_biases)
        self.class_net = FusedHead(model.class_net)
        self.box_net = FusedHead(model.box_net)
        self.dtype = dtype
        self.to(dtype)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.config.name}: expected images [N, 3, H, W], got {list(images.shape)}")
        validate_image_size(self.config, (int(images.shape[2]), int(images.shape[3])), self.config.name)
        # Cast, then transpose: one converting-and-transposing copy is ~2x slower on CPU (bf16 batch 8: ~4 ms).
        x = images.to(self.dtype).contiguous(memory_format=torch.channels_last)
        features = self.fpn(self.backbone(x))
        cls_outs, box_outs = self.class_net(features), self.box_net(features)
        return [c.to(images.dtype) for c in cls_outs], [b.to(images.dtype) for b in box_outs]


class _Autocast(nn.Module):
    """Runs `module` under autocast in `dtype` (the unfused low-precision path); outputs in float32."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, images: torch.Tensor):
        with torch.autocast(images.device.type, self.dtype):
            cls_outs, box_outs = self.module(images)
        return [c.float() for c in cls_outs], [b.float() for b in box_outs]


class _CompileOrEager(nn.Module):
    """`torch.compile(module)`, falling back to `module` with a warning if compiling (lazy, at the first
    call) fails; e.g. no C++ compiler on a CPU-only machine."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        # freezing: weights become constants (folded, pre-packed); cpp_wrapper: C++ calls between kernels.
        self.compiled = torch.compile(module, options={"freezing": True, "cpp_wrapper": True})
        self.failed = False

    def forward(self, images: torch.Tensor):
        if not self.failed:
            try:
                return self.compiled(images)
            except Exception as e:  # noqa: BLE001 - any backend failure means "run eagerly"
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); running eagerly", stacklevel=2)
                self.failed = True
        return self.module(images)


def prepare_for_inference(model: EfficientDet, precision: str = "fp32", fuse: bool = True,
                          channels_last: bool = True, compile: bool = False) -> nn.Module:
    """An inference module with `model`'s forward: `images [N, 3, H, W] -> (cls_outs, box_outs)`.

    `model` itself is left as it is (it is copied, never modified). Outputs have the images' dtype and
    the same shapes and layouts as `EfficientDet.forward` (they may be channels_last-strided; use
    `.contiguous()` if a consumer needs NCHW memory).

    precision: "fp32", "bf16" (fast on CPUs with AMX / AVX512-BF16) or "fp16" (GPUs; on CPU only where
        oneDNN has an fp16 path, see `model.cpu`): a precision this device cannot run is a ValueError.
    fuse: BN folding and fused kernels (`FusedEfficientDet`, always NHWC); False keeps the plain module
        (eval mode, autocast for bf16/fp16), which is mainly useful to measure what fusing buys.
    channels_last: NHWC memory layout for the unfused module (the fused one always is).
    compile: also `torch.compile` the result (inductor with freezing; falls back to eager with a warning
        where it fails). On the 2-core CPU of `benchmarks/speed.py` it compiles for ~2 minutes and then runs
        10-20 % slower than the eager fused module, so it is off by default.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    device = next(model.parameters()).device
    reason = unsupported_precision(precision, device)
    if reason:
        raise ValueError(reason)
    warn_if_emulated_bf16(precision, device)
    if fuse:
        module = FusedEfficientDet(model, dtype).to(device)
    else:
        module = copy.deepcopy(model).eval().requires_grad_(False)
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        if dtype != torch.float32:
            module = _Autocast(module, dtype)
    return _CompileOrEager(module) if compile else module
