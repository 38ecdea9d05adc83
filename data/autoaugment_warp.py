"""Nearest-neighbour affine warp of uint8 images, bit-exact to `tfa.image.transform` (`ImageProjectiveTransformV3`)
as the official AutoAugment `rotate`, `translate_x/y` and `shear_x/y` call it.

Output pixel (x, y) (integer coordinates, no half-pixel offset) reads input pixel
`(round(a0 x + a1 y + a2), round(b0 x + b1 y + b2))`, each coordinate computed in float32 in that order
(`t0 * x + t1 * y + t2`), with `std::round` (half away from zero); samples outside the image become `replace`
(the official `wrap` / `unwrap` pair: the 4th channel is 0 exactly where the sample was outside).

Exactness: coordinates are computed doubled, with doubled coefficients (scaling by 2 is exact away from the
subnormal range, which no coefficient or coordinate of these ops comes near, so every float32 rounding is the
kernel's), which turns `std::round` into integer arithmetic (`round_to_index`). Speed: whole-pixel
translations are one block copy; shears read, per row (column), a shifted row (column), whose shift follows
from one float per line (`_line_shifts`, with the exact per-pixel path for lines it cannot prove); rotations
compute every coordinate, a band of rows at a time so the band's temporaries stay in cache.
"""
from __future__ import annotations

import numpy as np

from .autoaugment_kernels import filled, paint, pixel_words, round_to_index, strip_rows, words_to_pixels

_F32 = np.float32
# |2 c| below this bound has a float32 ulp of at most 2^-11; a shift term whose fraction is below 1 - 2^-11
# then keeps floor(fl(2 x + s)) = floor(2 x + s) for every integer x (see `_line_shifts`).
_SAFE_MAGNITUDE, _SAFE_FRACTION = 2.0 ** 13, 1.0 - 2.0 ** -11


