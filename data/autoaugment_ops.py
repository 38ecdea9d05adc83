"""Pixel operations of the official detection AutoAugment (`efficientdet/aug/autoaugment.py`), vectorised numpy.

Every op takes an RGB uint8 image `[H, W, 3]` (numpy, C-contiguous or not) and returns a new uint8 `[H, W, 3]`
array; boxes are not touched. The arithmetic follows the TF graph the official code builds, dtype for dtype:
float32 where TF computes in float32, truncating float -> uint8 casts (`tf.cast`), uint8 wrap-around where a
Python int becomes a uint8 tensor. Randomness (cutout centres) comes from a `numpy.random.Generator` (or any
object with the same `integers(low, high)` method), so a seeded generator makes the result reproducible.
"""
from __future__ import annotations

import numpy as np

from .autoaugment_kernels import apply_lut, histograms, paint, strip_rows

_F32 = np.float32
_VALUES = np.arange(256, dtype=np.uint8)
# tf.image.rgb_to_grayscale: x * float32(1/255) (convert_image_dtype), times the weights [0.2989, 0.5870,
# 0.1140], summed in channel order, all float32.
_GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], dtype=_F32)
_INV_255 = _F32(1.0 / 255.0)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """`tf.cast(float, tf.uint8)` of values already inside [0, 255]: truncation toward zero."""
    return values.astype(np.uint8)


def _blend_float(first: np.ndarray, second: np.ndarray, factor: float) -> np.ndarray:
    """Official `blend` of float32 copies of two uint8 images of one shape; `second` is overwritten.

    The float32 operations of `first + factor * (second - first)`, done in place (IEEE products and sums
    commute, so `(second - first) * factor + first` rounds identically; no new image-sized buffer, whose
    first use costs more than the arithmetic) on arrays of one shape: numpy runs broadcasts over a size-1
    channel axis in 3-element inner loops, several times slower.
    """
    if factor == 0.0:
        return _to_uint8(first)
    if factor == 1.0:
        return _to_uint8(second)
    second -= first
    second *= _F32(factor)
    second += first
    if not 0.0 < factor < 1.0:
        np.clip(second, _F32(0.0), _F32(255.0), out=second)
    return _to_uint8(second)


def _spread_channels(plane: np.ndarray, channels: int) -> np.ndarray:
    """`[H, W]` -> float32 `[H, W, channels]` copies (one strided write per channel, no 3-wide broadcast)."""
    out = np.empty(plane.shape + (channels,), dtype=_F32)
    for channel in range(channels):
        out[..., channel] = plane
    return out


def blend(image1: np.ndarray, image2: np.ndarray, factor: float) -> np.ndarray:
    """Official `blend`: `image1 + factor * (image2 - image1)` in float32, truncated to uint8.

    factor 0 -> image1, 1 -> image2 (returned as they are); in (0, 1) the result is cast without clipping
    (it cannot leave [0, 255]); otherwise (extrapolation) it is clipped to [0, 255] first. `image1` may have
    one channel (broadcast over the channels of `image2`); other shapes broadcast as numpy does.
    """
    if factor == 0.0:
        return np.array(image1, dtype=np.uint8)
    if factor == 1.0:
        return np.array(image2, dtype=np.uint8)
    image1, image2 = np.asarray(image1), np.asarray(image2)
    shape = np.broadcast_shapes(image1.shape, image2.shape)
    second = np.broadcast_to(image2, shape).astype(_F32)
    if image1.shape[-1] == 1 and shape[-1] > 1 and image1.shape[:-1] == shape[:-1]:
        first = _spread_channels(image1[..., 0], shape[-1])
    else:
        first = np.broadcast_to(image1, shape).astype(_F32)
    return _blend_float(first, second, factor)


def _blend_constant(constant: int, image: np.ndarray, factor: float) -> np.ndarray:
    """`blend(full_like(image, constant), image, factor)` by a 256-entry table."""
    return apply_lut(image, blend(np.full(256, constant, np.uint8), _VALUES, factor))


