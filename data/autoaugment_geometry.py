"""Geometric operations of the official detection AutoAugment, with their box transforms (vectorised numpy).

Images: RGB uint8 `[H, W, 3]`. Boxes: float32 `[K, 4]` normalised (ymin, xmin, ymax, xmax) in [0, 1].

Image warps are the affine maps `rotate`, `translate_x/y` and `shear_x/y` pass to `tfa.image.transform`
(`ImageProjectiveTransformV3`, nearest), reproduced by `autoaugment_warp.affine_nearest`.

Box transforms follow `_rotate_bbox`, `_shift_bbox`, `_shear_bbox`: box corners in integer pixels (truncating
float32 casts), transformed, truncated again, min/max, back to normalised, clipped to [0, 1], and a box whose
height (width) is exactly 0 is widened by `_check_bbox_area`.
"""
from __future__ import annotations

import math

import numpy as np

from .autoaugment_warp import affine_nearest

_F32 = np.float32
_DEG_TO_RAD = math.pi / 180.0


def _radians(degrees) -> _F32:
    """float32 degrees * (pi / 180), as `degrees * degrees_to_radians` with a float32 tensor."""
    return _F32(degrees) * _F32(_DEG_TO_RAD)


def rotate(image: np.ndarray, degrees, replace) -> np.ndarray:
    """Official `rotate` (`tfa.image.rotate`, nearest): positive degrees turn the content counter-clockwise
    on screen about the image centre ((W - 1) / 2, (H - 1) / 2)."""
    height, width = (_F32(v) for v in image.shape[:2])
    angle = _radians(degrees)
    cos, sin = np.cos(angle), np.sin(angle)
    # tfa angles_to_projective_transforms, float32
    x_offset = ((width - _F32(1)) - (cos * (width - _F32(1)) - sin * (height - _F32(1)))) / _F32(2.0)
    y_offset = ((height - _F32(1)) - (sin * (width - _F32(1)) + cos * (height - _F32(1)))) / _F32(2.0)
    return affine_nearest(image, (cos, -sin, x_offset, sin, cos, y_offset), replace)


def translate_x(image: np.ndarray, pixels, replace) -> np.ndarray:
    """`tfa.image.translate(image, [-pixels, 0])`: output(x, y) = input(x + pixels, y) (content moves left)."""
    return affine_nearest(image, (1.0, 0.0, _F32(pixels), 0.0, 1.0, 0.0), replace)


def translate_y(image: np.ndarray, pixels, replace) -> np.ndarray:
    """`tfa.image.translate(image, [0, -pixels])`: output(x, y) = input(x, y + pixels) (content moves up)."""
    return affine_nearest(image, (1.0, 0.0, 0.0, 0.0, 1.0, _F32(pixels)), replace)


def shear_x(image: np.ndarray, level, replace) -> np.ndarray:
    """Transform `[1, level, 0, 0, 1, 0, 0, 0]`: output(x, y) = input(x + level * y, y)."""
    return affine_nearest(image, (1.0, _F32(level), 0.0, 0.0, 1.0, 0.0), replace)


def shear_y(image: np.ndarray, level, replace) -> np.ndarray:
    """Transform `[1, 0, 0, level, 1, 0, 0, 0]`: output(x, y) = input(x, level * x + y)."""
    return affine_nearest(image, (1.0, 0.0, 0.0, _F32(level), 1.0, 0.0), replace)


def _trunc_int(values: np.ndarray) -> np.ndarray:
    """`tf.to_int32` of float32 values: truncation toward zero."""
    return np.trunc(values).astype(np.int64)


def _matvec_row(a0, y: np.ndarray, a1, x: np.ndarray) -> np.ndarray:
    """One row of the official 2x2 `tf.matmul` on float32 corners: `a0 * y + a1 * x` as TF's CPU kernel
    accumulates it, `fma(a1, x, float32(a0 * y))` (the second product is not rounded before the add; the
    fixture shows it: `120 - 0.3f * 300` truncates to 29, not 30). float64 holds the product exactly."""
    first = (_F32(a0) * y).astype(_F32)
    return (np.float64(_F32(a1)) * x.astype(np.float64) + first).astype(_F32)


def _pixel_corners(boxes: np.ndarray, height: int, width: int) -> tuple[np.ndarray, ...]:
    """`[K, 4]` normalised -> min_y, min_x, max_y, max_x `[K]` int pixels: `int(float32(H) * ymin)` etc."""
    scale = np.array([height, width, height, width], dtype=_F32)
    pixels = _trunc_int(boxes.astype(_F32) * scale)
    return tuple(pixels[:, k] for k in range(4))


