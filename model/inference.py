"""Inference-only EfficientDet: BN folded into the convs, swish fused into them, NHWC throughout.

`prepare_for_inference(model)` returns a module with `EfficientDet.forward`'s signature and outputs
(same shapes, values within float rounding; tensors come back channels_last-strided). The training model
is not touched: folding works on copies of its weights, so it stays trainable and its state_dict unchanged.

What pays on CPU (measured in `benchmarks/speed.py`; every op here is memory-bound, so the levers are
about passes over activations):
* BN folded into the preceding conv (eval BN is an affine map per channel), so no BN pass.
* conv + bias + swish as one oneDNN kernel (`torch.ops.mkldnn._convolution_pointwise`, the kernel that
  `torch.compile` itself emits on CPU), so no separate swish pass. Elsewhere (CUDA, builds without
  oneDNN) the same module runs `F.conv2d` + `F.silu`.
* TF 'SAME' padding of strided convs without a padded copy: the kernel is zero-extended at the top/left
  by (after - before) and run with symmetric padding `after`, which reads exactly TF's windows.
* MBConv projection as a batched matmul on the NHWC view with the SE gate folded into per-image weights
  and the residual as the GEMM's accumulator: the gated activation is never materialised.
* BiFPN fusion weights (constants in eval) folded into the 1x1 re-projection of their edge when there is
  one (max-pool and nearest upsampling commute with a non-negative scale), else an `add(alpha=)`.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .bifpn import FUSION_EPS, BiFPN, FNode, ResampleFeatureMap
from .efficientdet import EfficientDet, check_image_size
from .efficientnet import EfficientNet, MBConvBlock, run_tapped
from .head import HeadNet
from .layers import Conv2dSame, MaxPool2dSame

GEMM_MAX_PIXELS = 4096  # 1x1 convs on at most this many pixels (N * H * W) run as a GEMM
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _onednn(x: torch.Tensor) -> bool:
    # Under torch.compile the plain ops are traced instead: inductor (with freezing) packs the weights
    # and fuses conv + swish into the same oneDNN kernel itself.
    return (x.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and not torch.compiler.is_compiling())


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
    """Conv with fixed weights (BN folded in) and optional swish; TF 'SAME'. `[N, I, H, W] -> [N, O, H/s, W/s]`.

    Asymmetric SAME padding (strided convs) is turned into symmetric padding by zero-extending the kernel
    at the top/left, so no padded copy of the input is made.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, groups: int,
                 swish: bool, pad: tuple[int, int]):
        super().__init__()
        before, after = pad
        weight = F.pad(weight, (after - before, 0, after - before, 0))
        self.register_buffer("weight", weight.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.float())
        self.stride, self.padding, self.groups, self.swish = stride, after, groups, swish
        self._packed: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pointwise = weight.shape[-2:] == (1, 1) and stride == 1 and groups == 1

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, swish: bool = False,
                  scale: float = 1.0, input_bias: torch.Tensor | None = None) -> "FrozenConv":
        w, b = fold_bn(conv.weight, conv.bias, bn, scale, input_bias)
        asym = isinstance(conv, Conv2dSame) and conv.asym_pad is not None
        pad = conv.asym_pad[2:] if asym else (conv.padding[0],) * 2
        has_bias = bn is not None or conv.bias is not None or input_bias is not None
        return cls(w, b if has_bias else None, conv.stride[0], conv.groups, swish, pad)

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        # oneDNN's blocked weight layout, made once per dtype (it is valid for every input shape); not a
        # buffer: an opaque MKLDNN tensor, rebuilt if the module is moved or cast.
        if self._packed is None or self._packed[0] is not self.weight:
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight, [self.padding] * 2, [self.stride] * 2, [1, 1], self.groups, list(x.shape))
            self._packed = (self.weight, packed)
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.pointwise and n * h * w <= GEMM_MAX_PIXELS and x.is_contiguous(memory_format=torch.channels_last):
            # Small maps: a oneDNN conv call costs ~50 us whatever its size, a GEMM ~5 us.
            y = _nchw(F.linear(_nhwc(x), self.weight.flatten(1), self.bias), h, w)
            return F.silu(y, inplace=True) if self.swish else y
        if _onednn(x) and x.dtype == self.weight.dtype:
            return torch.ops.mkldnn._convolution_pointwise(
                x, self._packed_weight(x), self.bias, [self.padding] * 2, [self.stride] * 2, [1, 1], self.groups,
                "swish" if self.swish else "none", [], "")
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        return F.silu(x, inplace=True) if self.swish else x


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """`[N, C, H, W]` (channels_last) -> `[N, H * W, C]` view."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c)


def _nchw(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """`[N, H * W, C]` -> `[N, C, H, W]` channels_last view."""
    return x.view(x.shape[0], h, w, x.shape[2]).permute(0, 3, 1, 2)


class FusedMBConv(nn.Module):
    """Eval `MBConvBlock`: [expand+BN+swish] -> dw+BN+swish -> SE gate folded into the projection GEMM.

    Deferred bias: the block returns its output minus `output_bias` (`[C_out]`, float64), which the next
    1x1 conv folds in; the input may likewise owe `input_bias`. A residual chain passes the sum along. The
    projection's bias would otherwise be a broadcast add over the whole output, a slow kernel in bf16.
    """

    def __init__(self, block: MBConvBlock, input_bias: torch.Tensor | None):
        super().__init__()
        if input_bias is not None and not block.expand:
            raise ValueError("a deferred bias needs a 1x1 expansion conv to fold into")
        self.expand = (FrozenConv.from_conv(block.conv_expand, block.bn_expand, True, input_bias=input_bias)
                       if block.expand else None)
        self.dw = FrozenConv.from_conv(block.conv_dw, block.bn_dw, True)
        # SE on `[N, C]` vectors: tiny GEMVs, for which a conv primitive on 1x1 maps costs ~5x more.
        self.register_buffer("se_reduce_weight", block.se.conv_reduce.weight.detach().flatten(1).clone())
        self.register_buffer("se_reduce_bias", block.se.conv_reduce.bias.detach().clone())
        self.register_buffer("se_expand_weight", block.se.conv_expand.weight.detach().flatten(1).clone())
        self.register_buffer("se_expand_bias", block.se.conv_expand.bias.detach().clone())
        w, b = fold_bn(block.conv_project.weight, None, block.bn_project)
        self.register_buffer("project_weight", w.flatten(1).t().float().contiguous())  # [C_mid, C_out]
        self.residual = block.residual
        self.output_bias = b + input_bias if self.residual and input_bias is not None else b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dw(self.expand(x) if self.expand is not None else x)
        n, c, h, w = out.shape
        flat = _nhwc(out)
        # Spatial mean as a GEMV: reductions over channels_last bf16 are several times slower on CPU.
        mean = torch.bmm(flat.new_full((n, 1, h * w), 1.0 / (h * w)), flat).view(n, c)
        s = F.silu(F.linear(mean, self.se_reduce_weight, self.se_reduce_bias))
        gate = torch.sigmoid(F.linear(s, self.se_expand_weight, self.se_expand_bias)).view(n, c, 1)
        weight = gate * self.project_weight  # [N, C_mid, C_out]: x * gate @ W == x @ (gate * W)
        y = torch.baddbmm(_nhwc(x), flat, weight) if self.residual else torch.bmm(flat, weight)
        return _nchw(y, h, w)


class FusedEfficientNet(nn.Module):
    """Eval `EfficientNet`: `images [N, 3, H, W] -> [C3, C4, C5]` (channels_last), each owing the deferred
    bias `tap_biases[i]` (see `FusedMBConv`), which the BiFPN's first 1x1 convs fold in."""

    def __init__(self, net: EfficientNet):
        super().__init__()
        self.stem = FrozenConv.from_conv(net.stem.conv, net.stem.bn, True)
        blocks, bias = [], None
        for block in net.blocks:
            blocks.append(FusedMBConv(block, bias))
            bias = blocks[-1].output_bias
        self.blocks = nn.ModuleList(blocks)
        self.tap_indices = list(net.tap_indices)
        self.tap_biases = [self.blocks[i].output_bias for i in self.tap_indices]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return run_tapped(self.stem, self.blocks, self.tap_indices, x)


