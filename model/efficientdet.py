"""EfficientDet: EfficientNet backbone + BiFPN + class/box heads, and its factory `build_model`."""
from __future__ import annotations

import torch
from torch import nn

from .anchors import check_feature_pyramid
from .bifpn import BiFPN
from .config import EfficientDetConfig, get_config
from .efficientnet import EfficientNet
from .head import HeadNet

CLASS_PRIOR_PROBABILITY = 0.01


def validate_image_size(config: EfficientDetConfig, image_size: tuple[int, int], name: str = "model") -> None:
    """Raise a ValueError unless the official network accepts `image_size` (H, W) (`check_feature_pyramid`)."""
    check_feature_pyramid(tuple(image_size), config.min_level, config.max_level, name)


class EfficientDet(nn.Module):
    """`forward(images [N, 3, H, W], normalized) -> (cls_outs, box_outs)`, lists over levels P_min..P_max.

    Any H, W the official network accepts (`validate_image_size`); level sizes `model.anchors.feature_sizes`.

    `cls_outs[i]`: `[N, A * num_classes, H_i, W_i]` logits, channel `a * num_classes + c`.
    `box_outs[i]`: `[N, A * 4, H_i, W_i]`, channel `a * 4 + k`, k in (ty, tx, th, tw).
    A = num_scales * len(aspect_ratios), anchor index `scale_idx * len(aspect_ratios) + ratio_idx`.
    This is the official channel layout, so ported TF weights need no re-ordering.
    """

    def __init__(self, config: EfficientDetConfig):
        super().__init__()
        self.config = config
        self.backbone = EfficientNet(config.backbone, config.act_type)
        self.fpn = BiFPN(config, self.backbone.out_channels)
        head_args = (config.fpn_num_filters, config.num_levels, config.box_class_repeats, config.num_anchors)
        self.class_net = HeadNet(*head_args, config.num_classes, prior_probability=CLASS_PRIOR_PROBABILITY,
                                 act_type=config.act_type)
        self.box_net = HeadNet(*head_args, 4, act_type=config.act_type)

    def set_grad_checkpointing(self, enabled: bool = True) -> "EfficientDet":
        """Training memory for time: backbone blocks and BiFPN cells keep only their inputs for backward and
        run their forward again there (`layers.checkpointed`; BN running statistics still updated once)."""
        self.backbone.grad_checkpointing = self.fpn.grad_checkpointing = enabled
        return self

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.config.name}: expected images [N, 3, H, W], got {list(images.shape)}")
        # int(): under torch.jit.trace the sizes are traced 0-dim tensors (the check itself is static)
        validate_image_size(self.config, (int(images.shape[2]), int(images.shape[3])), self.config.name)
        features = self.fpn(self.backbone(images))
        return self.class_net(features), self.box_net(features)


def anchor_rows(output: torch.Tensor, width: int) -> torch.Tensor:
    """One level's head output `[N, A * width, H, W]` -> `[N, H * W * A, width]` (a view if channels_last),
    rows in the anchor order of `AnchorGenerator` (y -> x -> anchor), since channel `a * width + k` is
    anchor-major."""
    return output.permute(0, 2, 3, 1).reshape(output.shape[0], -1, width)


def num_classes_of(cls_outs: list[torch.Tensor], box_outs: list[torch.Tensor]) -> int:
    """Classes per anchor of head outputs (class channels per box channel times 4)."""
    return cls_outs[0].shape[1] // (box_outs[0].shape[1] // 4)


def flatten_outputs(cls_outs: list[torch.Tensor], box_outs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-level head outputs -> `[N, sum_l H_l*W_l*A, C]` logits and `[N, ..., 4]` deltas (`anchor_rows`
    of every level, level after level)."""
    num_classes = num_classes_of(cls_outs, box_outs)
    return (torch.cat([anchor_rows(c, num_classes) for c in cls_outs], 1),
            torch.cat([anchor_rows(b, 4) for b in box_outs], 1))


def build_model(name: str, num_classes: int = 90, **overrides) -> EfficientDet:
    """Build variant `name` ("efficientdet-d0" ... "efficientdet-d7x", "efficientdet-lite0" ... "-lite4",
    "efficientdet-lite3x") with freshly initialised weights.

    `overrides` replace fields of the variant's `EfficientDetConfig` (e.g. `image_size=640`).
    """
    return EfficientDet(get_config(name, num_classes=num_classes, **overrides))
