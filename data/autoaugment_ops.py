"""Pixel operations of the official detection AutoAugment (`efficientdet/aug/autoaugment.py`), vectorised numpy.

Every op takes an RGB uint8 image `[H, W, 3]` (numpy, C-contiguous or not) and returns a new uint8 `[H, W, 3]`
array; boxes are not touched. The arithmetic follows the TF graph the official code builds, dtype for dtype:
float32 where TF computes in float32, truncating float -> uint8 casts (`tf.cast`), uint8 wrap-around where a
Python int becomes a uint8 tensor. Randomness (cutout centres) comes from a `numpy.random.Generator` (or any
object with the same `integers(low, high)` method), so a seeded generator makes the result reproducible.
"""
from __future__ import annotations

import numpy as np

_F32 = np.float32
_VALUES = np.arange(256, dtype=np.uint8)
# tf.image.rgb_to_grayscale: x * float32(1/255) (convert_image_dtype), times the weights [0.2989, 0.5870,
# 0.1140], summed in channel order, all float32. Each product depends on one channel value: tabulated.
_GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], dtype=_F32)
_GRAY_TERMS = (_VALUES.astype(_F32) * _F32(1.0 / 255.0))[None, :] * _GRAY_WEIGHTS[:, None]  # [3, 256]


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """`tf.cast(float, tf.uint8)` of values already inside [0, 255]: truncation toward zero."""
    return values.astype(np.uint8)


def apply_lut(image: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Per-value table lookup: `lut` `[256]` (all channels) or `[C, 256]` (per channel) uint8."""
    if lut.ndim == 1:
        return np.take(lut, image)
    out = np.empty_like(image)
    for channel in range(image.shape[-1]):
        np.take(lut[channel], image[..., channel], out=out[..., channel])
    return out


def _histograms(image: np.ndarray) -> list[np.ndarray]:
    """Per channel, the 256-bin histogram of the values (`tf.histogram_fixed_width(x, [0, 255], 256)`:
    bin v holds the value v)."""
    return [np.bincount(image[..., channel].ravel(), minlength=256) for channel in range(image.shape[-1])]


def blend(image1: np.ndarray, image2: np.ndarray, factor: float) -> np.ndarray:
    """Official `blend`: `image1 + factor * (image2 - image1)` in float32, truncated to uint8.

    factor 0 -> image1, 1 -> image2 (returned as they are); in (0, 1) the result is cast without clipping
    (it cannot leave [0, 255]); otherwise (extrapolation) it is clipped to [0, 255] first.
    """
    if factor == 0.0:
        return np.array(image1, dtype=np.uint8)
    if factor == 1.0:
        return np.array(image2, dtype=np.uint8)
    first = image1.astype(_F32)
    temp = first + _F32(factor) * (image2.astype(_F32) - first)
    if 0.0 < factor < 1.0:
        return _to_uint8(temp)
    return _to_uint8(np.clip(temp, _F32(0.0), _F32(255.0)))


def _blend_constant(constant: int, image: np.ndarray, factor: float) -> np.ndarray:
    """`blend(full_like(image, constant), image, factor)` by a 256-entry table."""
    return apply_lut(image, blend(np.full(256, constant, np.uint8), _VALUES, factor))


def rgb_to_grayscale(image: np.ndarray) -> np.ndarray:
    """`tf.image.rgb_to_grayscale` on uint8: `[H, W, 3]` -> `[H, W]` uint8 (float32 sum of the tabulated
    channel terms, then `convert_image_dtype` back: x * 255.5, truncated)."""
    gray = (np.take(_GRAY_TERMS[0], image[..., 0]) + np.take(_GRAY_TERMS[1], image[..., 1])
            + np.take(_GRAY_TERMS[2], image[..., 2]))
    return _to_uint8(gray * _F32(255.5))


def color(image: np.ndarray, factor: float) -> np.ndarray:
    """PIL-like Color: blend from the grey version of the image."""
    return blend(rgb_to_grayscale(image)[..., None], image, factor)


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


def autocontrast(image: np.ndarray) -> np.ndarray:
    """Per channel, stretch [min, max] to [0, 255] in float32 (channels with max == min are kept)."""
    luts = []
    for histo in _histograms(image):  # min / max = first / last non-empty bin
        lo, hi = (_F32(v) for v in np.flatnonzero(histo)[[0, -1]])
        if hi > lo:
            scale = _F32(255.0) / (hi - lo)
            luts.append(_to_uint8(np.clip(_VALUES.astype(_F32) * scale + -lo * scale, _F32(0.0), _F32(255.0))))
        else:
            luts.append(_VALUES)
    return apply_lut(image, np.stack(luts))


def equalize(image: np.ndarray) -> np.ndarray:
    """PIL-like Equalize per channel (official integer arithmetic).

    step = (number of pixels - count of the highest non-empty bin) // 255; lut = (cumsum + step // 2) // step
    shifted right by one bin (lut[0] = 0), clipped to [0, 255]; channels with step 0 are kept.
    """
    luts = []
    for histo in _histograms(image):
        step = (histo.sum() - histo[np.flatnonzero(histo)[-1]]) // 255
        if step == 0:
            luts.append(_VALUES)
            continue
        lut = (np.cumsum(histo) + step // 2) // step
        luts.append(np.clip(np.concatenate([[0], lut[:-1]]), 0, 255).astype(np.uint8))
    return apply_lut(image, np.stack(luts))


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
    """PIL-like Sharpness: blend from the image smoothed by PIL's SMOOTH kernel [[1,1,1],[1,5,1],[1,1,1]] / 13.

    The smoothing is a VALID 3x3 depthwise convolution in float32 (taps summed in row-major order), clipped and
    truncated to uint8; the one-pixel border keeps the original values.
    """
    if factor == 1.0:
        return np.array(image, dtype=np.uint8)
    height, width = image.shape[:2]
    degenerate = np.array(image, dtype=np.uint8)
    if height >= 3 and width >= 3:
        x = image.astype(_F32)
        side, centre = _F32(1.0) / _F32(13.0), _F32(5.0) / _F32(13.0)
        acc = x[:-2, :-2] * side
        term = np.empty_like(acc)
        for dy, dx in ((0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)):
            np.multiply(x[dy:dy + height - 2, dx:dx + width - 2], centre if dy == dx == 1 else side, out=term)
            acc += term
        degenerate[1:-1, 1:-1] = _to_uint8(np.clip(acc, _F32(0.0), _F32(255.0), out=acc))
    return blend(degenerate, image, factor)


def cutout_mask_fill(image: np.ndarray, centre: tuple[int, int], pad: tuple[int, int], fill) -> np.ndarray:
    """Copy of `image` with rows `[cy - pad_y, cy + pad_y)` x cols `[cx - pad_x, cx + pad_x)` (clipped to the
    image) set to `fill` (scalar or per-channel), as the official padded zero mask does."""
    height, width = image.shape[:2]
    (cy, cx), (pad_y, pad_x) = centre, pad
    out = np.array(image, dtype=np.uint8)
    out[max(0, cy - pad_y):min(height, cy + pad_y), max(0, cx - pad_x):min(width, cx + pad_x)] = fill
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