def _read_index(doubled: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sampling coordinates c, given as float32 `2 c`, -> (int32 `std::round(c)`, whether it lies outside
    [0, size)). `round(c)` is in range exactly when -0.5 < c < size - 0.5 (ties round away from zero), i.e.
    -1 < 2 c < 2 size - 1: both bounds are exact floats, so the test needs no rounded index."""
    outside = doubled <= _F32(-1.0)
    outside |= doubled >= _F32(2 * size - 1)
    return round_to_index(doubled), outside


def _run(index: np.ndarray, outside: np.ndarray) -> tuple[slice, slice] | None:
    """For a 1-D read index (`out[i]` reads `in[index[i]]` where not `outside`): the (output, input) slices
    when the inside entries are one block reading consecutive inputs, as a translation's are; else None."""
    positions = np.flatnonzero(~outside)
    if positions.size == 0:
        return slice(0, 0), slice(0, 0)
    first, last = int(positions[0]), int(positions[-1])
    start = int(index[first])
    if positions.size != last - first + 1 or not np.array_equal(index[first:last + 1],
                                                                np.arange(start, start + last - first + 1)):
        return None
    return slice(first, last + 1), slice(start, start + last - first + 1)


def _axis_reads(xs: np.ndarray, ys: np.ndarray, coeffs, size: int):
    """Read index along one input axis for the output pixels `ys x xs`: (int32 index, outside or None), with
    `coeffs` the doubled `(t0, t1, t2)` of the axis. `1 * x + 0 * y + 0` (or `0 * x + 1 * y + 0`) is the
    output coordinate exactly and needs no rounding (shears keep one axis)."""
    t0, t1, t2 = coeffs
    if (t0, t1, t2) == (2, 0, 0):
        return xs.astype(np.int32)[None, :], None
    if (t0, t1, t2) == (0, 2, 0):
        return ys.astype(np.int32)[:, None], None
    # same float32 operation order as the kernel: t0 * x + t1 * y + t2 (then / projection = 1)
    doubled = (t0 * xs)[None, :] + (t1 * ys)[:, None]
    doubled += t2
    return _read_index(doubled, size)


def _exact_index(xs: np.ndarray, ys: np.ndarray, a_coeffs, b_coeffs, height: int, width: int) -> np.ndarray:
    """int32 `[len(ys), len(xs)]` flat read index `in_y * W + in_x` of the output pixels `ys x xs`, with
    `H * W` where the sample falls outside. Every coordinate computed as the kernel does."""
    in_x, outside_x = _axis_reads(xs, ys, a_coeffs, width)
    in_y, outside_y = _axis_reads(xs, ys, b_coeffs, height)
    flat = in_y * np.int32(width) if in_y.shape != (len(ys), len(xs)) else np.multiply(in_y, width, out=in_y)
    flat = flat + in_x if flat.shape != (len(ys), len(xs)) else np.add(flat, in_x, out=flat)
    if outside_x is not None and outside_y is not None:
        outside_x |= outside_y
    outside = outside_x if outside_x is not None else outside_y
    if outside is not None:
        np.copyto(flat, height * width, where=outside)
    return flat


def _line_shifts(terms: np.ndarray, size: int):
    """Shear reads along one axis: position p of a line (row or column) reads `round(p + s / 2)` of that line,
    with `s` the line's doubled shift term (float32 `[L]`) and the doubled coordinate `fl(2 p + s)`.

    Let m = floor(s), q = s - m. When |2 p + s| < 2^13 (ulp <= 2^-11) and q < 1 - 2^-11, rounding `2 p + s` to
    float32 cannot reach the next integer, so `floor(fl(2 p + s)) = 2 p + m` and the read index is
    `p + ((m + 1) >> 1)` for every p: a shifted line. It is inside for -1 < 2 p + s < 2 size - 1, i.e.
    2 p + m in [0 if q == 0 else -1, 2 size - 2] (at q == 0 the tie 2 p + s = -1 rounds away, outside).

    Returns int64 `[L]` arrays (shift, first inside p, last inside p) and bool `[L]` whether the line is proven.
    """
    terms64 = terms.astype(np.float64)
    floor = np.floor(terms64)
    fraction = terms64 - floor  # exact in float64
    proven = (fraction < _SAFE_FRACTION) & (np.abs(terms64) + 2 * size < _SAFE_MAGNITUDE)
    m = floor.astype(np.int64)
    low = np.where(fraction == 0, 0, -1)
    return (m + 1) >> 1, -((m - low) // 2), (2 * size - 2 - m) // 2, proven


def _shear_blocks(a_coeffs, b_coeffs, height: int, width: int):
    """A shear along x (`x + level y`) or y (`level x + y`) as shifted lines; None for other maps.

    Returns `(axis, blocks, rest)`: axis 0 when rows shift along x, 1 when columns shift along y; `blocks`
    lists `(first line, end line, first position, end position, shift)`: on lines [first, end), output
    positions [first, end) read input positions shifted by `shift`, the others the fill; `rest` maps the few
    lines that are no such shift to their exact flat read index (`_exact_index`).
    """
    xs, ys = np.arange(width, dtype=_F32), np.arange(height, dtype=_F32)
    if b_coeffs == (0, 2, 0) and a_coeffs[0] == 2 and a_coeffs[2] == 0:
        axis, terms, size = 0, a_coeffs[1] * ys, width
    elif a_coeffs == (2, 0, 0) and b_coeffs[1] == 2 and b_coeffs[2] == 0:
        axis, terms, size = 1, b_coeffs[0] * xs, height
    else:
        return None
    shift, first, last, proven = _line_shifts(terms, size)
    first, end = np.maximum(first, 0), np.minimum(last, size - 1) + 1
    rest = {}
    for line in np.flatnonzero(~proven).tolist():  # prove these lines on their exact read index
        line_xs, line_ys = (xs, ys[line:line + 1]) if axis == 0 else (xs[line:line + 1], ys)
        flat = _exact_index(line_xs, line_ys, a_coeffs, b_coeffs, height, width).reshape(-1)
        outside = flat == height * width
        index = flat % width if axis == 0 else flat // width
        run = _run(index, outside)
        if run is None:
            rest[line] = flat
            first[line], end[line] = 0, 0
        else:
            first[line], end[line] = run[0].start, run[0].stop
            shift[line] = run[1].start - run[0].start
    key = np.stack([first, end, shift], axis=1)
    starts = np.concatenate([[0], np.flatnonzero((key[1:] != key[:-1]).any(axis=1)) + 1]).tolist()
    ends = starts[1:] + [len(key)]
    blocks = [(start, stop, *key[start].tolist()) for start, stop in zip(starts, ends)]
    return axis, blocks, rest


def _gather(image: np.ndarray, fill: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """Pixels of `image` `[H, W, C]` at `flat` (`[h, w]`, `H * W` reads `fill`) -> `[h, w, C]` uint8."""
    out = np.empty(flat.shape + image.shape[2:], dtype=np.uint8)
    if image.shape[2] == 3:
        words_to_pixels(np.take(pixel_words(image, fill), flat), out)
    else:
        out[...] = np.take(np.concatenate([image.reshape(-1, image.shape[2]), fill.reshape(1, -1)]), flat, axis=0)
    return out


def _block(image: np.ndarray, out_y: slice, out_x: slice, in_y: slice, in_x: slice, fill) -> np.ndarray:
    """Output block `[out_y, out_x]` = input block `[in_y, in_x]` (same size), `fill` around it."""
    out = np.empty(image.shape, dtype=np.uint8)
    if out_y.start < out_y.stop and out_x.start < out_x.stop:
        out[out_y, out_x] = image[in_y, in_x]
    else:
        out_y = out_x = slice(0, 0)
    for rows, cols in ((slice(0, out_y.start), slice(None)), (slice(out_y.stop, None), slice(None)),
                       (out_y, slice(0, out_x.start)), (out_y, slice(out_x.stop, None))):
        paint(out[rows, cols], fill)
    return out


def _shift_slices(shift: int, size: int) -> tuple[slice, slice]:
    """(output, input) slices of a whole-pixel shift `out[i] = in[i + shift]` along an axis of `size`."""
    start, stop = min(max(0, -shift), size), max(min(size, size - shift), 0)
    stop = max(stop, start)
    return slice(start, stop), slice(start + shift, stop + shift)


def affine_nearest(image: np.ndarray, transform, replace) -> np.ndarray:
    """`[H, W, C]` uint8 warped by the 6 affine entries `(a0, a1, a2, b0, b1, b2)` of a TF projective transform
    (output -> input map, see the module docstring); pixels sampled outside the input become `replace`."""
    height, width, channels = image.shape
    a_coeffs = tuple(_F32(2.0) * _F32(v) for v in transform[:3])
    b_coeffs = tuple(_F32(2.0) * _F32(v) for v in transform[3:])
    fill = np.broadcast_to(np.asarray(replace, dtype=np.uint8), (channels,))
    if a_coeffs[:2] == (2, 0) and b_coeffs[:2] == (0, 2) and a_coeffs[2] % 2 == 0 and b_coeffs[2] % 2 == 0:
        # translation by whole pixels (dx, dy): `x + dx` is an exact float32 integer, its own rounding
        (out_x, in_x), (out_y, in_y) = (_shift_slices(int(a_coeffs[2]) // 2, width),
                                        _shift_slices(int(b_coeffs[2]) // 2, height))
        return _block(image, out_y, out_x, in_y, in_x, fill)
    xs, ys = np.arange(width, dtype=_F32), np.arange(height, dtype=_F32)
    if a_coeffs[1] == 0 and b_coeffs[0] == 0:  # other translations and scalings: x reads x only, y reads y only
        # the kernel's `a0 * x + 0 * y + a2` equals `a0 * x + a2` exactly
        runs = (_run(*_read_index(a_coeffs[0] * xs + a_coeffs[2], width)),
                _run(*_read_index(b_coeffs[1] * ys + b_coeffs[2], height)))
        if None not in runs:  # the inside reads are one block of consecutive pixels
            (out_x, in_x), (out_y, in_y) = runs
            return _block(image, out_y, out_x, in_y, in_x, fill)
    shear = _shear_blocks(a_coeffs, b_coeffs, height, width)
    if shear is not None:  # block copies of shifted lines
        axis, blocks, rest = shear
        out = filled(image.shape, fill)
        lines = out if axis == 0 else out.transpose(1, 0, 2)
        source = image if axis == 0 else image.transpose(1, 0, 2)
        for first, stop, start, end, shift in blocks:
            if start < end:
                lines[first:stop, start:end] = source[first:stop, start + shift:end + shift]
        for line, flat in rest.items():
            lines[line] = _gather(image, fill, flat[None, :])[0]
        return out
    out = np.empty((height, width, channels), dtype=np.uint8)
    if channels == 3:  # pixels as words once, gathered band by band
        words = pixel_words(image, fill)
    rows = strip_rows(width)
    for top in range(0, height, rows):
        flat = _exact_index(xs, ys[top:top + rows], a_coeffs, b_coeffs, height, width)
        if channels == 3:
            words_to_pixels(np.take(words, flat), out[top:top + rows])
        else:
            out[top:top + rows] = _gather(image, fill, flat)
    return out
