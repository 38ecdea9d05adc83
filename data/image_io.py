"""Decoding image files into 8-bit RGB, the one way train, eval and infer read images.

`read_rgb(path)` -> uint8 `[H, W, 3]` RGB array; `to_rgb8(pil_image)` does the same for an opened image.
Every PIL mode a user can hand us is either mapped to its correct 8-bit RGB values or refused with an
`ImageReadError` that names the file and the reason:

* `RGB`, `L` (grey, copied to the 3 channels), `1` (bilevel: 0 / 255), `YCbCr`, `HSV`, `RGBX`: PIL's conversion.
* 16-bit grey (`I;16`, `I;16L`, `I;16B`, `I;16N`, how PIL opens 16-bit PNG and TIFF files): the type's full
  range 0..65535 is mapped onto 0..255 by dividing by 257 and rounding (the PNG specification's sample-depth
  scaling; 257 * v8 maps back to v8 exactly). `convert("RGB")` would clip every value above 255 to white.
  16-bit RGB PNGs are opened by PIL as `RGB` from their high bytes, which is the same mapping to within 1.
* `I` (32-bit signed): values in 0..65535 are taken as 16-bit samples (PIL opens some 16-bit files so) and
  scaled as above; any other range is ambiguous and refused.
* `F` (32-bit float): values in [0, 1] are scaled by 255; values in [0, 255] (some above 1) are taken as they
  are; anything else (negative, above 255, NaN, inf) is refused.
* Transparency (`RGBA`, `LA`, `PA`, `RGBa`, `La`, `P` with a transparent colour, grey or RGB images with
  a `transparency` key): composited over white (`BACKGROUND`), how a viewer shows the file on a white page.
  Dropping the alpha channel instead would expose whatever colour the transparent pixels happen to store.
* `CMYK`: PIL's conversion (`R = (255 - C) * (255 - K) / 255`, ...); embedded ICC profiles are not applied
  (neither for RGB files: as pycocotools-era tools, TF's decoder and OpenCV by default).
* Multi-frame files (GIF, TIFF): the first frame.
* EXIF orientation: NOT applied by default. COCO-format annotations are given in the stored pixel grid
  (the official pipeline decodes with `tf.io.decode_image`, which ignores EXIF), so train and eval must not
  rotate. `-mode infer` passes `exif_transpose=True`: a photo is detected and drawn upright, as viewers show
  it, and its boxes are in that displayed orientation.

Reasons (`ImageReadError.reason`): "missing", "cannot decode" (not an image, or a format PIL cannot read),
"truncated" (the file ends early), "unsupported" (a mode or value range refused above).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

BACKGROUND = (255, 255, 255)  # what transparent pixels are composited over
_PLAIN_MODES = {"RGB", "L", "1", "YCbCr", "HSV", "RGBX", "CMYK", "P"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_UINT16_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageReadError(ValueError):
    """An image file that cannot be turned into RGB; `reason` is one of the reasons listed in the module doc."""

    def __init__(self, path, reason: str, detail: str):
        super().__init__(f"{path}: {reason} ({detail})")
        self.path, self.reason, self.detail = str(path), reason, detail


def read_rgb(path: str | os.PathLike, exif_transpose: bool = False) -> np.ndarray:
    """RGB uint8 `[H, W, 3]` of the image file `path` (first frame); raises `ImageReadError`."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            return to_rgb8(image, path)
    except FileNotFoundError as e:
        raise ImageReadError(path, "missing", "no such file") from e
    except ImageReadError:
        raise
    except (UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(path, "cannot decode", str(e)) from e
    except (OSError, ValueError) as e:  # PIL's errors for broken data: "image file is truncated", ...
        reason = "truncated" if "truncated" in str(e).lower() else "cannot decode"
        raise ImageReadError(path, reason, str(e) or type(e).__name__) from e


def to_rgb8(image: Image.Image, path: str | os.PathLike = "image") -> np.ndarray:
    """RGB uint8 `[H, W, 3]` (writable, contiguous) of an opened PIL image; `path` names it in errors."""
    mode = image.mode
    if mode in _UINT16_MODES:
        return _grey_to_rgb(_scale_16bit(np.asarray(image).astype(np.float64)))
    if mode == "I":
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageReadError(path, "unsupported", f"32-bit integer image with values {values.min()}.."
                                 f"{values.max()}, outside the 16-bit range 0..65535; save it as 8 or 16 bit")
        return _grey_to_rgb(_scale_16bit(values.astype(np.float64)))
    if mode == "F":
        return _grey_to_rgb(_float_to_uint8(np.asarray(image, dtype=np.float64), path))
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return np.array(Image.alpha_composite(canvas, rgba).convert("RGB"), dtype=np.uint8)
    if mode in _PLAIN_MODES:
        return np.array(image.convert("RGB"), dtype=np.uint8)
    raise ImageReadError(path, "unsupported", f"PIL image mode {mode!r}; convert it to RGB first")


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255: divide by 257 and round half up."""
    return np.floor(values / 257.0 + 0.5).astype(np.uint8)


def _float_to_uint8(values: np.ndarray, path) -> np.ndarray:
    if values.size == 0:
        return values.astype(np.uint8)
    low, high = float(values.min()), float(values.max())  # NaN propagates into both
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 255:
        raise ImageReadError(path, "unsupported", f"32-bit float image with values {low:g}..{high:g}; expected "
                             f"[0, 1] or [0, 255]")
    scale = 255.0 if high <= 1.0 else 1.0
    return np.floor(values * scale + 0.5).clip(0, 255).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