def clip_and_check_boxes(min_y, min_x, max_y, max_x, delta: float = 0.05) -> np.ndarray:
    """Official `_clip_bbox` + `_check_bbox_area` on `[K]` float32 columns -> `[K, 4]` float32 yxyx."""
    min_y, min_x, max_y, max_x = (np.clip(np.asarray(v, _F32), _F32(0.0), _F32(1.0)) for v in
                                  (min_y, min_x, max_y, max_x))
    flat_y = (max_y - min_y) == 0
    flat_x = (max_x - min_x) == 0
    low, high = _F32(0.0 + delta), _F32(1.0 - delta)
    max_y = np.where(flat_y, np.maximum(max_y, low), max_y)
    min_y = np.where(flat_y, np.minimum(min_y, high), min_y)
    max_x = np.where(flat_x, np.maximum(max_x, low), max_x)
    min_x = np.where(flat_x, np.minimum(min_x, high), min_x)
    return np.stack([min_y, min_x, max_y, max_x], axis=1).astype(_F32)


def rotate_boxes(boxes: np.ndarray, height: int, width: int, degrees) -> np.ndarray:
    """Official `_rotate_bbox`: corners relative to the image centre (y up), rotated, truncated, enclosing box."""
    boxes = boxes.astype(_F32)
    h, w, half = _F32(height), _F32(width), _F32(0.5)
    min_y = -_trunc_int(h * (boxes[:, 0] - half))
    min_x = _trunc_int(w * (boxes[:, 1] - half))
    max_y = -_trunc_int(h * (boxes[:, 2] - half))
    max_x = _trunc_int(w * (boxes[:, 3] - half))
    ys = np.stack([min_y, min_y, max_y, max_y], axis=1).astype(_F32)  # [K, 4 corners]
    xs = np.stack([min_x, max_x, min_x, max_x], axis=1).astype(_F32)
    angle = _radians(degrees)
    cos, sin = np.cos(angle), np.sin(angle)
    new_y = _trunc_int(_matvec_row(cos, ys, sin, xs))  # rotation matrix [[cos, sin], [-sin, cos]] @ (y, x)
    new_x = _trunc_int(_matvec_row(-sin, ys, cos, xs))
    return clip_and_check_boxes(-(new_y.max(1).astype(_F32) / h - half), new_x.min(1).astype(_F32) / w + half,
                                -(new_y.min(1).astype(_F32) / h - half), new_x.max(1).astype(_F32) / w + half)


def shift_boxes(boxes: np.ndarray, height: int, width: int, pixels, horizontal: bool) -> np.ndarray:
    """Official `_shift_bbox`: integer corners minus `int(pixels)`, min clamped at 0, max at the image size."""
    min_y, min_x, max_y, max_x = _pixel_corners(boxes, height, width)
    shift = int(np.trunc(_F32(pixels)))
    if horizontal:
        min_x, max_x = np.maximum(0, min_x - shift), np.minimum(width, max_x - shift)
    else:
        min_y, max_y = np.maximum(0, min_y - shift), np.minimum(height, max_y - shift)
    h, w = _F32(height), _F32(width)
    return clip_and_check_boxes(min_y.astype(_F32) / h, min_x.astype(_F32) / w,
                                max_y.astype(_F32) / h, max_x.astype(_F32) / w)


def shear_boxes(boxes: np.ndarray, height: int, width: int, level, horizontal: bool) -> np.ndarray:
    """Official `_shear_bbox`: integer corners through [[1, 0], [-level, 1]] (x shear) or [[1, -level], [0, 1]]
    (y shear) acting on (y, x), truncated, enclosing box."""
    min_y, min_x, max_y, max_x = _pixel_corners(boxes, height, width)
    ys = np.stack([min_y, min_y, max_y, max_y], axis=1).astype(_F32)
    xs = np.stack([min_x, max_x, min_x, max_x], axis=1).astype(_F32)
    neg = -_F32(level)
    if horizontal:
        new_y, new_x = _trunc_int(ys), _trunc_int(_matvec_row(neg, ys, 1.0, xs))
    else:
        new_y, new_x = _trunc_int(_matvec_row(1.0, ys, neg, xs)), _trunc_int(xs)
    h, w = _F32(height), _F32(width)
    return clip_and_check_boxes(new_y.min(1).astype(_F32) / h, new_x.min(1).astype(_F32) / w,
                                new_y.max(1).astype(_F32) / h, new_x.max(1).astype(_F32) / w)


def rotate_with_bboxes(image: np.ndarray, boxes: np.ndarray, degrees, replace) -> tuple[np.ndarray, np.ndarray]:
    """Official `rotate_with_bboxes`: image and boxes rotated by `degrees`."""
    height, width = image.shape[:2]
    return rotate(image, degrees, replace), rotate_boxes(boxes, height, width, degrees)


def translate_bbox(image: np.ndarray, boxes: np.ndarray, pixels, replace, shift_horizontal: bool
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Official `translate_bbox`: image content and boxes shifted by `-pixels` along x (or y)."""
    height, width = image.shape[:2]
    warp = translate_x if shift_horizontal else translate_y
    return warp(image, pixels, replace), shift_boxes(boxes, height, width, pixels, shift_horizontal)


def shear_with_bboxes(image: np.ndarray, boxes: np.ndarray, level, replace, shear_horizontal: bool
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Official `shear_with_bboxes`: image sheared by `level` along x (or y), boxes follow."""
    height, width = image.shape[:2]
    warp = shear_x if shear_horizontal else shear_y
    return warp(image, level, replace), shear_boxes(boxes, height, width, level, shear_horizontal)