class FusedResample(nn.Module):
    """Eval `ResampleFeatureMap` times a non-negative scale (folded into the projection when present), of an
    input that may owe a deferred bias (folded into the projection, which backbone taps always have)."""

    def __init__(self, resample: ResampleFeatureMap, scale: float = 1.0, input_bias: torch.Tensor | None = None):
        super().__init__()
        if input_bias is not None and not resample.project:
            raise ValueError("a deferred bias needs a 1x1 projection conv to fold into")
        self.conv = (FrozenConv.from_conv(resample.conv, resample.bn, scale=scale, input_bias=input_bias)
                     if resample.project else None)
        self.scale = 1.0 if resample.project else scale  # left for the fusion sum to apply
        pool: MaxPool2dSame | None = resample.pool
        self.pool = None if pool is None else (pool.kernel_size, pool.stride, pool.padding)
        self.upsample = resample.upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            x = self.conv(x)
        if self.pool is not None:
            x = F.max_pool2d(x, *self.pool, ceil_mode=True)
        elif self.upsample is not None:
            x = F.interpolate(x, scale_factor=float(self.upsample), mode="nearest")
        return x


class FusedFNode(nn.Module):
    """Eval `FNode`: sum of (pre-scaled) resampled inputs -> swish -> dw -> pw+BN."""

    def __init__(self, node: FNode, input_biases: list[torch.Tensor | None]):
        super().__init__()
        n = len(node.resample)
        if node.edge_weights is None:
            weights = [1.0] * n
        else:
            w = F.relu(node.edge_weights.detach().double())
            weights = (w / (w.sum() + FUSION_EPS)).tolist()
        self.resample = nn.ModuleList(FusedResample(*args) for args in zip(node.resample, weights, input_biases))
        self.dw = FrozenConv.from_conv(node.conv.conv_dw)
        self.pw = FrozenConv.from_conv(node.conv.conv_pw, node.bn)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        terms = [(resample(x), resample.scale) for resample, x in zip(self.resample, inputs)]
        # Start from a term whose scale is already folded in: one pass makes the (private) accumulator.
        terms.sort(key=lambda t: t[1] != 1.0)
        (base, s0), (x1, s1) = terms[:2]
        out = torch.add(base if s0 == 1.0 else base * s0, x1, alpha=s1)
        for x, s in terms[2:]:
            out.add_(x, alpha=s)
        return self.pw(self.dw(F.silu(out, inplace=True)))


