"""EfficientNet B0-B7 and Lite0-Lite4 feature extractor, as built by the official `backbone/efficientnet_model.py`.

Only the stem and the MBConv blocks exist: EfficientDet never uses the 1x1 head conv or the classifier,
and the official parameter counts do not include them. Lite backbones (`efficientnet_lite_builder.py`) have
no squeeze-excite and keep the stem width and the first / last stage repeats unscaled; their activation,
like every backbone's inside EfficientDet, is the detector's `act_type` (official `relu_fn` override).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import EFFICIENTNET_BLOCKS, EfficientNetConfig
from .layers import (Conv2dSame, batch_norm, bn_act, checkpointed, drop_connect, init_efficientnet_conv_,
                     squeeze_excite_project)


class SqueezeExcite(nn.Module):
    """1x1 (+bias) -> swish -> 1x1 (+bias) -> sigmoid: spatial mean `[N, C, 1, 1]` -> gate `[N, C, 1, 1]`.

    The block pools, gates and projects in `squeeze_excite_project`.
    """

    def __init__(self, channels: int, reduced_channels: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced_channels, 1)
        self.conv_expand = nn.Conv2d(reduced_channels, channels, 1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv_expand(F.silu(self.conv_reduce(pooled))))


class Stem(nn.Module):
    """Conv 3x3/2 (TF 'SAME', no bias) -> BN -> act: `[N, 3, H, W] -> [N, C, ceil(H / 2), ceil(W / 2)]`."""

    def __init__(self, out_channels: int, act_type: str = "swish"):
        super().__init__()
        self.conv = Conv2dSame(3, out_channels, 3, 2, bias=False)
        self.bn = batch_norm(out_channels)
        self.act_type = act_type

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return bn_act(self.bn, self.conv(images), self.act_type)


class MBConvBlock(nn.Module):
    """Inverted residual: [expand 1x1 -> BN -> act] -> depthwise kxk/s -> BN -> act -> [SE]
    -> project 1x1 -> BN -> (+ drop-connected input when stride 1 and channels match; no activation).

    Convs carry no bias (official `use_bias=False`); only the SE convs do. `se_ratio` None: no SE (Lite).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 expand_ratio: int, se_ratio: float | None, survival_prob: float, act_type: str = "swish"):
        super().__init__()
        mid = in_channels * expand_ratio
        self.expand = expand_ratio != 1
        if self.expand:
            self.conv_expand = nn.Conv2d(in_channels, mid, 1, bias=False)
            self.bn_expand = batch_norm(mid)
        self.conv_dw = Conv2dSame(mid, mid, kernel_size, stride, groups=mid, bias=False)
        self.bn_dw = batch_norm(mid)
        # The squeeze width is a fraction of the block's *input* filters, not of the expanded width.
        self.se = SqueezeExcite(mid, max(1, int(in_channels * se_ratio))) if se_ratio else None
        self.conv_project = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.bn_project = batch_norm(out_channels)
        self.residual = stride == 1 and in_channels == out_channels
        self.survival_prob = survival_prob
        self.act_type = act_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand:
            out = bn_act(self.bn_expand, self.conv_expand(out), self.act_type)
        out = bn_act(self.bn_dw, self.conv_dw(out), self.act_type)
        if self.se is None:
            out = self.bn_project(self.conv_project(out))
        else:
            out = self.bn_project(squeeze_excite_project(out, self.se, self.conv_project.weight))
        if self.residual:
            # survival_prob 0.0 means "no drop-connect" in the official code (B0 in EfficientDet).
            if self.survival_prob:
                out = drop_connect(out, self.survival_prob, self.training)
            out = out + x
        return out


class EfficientNet(nn.Module):
    """Stem (conv 3x3/2 -> BN -> act) and the scaled MBConv blocks.

    `forward(images [N, 3, H, W]) -> [C3, C4, C5]`: the outputs of the last block of stride 8, 16 and 32
    (official endpoints `reduction_3..5`), `[N, channels[i], H_i, W_i]` with `H_i = ceil(H / 2^(i+3))`
    (TF 'SAME' strided convs).
    act_type: "swish" or "relu6" (EfficientDet passes its own `act_type`, as the official code does).
    """

    def __init__(self, config: EfficientNetConfig, act_type: str = "swish"):
        super().__init__()
        self.config = config
        stem_width = config.stem_width()
        self.stem = Stem(stem_width, act_type)

        stages = []
        for s, args in enumerate(EFFICIENTNET_BLOCKS):
            in_ch, out_ch = config.round_filters(args.input_filters), config.round_filters(args.output_filters)
            if s == 0:
                # Keras builds the first block on the stem's real output, which fix_head_stem leaves unscaled.
                in_ch = stem_width
            for i in range(config.stage_repeats(s, args.num_repeat)):
                # Repeats after the first keep the width and stride 1.
                stages.append((in_ch if i == 0 else out_ch, out_ch, args.kernel_size,
                               args.stride if i == 0 else 1, args.expand_ratio,
                               args.se_ratio if config.use_se else None))
        n = len(stages)
        drop_rate = 1.0 - config.survival_prob
        self.blocks = nn.ModuleList(
            # Official: survival decays linearly with the global block index, 1.0 for the first block.
            MBConvBlock(*stage, survival_prob=(1.0 - drop_rate * i / n) if config.survival_prob else 0.0,
                        act_type=act_type)
            for i, stage in enumerate(stages)
        )
        # A block is a feature tap when it is the last one before a stride-2 block or the last of all;
        # taps come at strides 2, 4, 8, 16, 32 and EfficientDet uses the last three.
        taps = [i for i in range(n) if i == n - 1 or stages[i + 1][3] > 1]
        self.tap_indices = taps[-3:]
        self.out_channels = [stages[i][1] for i in self.tap_indices]
        self.grad_checkpointing = False  # see EfficientDet.set_grad_checkpointing
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                init_efficientnet_conv_(m)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        return run_tapped(self.stem, self.blocks, self.tap_indices, images, checkpoint)


def run_tapped(stem: nn.Module, blocks: nn.ModuleList, tap_indices: list[int], images: torch.Tensor,
               checkpoint: bool = False) -> list[torch.Tensor]:
    """Stem then blocks, returning the outputs of the blocks in `tap_indices` (shared with the fused copy).

    checkpoint: run every block through `checkpointed` (activations recomputed in backward).
    """
    x = stem(images)
    features = []
    for i, block in enumerate(blocks):
        x = checkpointed(block, x) if checkpoint else block(x)
        if i in tap_indices:
            features.append(x)
    return features
