"""The variant table: the single source of truth for EfficientDet D0-D7x, Lite0-Lite4 and their backbones.

Values come from the official `efficientdet/hparams_config.py` (`efficientdet_model_param_dict`,
`efficientdet_lite_param_dict`), `efficientdet/backbone/efficientnet_builder.py` (`efficientnet_params`,
`_DEFAULT_BLOCKS_ARGS`) and `efficientdet/backbone/efficientnet_lite_builder.py`. Nothing else in the
project hard-codes widths, depths, sizes, levels, activations or the input normalisation.
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
    use_se: bool = True  # Lite: no squeeze-excite ("not well supported on many lite devices")
    fix_head_stem: bool = False  # Lite: stem width and the repeats of the first / last stage are not scaled

    def stem_width(self) -> int:
        return self.stem_filters if self.fix_head_stem else self.round_filters(self.stem_filters)

    def stage_repeats(self, stage: int, repeats: int) -> int:
        """Repeats of block stage `stage` (official `Model._build`: with fix_head_stem the first and last
        stages keep their repeats)."""
        if self.fix_head_stem and stage in (0, len(EFFICIENTNET_BLOCKS) - 1):
            return repeats
        return self.round_repeats(repeats)

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
    # EfficientDet builds its backbone with the builder's default survival_prob 0.8, except where
    # `efficientdet_keras` finds 'b0' in the name and overrides it to 0.0 (no drop-connect; not lite0).
    lite = "-lite" in name  # `efficientnet_lite_builder.efficientnet_lite`: use_se=False, fix_head_stem=True
    return EfficientNetConfig(name, width, depth, survival_prob=0.0 if "b0" in name else 0.8,
                              use_se=not lite, fix_head_stem=lite)


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
        _backbone("efficientnet-lite0", 1.0, 1.0),
        _backbone("efficientnet-lite1", 1.0, 1.1),
        _backbone("efficientnet-lite2", 1.1, 1.2),
        _backbone("efficientnet-lite3", 1.2, 1.4),
        _backbone("efficientnet-lite4", 1.4, 1.8),
    )
}

# official hparams_config.py `mean_rgb` / `stddev_rgb`: ImageNet statistics x 255 (per channel, RGB)
IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# Lite (`lite_common_param`): inception-style scalars, "for better post-quantization"
LITE_MEAN_RGB, LITE_STDDEV_RGB = 127.0, 128.0

ACTIVATIONS = ("swish", "relu6")  # official `utils.activation_fn` names used by the variants


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
    act_type: str = "swish"  # everywhere: backbone (the official `relu_fn` override), BiFPN, heads
    # Input normalisation (x - mean_rgb) / stddev_rgb on 0..255 RGB: a scalar or one value per channel.
    mean_rgb: float | tuple[float, float, float] = IMAGENET_MEAN_RGB
    stddev_rgb: float | tuple[float, float, float] = IMAGENET_STDDEV_RGB

    def __post_init__(self):
        if self.act_type not in ACTIVATIONS:
            raise ValueError(f"act_type {self.act_type!r}: expected one of {', '.join(ACTIVATIONS)}")

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
        """The stride of the coarsest level: inputs whose sides are multiples of it have exact 2x pyramids."""
        return 2 ** self.max_level

    @property
    def image_hw(self) -> tuple[int, int]:
        """The official input size as (height, width)."""
        return parse_image_size(self.image_size)

    @property
    def is_lite(self) -> bool:
        return "-lite" in self.backbone_name

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


def _lite(name: str, backbone: str, image_size: int, filters: int, cells: int, repeats: int,
          anchor_scale: float) -> EfficientDetConfig:
    # `lite_common_param`: sum fusion, relu6, inception-style normalisation (anchor_scale 3.0 except
    # lite3 / lite4, which override it back to 4.0).
    return EfficientDetConfig(name, backbone, image_size, filters, cells, repeats, anchor_scale=anchor_scale,
                              fpn_weight_method="sum", act_type="relu6", mean_rgb=LITE_MEAN_RGB,
                              stddev_rgb=LITE_STDDEV_RGB)


VARIANTS.update((cfg.name, cfg) for cfg in (
    _lite("efficientdet-lite0", "efficientnet-lite0", 320, 64, 3, 3, 3.0),
    _lite("efficientdet-lite1", "efficientnet-lite1", 384, 88, 4, 3, 3.0),
    _lite("efficientdet-lite2", "efficientnet-lite2", 448, 112, 5, 3, 3.0),
    _lite("efficientdet-lite3", "efficientnet-lite3", 512, 160, 6, 4, 4.0),
    _lite("efficientdet-lite3x", "efficientnet-lite3", 640, 200, 6, 4, 3.0),
    _lite("efficientdet-lite4", "efficientnet-lite4", 640, 224, 7, 4, 4.0),
))


def parse_image_size(image_size) -> tuple[int, int]:
    """Official `utils.parse_image_size`: an int S -> (S, S); a "WxH" string (width first, as the official
    code splits it: "640x384" is 640 wide and 384 high) -> (H, W); an (H, W) pair -> itself.

    Raises a ValueError naming the expected forms for anything else (sizes themselves are checked by
    `model.efficientdet.validate_image_size`).
    """
    if isinstance(image_size, str):
        parts = image_size.lower().split("x")
        if len(parts) in (1, 2) and all(p.strip().lstrip("+-").isdigit() for p in parts):
            values = [int(p) for p in parts]
            return (values[0], values[0]) if len(values) == 1 else (values[1], values[0])
    elif isinstance(image_size, int) and not isinstance(image_size, bool):
        return image_size, image_size
    elif (isinstance(image_size, (tuple, list)) and len(image_size) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in image_size)):
        return int(image_size[0]), int(image_size[1])
    raise ValueError(f"image size {image_size!r}: expected an integer S (S x S) or 'WxH' (width x height, "
                     f"e.g. 640x384)")


def get_config(name: str, **overrides) -> EfficientDetConfig:
    """The config of variant `name` (e.g. "efficientdet-d0"), with optional field overrides."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(VARIANTS)}")
    cfg = VARIANTS[name]
    return cfg.replace(**overrides) if overrides else cfg