class FusedBiFPN(nn.Module):
    """Eval `BiFPN`: `[C3, C4, C5]` (owing `input_biases`) `-> [P3 .. P_max]`, graph of the source cells."""

    def __init__(self, fpn: BiFPN, input_biases: list[torch.Tensor]):
        super().__init__()
        self.extra_levels = nn.ModuleList(
            FusedResample(r, input_bias=input_biases[-1] if i == 0 else None) for i, r in enumerate(fpn.extra_levels))
        # Only the first cell reads the backbone taps (offsets < len(input_biases)).
        owed = lambda offsets, cell: [input_biases[i] if cell == 0 and i < len(input_biases) else None
                                      for i in offsets]
        self.cells = nn.ModuleList(nn.ModuleList(FusedFNode(n, owed(offsets, c)) for n, offsets in
                                                 zip(cell.nodes, cell.inputs)) for c, cell in enumerate(fpn.cells))
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
            nn.ModuleList(FrozenConv.from_conv(c.conv_pw, bn, swish=True) for bn in bns)
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
        check_image_size(images.shape[2], images.shape[3], self.config.size_divisor, self.config.name)
        x = images.to(self.dtype, memory_format=torch.channels_last)
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

    precision: "fp32", "bf16" (fast on CPUs with AMX / AVX512-BF16) or "fp16" (GPUs).
    fuse: BN folding and fused kernels (`FusedEfficientDet`, always NHWC); False keeps the plain module
        (eval mode, autocast for bf16/fp16), which is mainly useful to measure what fusing buys.
    channels_last: NHWC memory layout for the unfused module (the fused one always is).
    compile: also `torch.compile` the result (falls back to eager with a warning where it fails). On the
        2-core CPU measured in `benchmarks/speed.py` it takes minutes to compile and is not faster.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    device = next(model.parameters()).device
    if fuse:
        module = FusedEfficientDet(model, dtype).to(device)
    else:
        module = copy.deepcopy(model).eval().requires_grad_(False)
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        if dtype != torch.float32:
            module = _Autocast(module, dtype)
    return _CompileOrEager(module) if compile else module
