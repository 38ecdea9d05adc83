"""The variant table: the single source of truth for EfficientDet D0-D7x and their backbones.

Values come from the official `efficientdet/hparams_config.py` (`efficientdet_model_param_dict`)
and `efficientdet/backbone/efficientnet_builder.py` (`efficientnet_params`, `_DEFAULT_BLOCKS_ARGS`).
Nothing else in the project hard-codes widths, depths, sizes or levels.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# Official BN settings (TF momentum 0.99 -> PyTorch momentum 1 - 0.99 = 0.01).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


@dataclass(frozen=True)
class BlockArgs:
    """One stage of MBConv blocks, as in the official block strings (before compound scaling)."""

    num_repeat: int
    kernel_size: int
    stride: int
    expand_ratio: int
    input_filters: int
    output_filters: int
    se_ratio: float = 0.25


# `_DEFAULT_BLOCKS_ARGS` of efficientnet_builder.py: r1_k3_s11_e1_i32_o16_se0.25, ...
EFFICIENTNET_BLOCKS = (
    BlockArgs(1, 3, 1, 1, 32, 16),
    BlockArgs(2, 3, 2, 6, 16, 24),
    BlockArgs(2, 5, 2, 6, 24, 40),
    BlockArgs(3, 3, 2, 6, 40, 80),
    BlockArgs(3, 5, 1, 6, 80, 112),
    BlockArgs(4, 5, 2, 6, 112, 192),
    BlockArgs(1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class EfficientNetConfig:
    """Compound-scaling coefficients of one EfficientNet backbone (`efficientnet_params`)."""

    name: str
    width_coefficient: float
    depth_coefficient: float
    survival_prob: float  # drop-connect survival of the last block; 0.0 disables drop-connect
    stem_filters: int = 32
    depth_divisor: int = 8

    def round_filters(self, filters: int) -> int:
        """Width scaling exactly as official `round_filters` (never rounds down by more than 10%)."""
        scaled = filters * self.width_coefficient
        new = max(self.depth_divisor, int(scaled + self.depth_divisor / 2) // self.depth_divisor * self.depth_divisor)
        if new < 0.9 * scaled:
            new += self.depth_divisor
        return int(new)

    def round_repeats(self, repeats: int) -> int:
        """Depth scaling exactly as official `round_repeats` (ceil)."""
        return int(math.ceil(self.depth_coefficient * repeats))


def _backbone(name: str, width: float, depth: float) -> EfficientNetConfig:
    # EfficientDet builds its backbone with the builder's default survival_prob 0.8, except B0 where
    # `efficientdet_arch.build_backbone` / `efficientdet_keras` override it to 0.0 (no drop-connect).
    return EfficientNetConfig(name, width, depth, survival_prob=0.0 if name.endswith("b0") else 0.8)


BACKBONES = {
    cfg.name: cfg
    for cfg in (
        _backbone("efficientnet-b0", 1.0, 1.0),
        _backbone("efficientnet-b1", 1.0, 1.1),
        _backbone("efficientnet-b2", 1.1, 1.2),
        _backbone("efficientnet-b3", 1.2, 1.4),
        _backbone("efficientnet-b4", 1.4, 1.8),
        _backbone("efficientnet-b5", 1.6, 2.2),
        _backbone("efficientnet-b6", 1.8, 2.6),
        _backbone("efficientnet-b7", 2.0, 3.1),
    )
}


@dataclass(frozen=True)
class EfficientDetConfig:
    """Hyper-parameters of one EfficientDet variant (official defaults + per-variant overrides)."""

    name: str
    backbone_name: str
    image_size: int
    fpn_num_filters: int
    fpn_cell_repeats: int
    box_class_repeats: int
    anchor_scale: float = 4.0
    min_level: int = 3
    max_level: int = 7
    fpn_weight_method: str = "fastattn"  # "fastattn" (fast normalized fusion) or "sum"
    num_classes: int = 90
    num_scales: int = 3
    aspect_ratios: tuple[float, ...] = (1.0, 2.0, 0.5)  # width / height

    @property
    def backbone(self) -> EfficientNetConfig:
        return BACKBONES[self.backbone_name]

    @property
    def num_levels(self) -> int:
        return self.max_level - self.min_level + 1

    @property
    def num_anchors(self) -> int:
        """Anchors per feature-map location."""
        return self.num_scales * len(self.aspect_ratios)

    @property
    def size_divisor(self) -> int:
        """Input sides must be multiples of this (the stride of the coarsest level)."""
        return 2 ** self.max_level

    def replace(self, **changes) -> "EfficientDetConfig":
        return dataclasses.replace(self, **changes)


VARIANTS = {
    cfg.name: cfg
    for cfg in (
        EfficientDetConfig("efficientdet-d0", "efficientnet-b0", 512, 64, 3, 3),
        EfficientDetConfig("efficientdet-d1", "efficientnet-b1", 640, 88, 4, 3),
        EfficientDetConfig("efficientdet-d2", "efficientnet-b2", 768, 112, 5, 3),
        EfficientDetConfig("efficientdet-d3", "efficientnet-b3", 896, 160, 6, 4),
        EfficientDetConfig("efficientdet-d4", "efficientnet-b4", 1024, 224, 7, 4),
        EfficientDetConfig("efficientdet-d5", "efficientnet-b5", 1280, 288, 7, 4),
        EfficientDetConfig("efficientdet-d6", "efficientnet-b6", 1280, 384, 8, 5, fpn_weight_method="sum"),
        EfficientDetConfig("efficientdet-d7", "efficientnet-b6", 1536, 384, 8, 5, anchor_scale=5.0,
                           fpn_weight_method="sum"),
        EfficientDetConfig("efficientdet-d7x", "efficientnet-b7", 1536, 384, 8, 5, max_level=8,
                           fpn_weight_method="sum"),
    )
}


def get_config(name: str, **overrides) -> EfficientDetConfig:
    """The config of variant `name` (e.g. "efficientdet-d0"), with optional field overrides."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(VARIANTS)}")
    cfg = VARIANTS[name]
    return cfg.replace(**overrides) if overrides else cfg
