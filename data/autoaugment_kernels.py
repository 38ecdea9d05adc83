"""Exact uint8 image kernels shared by the AutoAugment ops: table lookups, histograms, pixel gathers.

Images are RGB uint8 `[H, W, 3]` (C-contiguous or not); results are new C-contiguous arrays or written into
the one given. Every kernel computes exactly what the plain numpy formula in its docstring computes (tested
against it in tests/test_autoaugment_kernels.py), with fewer numpy passes and gathers: a DataLoader worker
runs them on one thread, where each pass over an image costs about as much as the arithmetic in it.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

_U16 = np.dtype("<u2")  # explicit byte order: the low byte of each pair is the byte at the lower address
# Two interleaved RGB pixels are 6 bytes = 3 uint16 items holding channels (R, G), (B, R), (G, B).
_PAIR_CHANNELS = ((0, 1), (2, 0), (1, 2))


def _pair_table(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """`[..., 65536]` uint16 tables of byte pairs from `[..., 256]` tables: entry `hi * 256 + lo` holds
    `low[lo] | high[hi] << 8`."""
    table = low[..., None, :].astype(_U16) | (high[..., :, None].astype(_U16) << 8)
    return table.reshape(*low.shape[:-1], 65536)


def apply_lut(image: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """`lut[image]` for a `[256]` uint8 table (every channel) or `lut[c][image[..., c]]` for `[C, 256]` tables.

    Looked up two bytes at a time through a 65536-entry uint16 table built from the 256-entry ones, which
    halves the number of gathers (numpy's `take` costs per index, not per byte). Exact: each output byte is
    the table entry of its input byte.
    """
    lut = np.asarray(lut, dtype=np.uint8)
    src = np.ascontiguousarray(image, dtype=np.uint8)
    flat, out = src.reshape(-1), np.empty(src.size, dtype=np.uint8)
    if lut.ndim == 1:
        even = flat.size - flat.size % 2
        np.take(_pair_table(lut, lut), flat[:even].view(_U16), out=out[:even].view(_U16), mode="clip")
        out[even:] = lut[flat[even:]]
        return out.reshape(src.shape)
    channels = src.shape[-1]
    if channels != 3 or lut.shape != (3, 256):
        raise ValueError(f"apply_lut: expected [256] or [3, 256] tables for an RGB image, got {lut.shape} for "
                         f"{channels} channels")
    pixels = flat.size // 3
    even = 3 * (pixels - pixels % 2)  # whole pixel pairs; a last odd pixel is looked up byte by byte
    pairs_in, pairs_out = flat[:even].view(_U16).reshape(-1, 3), out[:even].view(_U16).reshape(-1, 3)
    lows, highs = zip(*_PAIR_CHANNELS)
    tables = _pair_table(lut[list(lows)], lut[list(highs)])
    for column in range(3):
        pairs_out[:, column] = np.take(tables[column], pairs_in[:, column], mode="clip")
    for channel in range(3):
        out[even + channel::3] = lut[channel][flat[even + channel::3]]
    return out.reshape(src.shape)


def histograms(image: np.ndarray) -> np.ndarray:
    """`[C, 256]` int64: per channel, the count of each value (`tf.histogram_fixed_width(x, [0, 255], 256)`,
    bin v holds the value v). Counted by Pillow's C loop, one pass over the pixels."""
    src = np.ascontiguousarray(image, dtype=np.uint8)
    if src.shape[-1] != 3:
        return np.stack([np.bincount(src[..., c].ravel(), minlength=256) for c in range(src.shape[-1])])
    return np.asarray(Image.fromarray(src, "RGB").histogram(), dtype=np.int64).reshape(3, 256)


def round_to_index(doubled: np.ndarray) -> np.ndarray:
    """int32 `std::round(c)` (half away from zero) of sampling coordinates c > -0.5, given as `2 c` float32.

    For c >= 0, `round(c) = floor(c + 0.5) = (floor(2 c) + 1) >> 1` (nested floors), and the int32 cast
    (truncation) is floor; for c in (-0.5, 0) the cast gives 0, and so does the formula, as `std::round`.
    Doubling a float is exact, so the caller computes `2 c` with doubled coefficients; unlike `floor(c + 0.5)`
    in float32, nothing here rounds (c = 0.5 - 2^-25 gives 0, not 1). Callers mask c <= -0.5 themselves.
    """
    index = doubled.astype(np.int32)
    index += 1
    index >>= 1
    return index


def paint(view: np.ndarray, fill) -> None:
    """Set every pixel of the uint8 `view` `[h, w, C]` (any strides) to the colour `fill` (scalar or `[C]`):
    its first row by broadcasting, the other rows copied from it (a C-wide broadcast over the whole view
    runs in C-element inner loops, much slower)."""
    if view.size:
        view[0] = fill
        view[1:] = view[0]


def filled(shape: tuple[int, ...], fill) -> np.ndarray:
    """New uint8 array of `shape` `[h, w, C]` holding the colour `fill` everywhere."""
    out = np.empty(shape, dtype=np.uint8)
    paint(out, fill)
    return out


# Pixels per row strip of the float / index work of one op: a strip's temporaries stay in the L2 cache
# (Sharpness of a ~500 px image measured 1.5-2.5x faster than over the whole image at once); much smaller
# strips lose more to numpy's per-call cost than they gain.
STRIP_PIXELS = 1 << 15


def strip_rows(width: int) -> int:
    """Rows per strip for images `width` pixels wide."""
    return max(1, STRIP_PIXELS // max(width, 1))


def pixel_words(image: np.ndarray, fill) -> np.ndarray:
    """RGB uint8 `[H, W, 3]` -> little-endian uint32 `[H * W + 1]`: pixel i's bytes in the low 24 bits (the top
    byte is garbage), the extra last word the `fill` colour. One strided copy that reads 4 bytes at a 3-byte
    stride straight from the image (the last pixel, whose 4th byte would lie past the image, separately);
    whole pixels can then be gathered with a 4-byte `take` (measured 2-4x faster than taking 3-byte rows)."""
    src = np.ascontiguousarray(image, dtype=np.uint8).reshape(-1)
    pixels = src.size // 3
    words = np.empty(pixels + 1, dtype=np.dtype("<u4"))
    if pixels > 1:
        words[:pixels - 1] = np.ndarray((pixels - 1,), dtype=words.dtype, buffer=src, strides=(3,))
    if pixels:
        words[pixels - 1] = _word(src[-3:])
    words[pixels] = _word(np.broadcast_to(np.asarray(fill, dtype=np.uint8), (3,)))
    return words


def _word(three: np.ndarray) -> int:
    """The little-endian uint32 of 3 bytes and a zero byte."""
    return int(three[0]) | int(three[1]) << 8 | int(three[2]) << 16


def words_to_pixels(words: np.ndarray, out: np.ndarray) -> None:
    """Write the low 3 bytes of each uint32 of `words` to the C-contiguous uint8 `out` `[..., 3]` (same number
    of pixels): bytes 0-1 as a uint16 and byte 2 as a uint8 at a 3-byte stride, so no write overlaps."""
    pixels, data = words.size, out.reshape(-1)
    np.copyto(np.ndarray((pixels,), dtype=_U16, buffer=data, strides=(3,)), words.reshape(-1), casting="unsafe")
    np.right_shift(words.reshape(-1), 16, out=np.ndarray((pixels,), dtype=np.uint8, buffer=data, offset=2,
                                                           strides=(3,)), casting="unsafe")
