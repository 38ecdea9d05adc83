"""Anchors and the box coder, as in the official `tf2/anchors.py` and `object_detection/faster_rcnn_box_coder.py`.

Coordinates are **(ymin, xmin, ymax, xmax)** (yxyx) in network-input pixels throughout, and box deltas are
**(ty, tx, th, tw)**, the official order, with no variance scaling.
"""
from __future__ import annotations

import math

import torch

from .config import EfficientDetConfig

BOX_CODER_EPS = 1e-8  # official EPSILON, added to sizes before dividing / taking logs when encoding


def feature_sizes(image_size: tuple[int, int], min_level: int, max_level: int) -> list[tuple[int, int]]:
    """(H_l, W_l) for each level, official `get_feat_sizes`: repeated `(s - 1) // 2 + 1` (= ceil(s / 2), what
    TF 'SAME' strided convs and pools produce), so for sides that are not multiples of 2^max_level the
    strides `H / H_l` are not powers of two (lite0 at 320: P7 3x3, stride 106.67)."""
    h, w = image_size
    sizes = []
    for level in range(max_level + 1):
        if level >= min_level:
            sizes.append((h, w))
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    return sizes


def check_feature_pyramid(image_size: tuple[int, int], min_level: int, max_level: int, name: str) -> None:
    """Raise a ValueError for input sizes the official network cannot build.

    Any positive size works, except one the official `ResampleFeatureMap` refuses ("Incompatible
    Resampling"): going up a level, a map must shrink in both height and width or in neither, so below
    P_max one side may not reach 1 px before the other (e.g. 640 wide, 64 tall: P6 is 1x10).
    """
    h, w = image_size
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
        raise ValueError(f"{name}: input height {h}, width {w}: both sides must be positive integers")
    sizes = feature_sizes(image_size, min_level, max_level)
    for level, (h_l, w_l) in zip(range(min_level, max_level), sizes):
        if (h_l == 1) != (w_l == 1):
            raise ValueError(
                f"{name}: input height {h}, width {w} is not supported by the official network: its P{level} map "
                f"is {h_l} high and {w_l} wide, and a map whose height and width do not both halve cannot be "
                f"resampled to P{level + 1}; sides above {2 ** (max_level - 1)} px always work")