def _grayscale_of_float(x: np.ndarray) -> np.ndarray:
    """`rgb_to_grayscale` of the float32 copy `x` `[H, W, 3]` of a uint8 image -> uint8 `[H, W]`."""
    gray = (x[..., 0] * _INV_255) * _GRAY_WEIGHTS[0]
    for channel in (1, 2):
        term = x[..., channel] * _INV_255
        term *= _GRAY_WEIGHTS[channel]
        gray += term
    gray *= _F32(255.5)
    return _to_uint8(gray)


def rgb_to_grayscale(image: np.ndarray) -> np.ndarray:
    """`tf.image.rgb_to_grayscale` on uint8: `[H, W, 3]` -> `[H, W]` uint8 (float32: each channel times
    float32(1/255), times its weight, summed in channel order; then `convert_image_dtype` back: x * 255.5,
    truncated)."""
    return _grayscale_of_float(image.astype(_F32))


def color(image: np.ndarray, factor: float) -> np.ndarray:
    """PIL-like Color: blend from the grey version of the image."""
    if factor == 1.0:
        return np.array(image, dtype=np.uint8)
    x = image.astype(_F32)
    gray = _grayscale_of_float(x).astype(_F32)
    return _blend_float(_spread_channels(gray, x.shape[-1]), x, factor)


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """PIL-like Contrast: blend from a constant image of the mean grey level (float32 mean of
    `rgb_to_grayscale`, clipped, truncated to uint8)."""
    mean = np.mean(rgb_to_grayscale(image), dtype=_F32)
    return _blend_constant(int(_to_uint8(np.clip(mean, _F32(0.0), _F32(255.0)))), image, factor)


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """PIL-like Brightness: blend from black."""
    return _blend_constant(0, image, factor)


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
    """Keep the `bits` high bits. TF's uint8 shifts clamp the shift to [0, 7], so bits 0 keeps the top bit."""
    shift = np.uint8(min(max(8 - int(bits), 0), 7))
    return apply_lut(image, np.left_shift(np.right_shift(_VALUES, shift), shift))


def solarize(image: np.ndarray, threshold: int = 128) -> np.ndarray:
    """Invert the pixels >= threshold. The Python int threshold becomes a uint8 tensor, which wraps:
    256 -> 0 inverts every pixel (as the official output shows)."""
    return apply_lut(image, np.where(_VALUES < np.uint8(int(threshold) % 256), _VALUES, 255 - _VALUES))


def solarize_add(image: np.ndarray, addition: int = 0, threshold: int = 128) -> np.ndarray:
    """Add `addition` (int64, clipped to [0, 255]) to the pixels below threshold."""
    added = np.clip(_VALUES.astype(np.int64) + int(addition), 0, 255).astype(np.uint8)
    return apply_lut(image, np.where(_VALUES < np.uint8(int(threshold) % 256), added, _VALUES))


