"""Class and box prediction heads, official `tf2/efficientdet_keras.py` `ClassNet` / `BoxNet`."""
from __future__ import annotations

import math

import torch
from torch import nn

from .layers import SeparableConv2d, batch_norm, bn_act, init_variance_scaling_


class HeadNet(nn.Module):
    """`repeats` x (separable conv 3x3 + bias -> BN -> act), then a separable prediction conv + bias.

    The conv weights are shared by all levels but each level has its own BNs (`bns[repeat][level]`).
    `forward([P3 .. P_max])` -> one `[N, A * K, H_l, W_l]` tensor per level, channel `a * K + k`
    (anchor-major), where K = num_outputs (classes, or 4 box deltas (ty, tx, th, tw)).
    """

    def __init__(self, channels: int, num_levels: int, repeats: int, num_anchors: int, num_outputs: int,
                 prior_probability: float | None = None, act_type: str = "swish"):
        super().__init__()
        self.act_type = act_type
        self.convs = nn.ModuleList(SeparableConv2d(channels, channels, 3) for _ in range(repeats))
        self.bns = nn.ModuleList(
            nn.ModuleList(batch_norm(channels) for _ in range(num_levels)) for _ in range(repeats))
        self.predict = SeparableConv2d(channels, num_anchors * num_outputs, 3)
        self.prior_probability = prior_probability
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                init_variance_scaling_(m)
        if self.prior_probability is not None:
            # Official class bias: -log((1 - pi) / pi), so every anchor starts at probability pi.
            p = self.prior_probability
            nn.init.constant_(self.predict.conv_pw.bias, -math.log((1 - p) / p))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        for level, x in enumerate(features):
            for conv, bns in zip(self.convs, self.bns):
                x = bn_act(bns[level], conv(x), self.act_type)
            outputs.append(self.predict(x))
        return outputs