class AnchorGenerator:
    """All anchors of an image size, `[sum_l H_l * W_l * A, 4]` yxyx, flattened level -> y -> x -> anchor.

    Anchor `a = scale_idx * len(aspect_ratios) + ratio_idx`; base size `anchor_scale * stride * 2^(scale_idx /
    num_scales)`; aspect ratio r = w / h gives width `base * sqrt(r)` and height `base / sqrt(r)` (exact
    square roots, not the rounded (1.4, 0.7) tuples of older configs); centres at `stride / 2 + i * stride`.
    Computed in float64 like the official numpy code, returned as float32, cached per size and device.
    """

    def __init__(self, min_level: int, max_level: int, num_scales: int, aspect_ratios: tuple[float, ...],
                 anchor_scale: float):
        self.min_level, self.max_level = min_level, max_level
        self.num_scales, self.aspect_ratios, self.anchor_scale = num_scales, tuple(aspect_ratios), anchor_scale
        self._cache: dict = {}

    @classmethod
    def from_config(cls, config: EfficientDetConfig) -> "AnchorGenerator":
        return cls(config.min_level, config.max_level, config.num_scales, config.aspect_ratios,
                   config.anchor_scale)

    @property
    def num_anchors(self) -> int:
        return self.num_scales * len(self.aspect_ratios)

    def __call__(self, image_size: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
        key = (tuple(image_size), str(device))
        if key not in self._cache:
            self._cache[key] = self._generate(tuple(image_size)).to(device=device, dtype=torch.float32)
        return self._cache[key]

    def _generate(self, image_size: tuple[int, int]) -> torch.Tensor:
        per_level = []
        for h_l, w_l in feature_sizes(image_size, self.min_level, self.max_level):
            stride_y, stride_x = image_size[0] / h_l, image_size[1] / w_l
            half_sizes = []  # [A, 2] half height, half width
            for scale_idx in range(self.num_scales):
                octave = 2 ** (scale_idx / self.num_scales)
                for ratio in self.aspect_ratios:
                    rx = math.sqrt(ratio)
                    half_sizes.append((self.anchor_scale * stride_y * octave / rx / 2,
                                       self.anchor_scale * stride_x * octave * rx / 2))
            half = torch.tensor(half_sizes, dtype=torch.float64)
            cy = stride_y / 2 + torch.arange(h_l, dtype=torch.float64) * stride_y
            cx = stride_x / 2 + torch.arange(w_l, dtype=torch.float64) * stride_x
            centres = torch.stack(torch.meshgrid(cy, cx, indexing="ij"), -1).reshape(-1, 1, 2)  # [HW, 1, 2]
            boxes = torch.cat([centres - half, centres + half], -1)  # [HW, A, 4] yxyx
            per_level.append(boxes.reshape(-1, 4))
        return torch.cat(per_level)


class BoxCoder:
    """Faster R-CNN box coder without scale factors: deltas (ty, tx, th, tw) relative to yxyx anchors.

    Encoding and decoding take the centre of a box in two ways, as the official code does: `encode` (the
    training targets) as `min + (max - min) / 2` (`object_detection/box_list.get_center_coordinates_and_sizes`),
    `decode` (inference) as `(min + max) / 2` (`tf2/anchors.decode_box_outputs`). In float32 the two round
    differently, and the loss sees it: a gt centre that is an anchor centre in exact arithmetic gets a tiny
    non-zero target from the official coder (e.g. tx = -4.2e-8), which the loss's `box_targets != 0` mask keeps.
    """

    @staticmethod
    def _centers_sizes(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ymin, xmin, ymax, xmax = boxes.unbind(-1)
        return (ymin + ymax) / 2, (xmin + xmax) / 2, ymax - ymin, xmax - xmin

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Boxes `[..., 4]` yxyx and anchors `[..., 4]` yxyx -> deltas `[..., 4]` (ty, tx, th, tw).

        Official `faster_rcnn_box_coder._encode`, op for op (float32 in, float32 out bit for bit):
        sizes `max - min`, centres `min + size / 2`, 1e-8 added to the four sizes, then
        `((y - ya) / ha, (x - xa) / wa, log(h / ha), log(w / wa))`.
        """
        (ymin, xmin, ymax, xmax), (ymin_a, xmin_a, ymax_a, xmax_a) = boxes.unbind(-1), anchors.unbind(-1)
        h, w, ha, wa = ymax - ymin, xmax - xmin, ymax_a - ymin_a, xmax_a - xmin_a
        yc, xc, yca, xca = ymin + h / 2, xmin + w / 2, ymin_a + ha / 2, xmin_a + wa / 2
        ha, wa, h, w = ha + BOX_CODER_EPS, wa + BOX_CODER_EPS, h + BOX_CODER_EPS, w + BOX_CODER_EPS
        return torch.stack([(yc - yca) / ha, (xc - xca) / wa, torch.log(h / ha), torch.log(w / wa)], -1)

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Deltas `[..., 4]` (ty, tx, th, tw) and anchors `[..., 4]` yxyx -> boxes `[..., 4]` yxyx.

        Official `decode_box_outputs`: yc = ty * ha + yca, h = exp(th) * ha; no clamping of th/tw.
        """
        yca, xca, ha, wa = self._centers_sizes(anchors)
        ty, tx, th, tw = deltas.unbind(-1)
        yc, xc = ty * ha + yca, tx * wa + xca
        half_h, half_w = torch.exp(th) * ha / 2, torch.exp(tw) * wa / 2
        return torch.stack([yc - half_h, xc - half_w, yc + half_h, xc + half_w], -1)