def _value_range(histos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last non-empty bin of each `[C, 256]` histogram row: the channel's min and max value."""
    nonempty = histos > 0
    return nonempty.argmax(axis=1), 255 - nonempty[:, ::-1].argmax(axis=1)


def autocontrast(image: np.ndarray) -> np.ndarray:
    """Per channel, stretch [min, max] to [0, 255] in float32: `clip(x * scale + -min * scale, 0, 255)` with
    `scale = 255 / (max - min)`, truncated (channels with max == min are kept). All channels' tables at once."""
    lo, hi = (v.astype(_F32) for v in _value_range(histograms(image)))
    stretch = hi > lo
    scale = _F32(255.0) / np.where(stretch, hi - lo, _F32(1.0))
    luts = _VALUES.astype(_F32)[None, :] * scale[:, None]
    luts += (-lo * scale)[:, None]
    luts = _to_uint8(np.clip(luts, _F32(0.0), _F32(255.0), out=luts))
    return apply_lut(image, np.where(stretch[:, None], luts, _VALUES[None, :]))


def equalize(image: np.ndarray) -> np.ndarray:
    """PIL-like Equalize per channel (official integer arithmetic).

    step = (number of pixels - count of the highest non-empty bin) // 255; lut = (cumsum + step // 2) // step
    shifted right by one bin (lut[0] = 0), clipped to [0, 255]; channels with step 0 are kept. All channels'
    tables at once.
    """
    histos = histograms(image)
    step = (histos.sum(axis=1) - histos[np.arange(len(histos)), _value_range(histos)[1]]) // 255
    luts = (np.cumsum(histos, axis=1) + (step // 2)[:, None]) // np.maximum(step, 1)[:, None]
    luts = np.clip(np.concatenate([np.zeros_like(luts[:, :1]), luts[:, :-1]], axis=1), 0, 255).astype(np.uint8)
    return apply_lut(image, np.where((step == 0)[:, None], _VALUES[None, :], luts))


def _sharpened_band(rows: np.ndarray, factor: float) -> np.ndarray:
    """Sharpness of the interior of a band: `rows` `[h + 2, W, C]` uint8 -> `[h, W - 2, C]` uint8, the output
    rows 1..h, columns 1..W-2 of `rows`. The uint8 values are converted to float32 inside each product."""
    height, width = rows.shape[:2]
    side = np.multiply(rows, _F32(1.0) / _F32(13.0), dtype=_F32)
    centre = np.multiply(rows, _F32(5.0) / _F32(13.0), dtype=_F32)

    def tap(dy, dx):
        return (centre if dy == dx == 1 else side)[dy:dy + height - 2, dx:dx + width - 2]

    smooth = tap(0, 0) + tap(0, 1)
    for dy, dx in ((0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)):
        smooth += tap(dy, dx)
    # the official clip to [0, 255] before the uint8 cast changes nothing: the sum is >= 0 and below 256
    # (at most 255 * (8 float32(1/13) + float32(5/13)) plus nine roundings, about 255.0001)
    np.trunc(smooth, out=smooth)  # the uint8 cast of the degenerate image, kept in float32 for the blend
    return _blend_float(smooth, rows[1:-1, 1:-1].astype(_F32), factor)


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
    """PIL-like Sharpness: blend from the image smoothed by PIL's SMOOTH kernel [[1,1,1],[1,5,1],[1,1,1]] / 13.

    The smoothing is a VALID 3x3 depthwise convolution in float32: the nine products `x * float32(1/13)` (the
    centre `x * float32(5/13)`) summed in row-major tap order, clipped and truncated to uint8; the one-pixel
    border keeps the original values, so there the blend gives the image itself. Each tap's product is a
    shifted window of one of two product images computed once, and the sum keeps the tap order, so every
    rounding is the official one. Done in bands of rows (overlapping by the kernel's two rows) whose float
    temporaries stay in cache.
    """
    if factor == 1.0:
        return np.array(image, dtype=np.uint8)
    height, width = image.shape[:2]
    out = np.array(image, dtype=np.uint8)
    if height < 3 or width < 3:
        return out
    rows = strip_rows(width)
    for top in range(1, height - 1, rows):
        bottom = min(top + rows, height - 1)
        out[top:bottom, 1:-1] = _sharpened_band(image[top - 1:bottom + 1], factor)
    return out


def cutout_mask_fill(image: np.ndarray, centre: tuple[int, int], pad: tuple[int, int], fill) -> np.ndarray:
    """Copy of `image` with rows `[cy - pad_y, cy + pad_y)` x cols `[cx - pad_x, cx + pad_x)` (clipped to the
    image) set to `fill` (scalar or per-channel), as the official padded zero mask does."""
    height, width = image.shape[:2]
    (cy, cx), (pad_y, pad_x) = centre, pad
    out = np.array(image, dtype=np.uint8)
    region = out[max(0, cy - pad_y):min(height, cy + pad_y), max(0, cx - pad_x):min(width, cx + pad_x)]
    paint(region, fill)
    return out


def cutout(image: np.ndarray, pad_size: int, replace, rng) -> np.ndarray:
    """Official `cutout`: a (2 pad_size)^2 square of `replace` centred uniformly in the image.

    Draws: centre row `rng.integers(0, H)`, then centre column `rng.integers(0, W)`.
    """
    height, width = image.shape[:2]
    centre_y = int(rng.integers(0, height))
    centre_x = int(rng.integers(0, width))
    pad = int(pad_size)
    return cutout_mask_fill(image, (centre_y, centre_x), (pad, pad), np.asarray(replace, dtype=np.uint8))
