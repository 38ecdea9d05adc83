"""`--image-size`: the official `image_size` hparam forms on the command line, checked before any work.

`S` is S x S; `WxH` is width x height, as the official `utils.parse_image_size` reads "640x384" (640 wide,
384 high). Any size the official network builds is accepted (`model.efficientdet.validate_image_size`).
"""
from __future__ import annotations

import argparse

from model.config import EfficientDetConfig, parse_image_size
from model.efficientdet import validate_image_size

HELP = ("network input size: S (S x S) or WxH, width first as the official image_size hparam (640x384 is 640 wide, "
        "384 high); any size the official network accepts (default: the one stored in --weights, else the "
        "variant's official size)")


def image_size_arg(text: str) -> int | tuple[int, int]:
    """argparse `type` of --image-size: `S` -> S, `WxH` -> (H, W) (S when square); bad text is a usage error."""
    try:
        h, w = parse_image_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer S or WxH (width x height, e.g. 640x384), got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"expected positive sides (S or WxH, e.g. 640x384), got {text!r}")
    return h if h == w else (h, w)


def resolve_image_size(config: EfficientDetConfig, *candidates, flag: str = "--image-size") -> tuple[int, int]:
    """(H, W) of the first candidate that is set (e.g. the flag, then the size stored with the weights), else the
    variant's official size; a ValueError naming `flag` if the official network cannot take it."""
    size = next((c for c in candidates if c), config.image_size)
    hw = parse_image_size(size)
    validate_image_size(config, hw, flag)
    return hw
