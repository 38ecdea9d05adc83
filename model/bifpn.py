"""BiFPN as built by the official `tf2/efficientdet_keras.py` (`ResampleFeatureMap`, `FNode`, `FPNCell`).

All feature maps are `[N, C, H_l, W_l]`; lists of levels run P_min ... P_max. `H_l` is the official
`get_feat_sizes` size, `H_l = ceil(H_{l-1} / 2)` (= H / 2^l when H is a multiple of 2^max_level).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import EfficientDetConfig
from .layers import MaxPool2dSame, SeparableConv2d, activation, batch_norm, checkpointed, init_glorot_uniform_

FUSION_EPS = 1e-4  # official fast-attention epsilon


def bifpn_nodes(min_level: int, max_level: int) -> list[tuple[int, list[int]]]:
    """Nodes of one BiFPN cell as (level, input offsets), official `bifpn_config`.

    Offsets index the growing list [P_min .. P_max inputs, node 0 output, node 1 output, ...].
    Top-down: each level fuses itself with the level above; bottom-up: each level fuses every node it
    already has with the level below.
    """
    ids = {level: [i] for i, level in enumerate(range(min_level, max_level + 1))}
    next_id = max_level - min_level + 1
    nodes = []

    def add(level: int, inputs: list[int]) -> None:
        nonlocal next_id
        nodes.append((level, inputs))
        ids[level].append(next_id)
        next_id += 1

    for level in range(max_level - 1, min_level - 1, -1):
        add(level, [ids[level][-1], ids[level + 1][-1]])
    for level in range(min_level + 1, max_level + 1):
        add(level, ids[level] + [ids[level - 1][-1]])
    return nodes


class ResampleFeatureMap(nn.Module):
    """Bring a feature map to another level and width: [1x1 conv (+bias) -> BN when the width differs],
    then max-pool (kernel stride+1, TF 'SAME') down or nearest-neighbour up.
    `forward(x [N, C_in, H, W], size (H_t, W_t)) -> [N, C_out, H_t, W_t]` (`size` is needed to go up only).

    Up: official `tf.compat.v1.image.resize_nearest_neighbor` to the target size, source index
    `floor(dst * in / out)` (= `F.interpolate(mode="nearest", size=...)`): a plain 2x repeat only for exact
    halvings (P7 3x3 -> P6 5x5 takes rows [0, 0, 1, 1, 2]). Down: the pool's TF 'SAME' output is the next
    level's size for any input (a 1x1 map pools to itself, as the official code leaves it).
    `pool` / `upsample` (the stride / factor for sides that are multiples of 2^max_level) say which way.
    """

    def __init__(self, in_channels: int, out_channels: int, in_level: int, out_level: int):
        super().__init__()
        self.project = in_channels != out_channels
        if self.project:
            self.conv = nn.Conv2d(in_channels, out_channels, 1)
            self.bn = batch_norm(out_channels)
        self.pool = MaxPool2dSame(2 ** (out_level - in_level)) if out_level > in_level else None
        self.upsample = 2 ** (in_level - out_level) if out_level < in_level else None

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.project:
            x = self.bn(self.conv(x))
        if self.pool is not None:
            x = self.pool(x)
        elif self.upsample is not None:
            if size is None:
                raise ValueError("ResampleFeatureMap: upsampling needs the target size")
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return x


class FNode(nn.Module):
    """One BiFPN node: resample its inputs, fuse them, then act -> separable conv 3x3 (+bias) -> BN.

    Fusion `fastattn`: out = sum_i relu(w_i) * x_i / (sum_j relu(w_j) + 1e-4); `sum`: plain sum.
    Every node reads its own level among its inputs (bifpn_nodes), whose size the others are resampled to.
    """

    def __init__(self, in_channels: list[int], in_levels: list[int], level: int, channels: int,
                 weight_method: str, act_type: str = "swish"):
        super().__init__()
        if weight_method not in ("fastattn", "sum"):
            raise ValueError(f"fpn_weight_method {weight_method!r}: expected 'fastattn' or 'sum'")
        self.resample = nn.ModuleList(
            ResampleFeatureMap(c, channels, lvl, level) for c, lvl in zip(in_channels, in_levels))
        # One scalar per input edge (official WSM, WSM_1, ...), initialised to one.
        self.edge_weights = nn.Parameter(torch.ones(len(in_channels))) if weight_method == "fastattn" else None
        self.conv = SeparableConv2d(channels, channels, 3)
        self.bn = batch_norm(channels)
        self.act_type = act_type
        self.same_level = in_levels.index(level)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        size = inputs[self.same_level].shape[-2:]
        nodes = [resample(x, size) for resample, x in zip(self.resample, inputs)]
        if self.edge_weights is None:
            out = torch.stack(nodes).sum(0)
        else:
            w = F.relu(self.edge_weights)
            w = w / (w.sum() + FUSION_EPS)
            out = nodes[0] * w[0]
            for i in range(1, len(nodes)):
                out = out + nodes[i] * w[i]
        return self.bn(self.conv(activation(out, self.act_type)))


class BiFPNCell(nn.Module):
    """One BiFPN repeat: runs the nodes of `bifpn_nodes` and returns, per level, its last node.

    In the first cell the backbone levels still have backbone widths, so a level read by two nodes is
    projected twice, with separate weights (official `resample_0_1_7` and `resample_0_1_9` for P4).
    """

    def __init__(self, in_channels: list[int], min_level: int, max_level: int, channels: int,
                 weight_method: str, act_type: str = "swish"):
        super().__init__()
        levels = list(range(min_level, max_level + 1))
        widths = list(in_channels)
        self.inputs = []
        nodes = []
        for level, offsets in bifpn_nodes(min_level, max_level):
            nodes.append(FNode([widths[i] for i in offsets], [levels[i] for i in offsets], level, channels,
                               weight_method, act_type))
            self.inputs.append(offsets)
            levels.append(level)
            widths.append(channels)
        self.nodes = nn.ModuleList(nodes)
        # Index of each level's last node in the list of all features.
        self.outputs = [max(i for i, lvl in enumerate(levels) if lvl == level)
                        for level in range(min_level, max_level + 1)]

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        feats = list(features)
        for node, offsets in zip(self.nodes, self.inputs):
            feats.append(node([feats[i] for i in offsets]))
        return [feats[i] for i in self.outputs]


class BiFPN(nn.Module):
    """Extra levels above the backbone, then `fpn_cell_repeats` BiFPN cells.

    `forward([C3, C4, C5]) -> [P3, ..., P_max]`, every level `[N, fpn_num_filters, H_l, W_l]`.
    """

    def __init__(self, config: EfficientDetConfig, backbone_channels: list[int]):
        super().__init__()
        c = config.fpn_num_filters
        backbone_levels = len(backbone_channels)
        top = config.min_level + backbone_levels - 1
        # P6 = resample_p6(C5): 1x1 conv + BN + pool; P7, (P8) = pool of the level below (already width c).
        self.extra_levels = nn.ModuleList(
            ResampleFeatureMap(backbone_channels[-1] if level == top + 1 else c, c, level - 1, level)
            for level in range(top + 1, config.max_level + 1))
        widths = list(backbone_channels) + [c] * len(self.extra_levels)
        self.cells = nn.ModuleList(
            BiFPNCell(widths if i == 0 else [c] * config.num_levels, config.min_level, config.max_level, c,
                      config.fpn_weight_method, config.act_type)
            for i in range(config.fpn_cell_repeats))
        self.grad_checkpointing = False  # see EfficientDet.set_grad_checkpointing
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                init_glorot_uniform_(m)

    def add_extra_levels(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """`[C3, C4, C5] -> [C3, C4, C5, P6_in, P7_in, ...]`, the inputs of the first cell."""
        feats = list(features)
        for resample in self.extra_levels:
            feats.append(resample(feats[-1]))
        return feats

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        feats = self.add_extra_levels(features)
        checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for cell in self.cells:
            feats = checkpointed(cell, *feats, as_list=True) if checkpoint else cell(feats)
        return feats
