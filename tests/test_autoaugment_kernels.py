"""The fast AutoAugment kernels (`data/autoaugment_kernels.py`, `autoaugment_warp.py`, `autoaugment_ops.py`) give
bit for bit what the plain formulas give: table lookups, histograms, the nearest-neighbour warp, blend, colour,
sharpness, equalize and autocontrast, on random images of several sizes (odd pixel counts, 1-pixel lines,
non-contiguous views), every level the policies use and beyond, and coordinates placed on rounding ties.

The references here are the straightforward numpy forms of the official formulas (float64 `std::round` of each
float32 coordinate, one product per smoothing tap, `lut[image]`, `np.bincount`)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from data import autoaugment as aa
from data import autoaugment_kernels as kernels
from data import autoaugment_ops as ops
from data.autoaugment_warp import affine_nearest

F32 = np.float32
SIZES = [(1, 1), (1, 7), (5, 1), (3, 3), (37, 53), (64, 96), (45, 120)]
FACTORS = sorted({aa.level_to_arg("Color", level)[0] for level in list(range(11)) + [15]} | {0.0, 1.0, 0.5})


def _images():
    rng = np.random.default_rng(0)
    for height, width in SIZES:
        noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        yy, xx = np.mgrid[0:height, 0:width]
        smooth = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) * 7 % 256], -1)
        yield noise
        yield smooth.astype(np.uint8)
        yield np.full((height, width, 3), 13 * 7, np.uint8)  # every 3x3 smoothing sum a multiple of 13
    yield rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)[::-1, 1::2]  # non-contiguous view


IMAGES = list(_images())


# ---- references ---------------------------------------------------------------------------------------------

def _blend_reference(image1, image2, factor):
    if factor == 0.0:
        return np.array(image1, np.uint8)
    if factor == 1.0:
        return np.array(image2, np.uint8)
    first = image1.astype(F32)
    temp = first + F32(factor) * (image2.astype(F32) - first)
    return (temp if 0.0 < factor < 1.0 else np.clip(temp, F32(0), F32(255))).astype(np.uint8)


def _gray_reference(image):
    terms = (np.arange(256, dtype=F32) * F32(1.0 / 255.0))[None, :] * ops._GRAY_WEIGHTS[:, None]
    gray = np.take(terms[0], image[..., 0]) + np.take(terms[1], image[..., 1]) + np.take(terms[2], image[..., 2])
    return (gray * F32(255.5)).astype(np.uint8)


def _sharpness_reference(image, factor):
    height, width = image.shape[:2]
    degenerate = np.array(image, np.uint8)
    if height >= 3 and width >= 3:
        x = image.astype(F32)
        acc = np.zeros((height - 2, width - 2, 3), F32)
        for dy in range(3):
            for dx in range(3):  # taps summed in row-major order, one product each
                weight = F32(5.0) / F32(13.0) if dy == dx == 1 else F32(1.0) / F32(13.0)
                acc = acc + x[dy:dy + height - 2, dx:dx + width - 2] * weight
        degenerate[1:-1, 1:-1] = np.clip(acc, F32(0), F32(255)).astype(np.uint8)
    return _blend_reference(degenerate, image, factor)


def _warp_reference(image, transform, fill):
    """Per pixel: float32 `(t0 x + t1 y) + t2`, float64 round half away from zero, fill outside."""
    height, width = image.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(F32)
    a0, a1, a2, b0, b1, b2 = (F32(v) for v in transform)
    in_x, in_y = (a0 * xs + a1 * ys) + a2, (b0 * xs + b1 * ys) + b2
    rx = np.sign(in_x.astype(np.float64)) * np.floor(np.abs(in_x.astype(np.float64)) + 0.5)
    ry = np.sign(in_y.astype(np.float64)) * np.floor(np.abs(in_y.astype(np.float64)) + 0.5)
    inside = (rx >= 0) & (rx < width) & (ry >= 0) & (ry < height)
    out = np.empty_like(image)
    out[...] = np.asarray(fill, np.uint8)
    out[inside] = image[ry[inside].astype(int), rx[inside].astype(int)]
    return out


# ---- kernels ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("index", range(len(IMAGES)))
def test_lookups_and_histograms_equal_the_plain_forms(index):
    image = IMAGES[index]
    tables = np.random.default_rng(index).integers(0, 256, (3, 256), dtype=np.uint8)
    per_channel = np.stack([tables[c][image[..., c]] for c in range(3)], axis=-1)
    assert np.array_equal(kernels.apply_lut(image, tables), per_channel)
    assert np.array_equal(kernels.apply_lut(image, tables[1]), tables[1][image])
    counts = np.stack([np.bincount(image[..., c].ravel(), minlength=256) for c in range(3)])
    assert np.array_equal(kernels.histograms(image), counts)
    words = kernels.pixel_words(image, (1, 2, 3))
    out = np.empty(image.shape, np.uint8)
    kernels.words_to_pixels(words[:-1], out)
    assert np.array_equal(out, image)
    kernels.words_to_pixels(words[-1:], out.reshape(-1, 3)[:1])
    assert out.reshape(-1, 3)[0].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match=r"^apply_lut: expected \[256\] or \[3, 256\] tables"):
        kernels.apply_lut(image, tables[:2])


def test_round_to_index_is_round_half_away_from_zero_on_ties_and_near_ties():
    halves = np.arange(0, 300, dtype=np.float64) + 0.5
    below, above = np.nextafter(halves.astype(F32), F32(0)), np.nextafter(halves.astype(F32), F32(1e9))
    spread = np.random.default_rng(0).uniform(-0.49999, 300, 2000)
    coords = np.concatenate([halves, below, above, np.arange(0, 300), spread,
                             [-0.49999997, -0.25, -0.0, 0.49999997, 0.5]]).astype(F32)
    reference = np.floor(np.abs(coords.astype(np.float64)) + 0.5)
    assert np.array_equal(kernels.round_to_index(F32(2) * coords), reference.astype(np.int32))


# ---- warps --------------------------------------------------------------------------------------------------

def _rotation(height, width, degrees):
    angle = F32(degrees) * F32(math.pi / 180.0)
    cos, sin = np.cos(angle), np.sin(angle)
    w1, h1 = F32(width) - F32(1), F32(height) - F32(1)
    return (cos, -sin, (w1 - (cos * w1 - sin * h1)) / F32(2), sin, cos, (h1 - (sin * w1 + cos * h1)) / F32(2))


SHEARS = [s * level for level in (0.03, 0.06, 0.12, 0.3, 0.45, 0.5, 1.0, 0.37) for s in (1, -1)]
TRANSLATIONS = [0.0, 25.0, -100.0, 2.5, -0.5, 7.25, 500.0]


@pytest.mark.parametrize("index", range(0, len(IMAGES), 2))
def test_warps_equal_the_per_pixel_formula(index):
    image = IMAGES[index]
    height, width = image.shape[:2]
    fill = (128, 7, 200)
    transforms = [_rotation(height, width, d) for d in (3.0, -30.0, 45.0, 90.0, -12.5)]
    transforms += [(1.0, s, 0.0, 0.0, 1.0, 0.0) for s in SHEARS] + [(1.0, 0.0, 0.0, s, 1.0, 0.0) for s in SHEARS]
    transforms += [(1.0, 0.0, t, 0.0, 1.0, 0.0) for t in TRANSLATIONS]
    transforms += [(1.0, 0.0, 0.0, 0.0, 1.0, t) for t in TRANSLATIONS]
    transforms += [(1.0, 0.0, 3.0, 0.0, 1.0, -2.0), (0.5, 0.0, 0.0, 0.0, 2.0, 0.0), (1.0, 0.2, 1.5, 0.1, 1.0, 0.0)]
    for transform in transforms:
        expected = _warp_reference(image, transform, fill)
        assert np.array_equal(affine_nearest(image, transform, fill), expected), transform


# ---- colour ops ---------------------------------------------------------------------------------------------

def test_blend_of_every_value_pair_equals_the_formula():
    values = np.arange(256, dtype=np.uint8)
    for factor in FACTORS:  # numpy-broadcastable inputs: every (a, b) pair of uint8 values
        assert np.array_equal(ops.blend(values[:, None], values[None, :], factor),
                              _blend_reference(values[:, None], values[None, :], factor))


@pytest.mark.parametrize("index", range(len(IMAGES)))
def test_colour_ops_equal_the_plain_formulas(index):
    image = IMAGES[index]
    gray = _gray_reference(image)
    assert np.array_equal(ops.rgb_to_grayscale(image), gray)
    other = np.ascontiguousarray(image[::-1, ::-1])
    for factor in FACTORS:
        assert np.array_equal(ops.blend(other, image, factor), _blend_reference(other, image, factor))
        expected = _blend_reference(gray[..., None], image, factor)
        assert np.array_equal(ops.blend(gray[..., None], image, factor), expected)
        if factor != 0.0:  # the official blend would return the 1-channel grey image itself
            assert np.array_equal(ops.color(image, factor), expected)
        assert np.array_equal(ops.sharpness(image, factor), _sharpness_reference(image, factor))
    luts = []
    for histo in (np.bincount(image[..., c].ravel(), minlength=256) for c in range(3)):
        step = (histo.sum() - histo[np.flatnonzero(histo)[-1]]) // 255
        lut = np.clip(np.concatenate([[0], ((np.cumsum(histo) + step // 2) // max(step, 1))[:-1]]), 0, 255)
        luts.append(np.arange(256) if step == 0 else lut)
    assert np.array_equal(ops.equalize(image), np.stack([luts[c][image[..., c]] for c in range(3)], -1))
    lows, highs = image.reshape(-1, 3).min(0).astype(F32), image.reshape(-1, 3).max(0).astype(F32)
    stretched = []
    for c in range(3):
        scale = F32(255.0) / (highs[c] - lows[c]) if highs[c] > lows[c] else None
        values = image[..., c].astype(F32)
        stretched.append(image[..., c] if scale is None else
                         np.clip(values * scale + -lows[c] * scale, F32(0), F32(255)).astype(np.uint8))
    assert np.array_equal(ops.autocontrast(image), np.stack(stretched, -1))
