"""Box-content operations of the official detection AutoAugment: the `*_Only_BBoxes` ops and `BBox_Cutout`.

Images: RGB uint8 `[H, W, 3]`; boxes: float32 `[K, 4]` normalised yxyx. These ops change pixels only; boxes
come back unchanged. Randomness from a `numpy.random.Generator` (or an object with its `random()`,
`integers(low, high)` and `permutation(n)` methods).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .autoaugment_geometry import _pixel_corners
from .autoaugment_ops import cutout_mask_fill

_F32 = np.float32
# Official `_scale_bbox_only_op_probability`: the policy probability is divided by 3 and applied per box, so
# that not too many neighbouring boxes are distorted at once.
BOX_ONLY_PROB_DIVISOR = 3.0


def box_content_slices(box: np.ndarray, height: int, width: int) -> tuple[slice, slice]:
    """Official `_apply_bbox_augmentation` crop of one normalised box: rows `int(H * ymin)` ..
    `min(int(H * ymax), H - 1)` inclusive, columns likewise."""
    min_y, min_x, max_y, max_x = (int(v[0]) for v in _pixel_corners(box[None], height, width))
    return slice(min_y, min(max_y, height - 1) + 1), slice(min_x, min(max_x, width - 1) + 1)


def applies(u: float, prob: float) -> bool:
    """Official apply test `floor(u + prob)` cast to bool, in float32 (u ~ U[0, 1), so: with probability prob)."""
    return bool(np.floor(_F32(u) + _F32(prob)) != 0)


def apply_to_each_box(image: np.ndarray, boxes: np.ndarray, prob: float, func: Callable, *args, rng
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Official `_apply_multi_bbox_augmentation` for ops that do not move boxes.

    Boxes are visited in a random order (`rng.permutation(K)`, the official `tf.random.shuffle`); each box
    draws `u = rng.random()` and, when `applies(u, prob / 3)`, its content is replaced by `func(content, *args)`
    (the op sees only the crop, e.g. rotates about the crop centre). Later boxes see earlier boxes' changes.
    `func` takes `rng=` when it is random itself (cutout). Returns a new image and the unchanged boxes.
    """
    boxes = np.asarray(boxes, dtype=_F32).reshape(-1, 4)
    out = np.array(image, dtype=np.uint8)
    height, width = out.shape[:2]
    per_box = prob / BOX_ONLY_PROB_DIVISOR
    for k in rng.permutation(len(boxes)):
        if not applies(rng.random(), per_box):
            continue
        rows, cols = box_content_slices(boxes[k], height, width)
        content = out[rows, cols]
        if content.size == 0:  # a box on the bottom / right border edge has no pixel
            continue
        out[rows, cols] = func(content, *args)
    return out, boxes


def bbox_cutout(image: np.ndarray, boxes: np.ndarray, pad_fraction: float, replace_with_mean: bool, rng
                ) -> tuple[np.ndarray, np.ndarray]:
    """Official `bbox_cutout`: cutout centred inside one random box, sized by that box.

    Draws: box index `rng.integers(0, K)`, centre row `rng.integers(min_y, max_y + 1)`, centre column
    `rng.integers(min_x, max_x + 1)` (box corners `int(H * ymin)` etc., not clipped). Half-sizes
    `int(pad_fraction * (box_h / 2))` with `box_h = max_y - min_y + 1` (float64, as TF's int32 true division).
    Fill: 128, or with `replace_with_mean` the per-channel mean of the box content (TF reduces uint8 in
    uint64 and divides as integers, so the mean is floored).
    """
    boxes = np.asarray(boxes, dtype=_F32).reshape(-1, 4)
    if len(boxes) == 0:
        return np.array(image, dtype=np.uint8), boxes
    height, width = image.shape[:2]
    chosen = boxes[int(rng.integers(0, len(boxes)))]
    min_y, min_x, max_y, max_x = (int(v[0]) for v in _pixel_corners(chosen[None], height, width))
    pad_y = int(pad_fraction * ((max_y - min_y + 1) / 2))
    pad_x = int(pad_fraction * ((max_x - min_x + 1) / 2))
    centre_y = int(rng.integers(min_y, max_y + 1))
    centre_x = int(rng.integers(min_x, max_x + 1))
    if replace_with_mean:
        region = image[min_y:max_y + 1, min_x:max_x + 1].reshape(-1, image.shape[2]).astype(np.uint64)
        fill = (region.sum(axis=0) // np.uint64(max(len(region), 1))).astype(np.uint8)
    else:
        fill = np.uint8(128)
    return cutout_mask_fill(image, (centre_y, centre_x), (pad_y, pad_x), fill), boxes
