"""Box-aware AutoAugment (policies v0-v3, test) and RandAugment for detection, as the official
`efficientdet/aug/autoaugment.py` (Zoph et al., "Learning Data Augmentation Strategies for Object Detection",
arXiv:1906.11172) defines and applies them.

Images: RGB uint8 `[H, W, 3]` numpy; boxes: float32 `[K, 4]` normalised (ymin, xmin, ymax, xmax). The
official input pipeline (`dataloader.py`, training branch) applies the policy to the decoded uint8 image and
its normalised boxes before normalisation, horizontal flip, scale jitter and crop; `data/transforms.py` does
the same.

Randomness: every draw comes from the `rng` argument (a `numpy.random.Generator`, e.g. the dataset's per-item
generator, or any object with its `random()`, `integers(low, high)` and `permutation(n)` methods), in this
order: sub-policy index; then per op of the sub-policy: the apply draw, and if the op applies, its random
sign (rotate / shear / translate ops) and the op's own draws. The official graph draws the same values
(uniform sub-policy, `floor(u + prob)` apply tests, `floor(u + 0.5)` signs), in graph order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import autoaugment_geometry as geo
from . import autoaugment_ops as ops
from .autoaugment_boxes import applies, apply_to_each_box, bbox_cutout

MAX_LEVEL = 10.0
# distort_image_with_autoaugment / distort_image_with_randaugment hparams
HPARAMS = dict(cutout_max_pad_fraction=0.75, cutout_bbox_replace_with_mean=False, cutout_const=100,
               translate_const=250, cutout_bbox_const=50, translate_bbox_const=120)
REPLACE = (128, 128, 128)  # build_and_apply_nas_policy replace_value
# official dataloader.py: `autoaugment_policy == 'randaug'` -> RandAugment(num_layers=1, magnitude=15)
RANDAUG_LAYERS, RANDAUG_MAGNITUDE = 1, 15
RANDAUGMENT_OPS = ("Equalize", "Solarize", "Color", "Cutout", "SolarizeAdd", "TranslateX_BBox", "TranslateY_BBox",
                   "ShearX_BBox", "ShearY_BBox", "Rotate_BBox")

# (op, probability, level) per op, ops of a sub-policy applied in order; one sub-policy chosen per image.
POLICIES = {
    "v0": (
        (("TranslateX_BBox", 0.6, 4), ("Equalize", 0.8, 10)),
        (("TranslateY_Only_BBoxes", 0.2, 2), ("Cutout", 0.8, 8)),
        (("Sharpness", 0.0, 8), ("ShearX_BBox", 0.4, 0)),
        (("ShearY_BBox", 1.0, 2), ("TranslateY_Only_BBoxes", 0.6, 6)),
        (("Rotate_BBox", 0.6, 10), ("Color", 1.0, 6)),
    ),
    "test": ((("TranslateX_BBox", 1.0, 4), ("Equalize", 1.0, 10)),),
    "v2": (
        (("Color", 0.0, 6), ("Cutout", 0.6, 8), ("Sharpness", 0.4, 8)),
        (("Rotate_BBox", 0.4, 8), ("Sharpness", 0.4, 2), ("Rotate_BBox", 0.8, 10)),
        (("TranslateY_BBox", 1.0, 8), ("AutoContrast", 0.8, 2)),
        (("AutoContrast", 0.4, 6), ("ShearX_BBox", 0.8, 8), ("Brightness", 0.0, 10)),
        (("SolarizeAdd", 0.2, 6), ("Contrast", 0.0, 10), ("AutoContrast", 0.6, 0)),
        (("Cutout", 0.2, 0), ("Solarize", 0.8, 8), ("Color", 1.0, 4)),
        (("TranslateY_BBox", 0.0, 4), ("Equalize", 0.6, 8), ("Solarize", 0.0, 10)),
        (("TranslateY_BBox", 0.2, 2), ("ShearY_BBox", 0.8, 8), ("Rotate_BBox", 0.8, 8)),
        (("Cutout", 0.8, 8), ("Brightness", 0.8, 8), ("Cutout", 0.2, 2)),
        (("Color", 0.8, 4), ("TranslateY_BBox", 1.0, 6), ("Rotate_BBox", 0.6, 6)),
        (("Rotate_BBox", 0.6, 10), ("BBox_Cutout", 1.0, 4), ("Cutout", 0.2, 8)),
        (("Rotate_BBox", 0.0, 0), ("Equalize", 0.6, 6), ("ShearY_BBox", 0.6, 8)),
        (("Brightness", 0.8, 8), ("AutoContrast", 0.4, 2), ("Brightness", 0.2, 2)),
        (("TranslateY_BBox", 0.4, 8), ("Solarize", 0.4, 6), ("SolarizeAdd", 0.2, 10)),
        (("Contrast", 1.0, 10), ("SolarizeAdd", 0.2, 8), ("Equalize", 0.2, 4)),
    ),
    "v3": (
        (("Posterize", 0.8, 2), ("TranslateX_BBox", 1.0, 8)),
        (("BBox_Cutout", 0.2, 10), ("Sharpness", 1.0, 8)),
        (("Rotate_BBox", 0.6, 8), ("Rotate_BBox", 0.8, 10)),
        (("Equalize", 0.8, 10), ("AutoContrast", 0.2, 10)),
        (("SolarizeAdd", 0.2, 2), ("TranslateY_BBox", 0.2, 8)),
        (("Sharpness", 0.0, 2), ("Color", 0.4, 8)),
        (("Equalize", 1.0, 8), ("TranslateY_BBox", 1.0, 8)),
        (("Posterize", 0.6, 2), ("Rotate_BBox", 0.0, 10)),
        (("AutoContrast", 0.6, 0), ("Rotate_BBox", 1.0, 6)),
        (("Equalize", 0.0, 4), ("Cutout", 0.8, 10)),
        (("Brightness", 1.0, 2), ("TranslateY_BBox", 1.0, 6)),
        (("Contrast", 0.0, 2), ("ShearY_BBox", 0.8, 0)),
        (("AutoContrast", 0.8, 10), ("Contrast", 0.2, 10)),
        (("Rotate_BBox", 1.0, 10), ("Cutout", 1.0, 10)),
        (("SolarizeAdd", 0.8, 6), ("Equalize", 0.8, 8)),
    ),
}
# v1 = the 5 sub-policies of v0 followed by 15 more
POLICIES["v1"] = POLICIES["v0"] + (
    (("Color", 0.0, 0), ("ShearX_Only_BBoxes", 0.8, 4)),
    (("ShearY_Only_BBoxes", 0.8, 2), ("Flip_Only_BBoxes", 0.0, 10)),
    (("Equalize", 0.6, 10), ("TranslateX_BBox", 0.2, 2)),
    (("Color", 1.0, 10), ("TranslateY_Only_BBoxes", 0.4, 6)),
    (("Rotate_BBox", 0.8, 10), ("Contrast", 0.0, 10)),
    (("Cutout", 0.2, 2), ("Brightness", 0.8, 10)),
    (("Color", 1.0, 6), ("Equalize", 1.0, 2)),
    (("Cutout_Only_BBoxes", 0.4, 6), ("TranslateY_Only_BBoxes", 0.8, 2)),
    (("Color", 0.2, 8), ("Rotate_BBox", 0.8, 10)),
    (("Sharpness", 0.4, 4), ("TranslateY_Only_BBoxes", 0.0, 4)),
    (("Sharpness", 1.0, 4), ("SolarizeAdd", 0.4, 4)),
    (("Rotate_BBox", 1.0, 8), ("Sharpness", 0.2, 8)),
    (("ShearY_BBox", 0.6, 10), ("Equalize_Only_BBoxes", 0.6, 8)),
    (("ShearX_BBox", 0.2, 6), ("TranslateY_Only_BBoxes", 0.2, 10)),
    (("SolarizeAdd", 0.6, 8), ("Brightness", 0.8, 10)),
)
AUTOAUGMENT_CHOICES = ("v0", "v1", "v2", "v3", "test", "randaug")


def _enhance(level):
    return ((level / MAX_LEVEL) * 1.8 + 0.1,)


def _scaled(const):
    return lambda level: ((level / MAX_LEVEL) * float(const),)


def _int_scaled(const):
    return lambda level: (int((level / MAX_LEVEL) * const),)


_NO_ARGS = lambda level: ()  # noqa: E731
# official level_to_arg: level (0..10, RandAugment: its magnitude) -> op arguments, in Python float64
_LEVEL_TO_ARG: dict[str, Callable[[float], tuple]] = {
    "AutoContrast": _NO_ARGS, "Equalize": _NO_ARGS, "Flip_Only_BBoxes": _NO_ARGS, "Equalize_Only_BBoxes": _NO_ARGS,
    "Posterize": _int_scaled(4), "Solarize": _int_scaled(256), "Solarize_Only_BBoxes": _int_scaled(256),
    "SolarizeAdd": _int_scaled(110),
    "Color": _enhance, "Contrast": _enhance, "Brightness": _enhance, "Sharpness": _enhance,
    "Cutout": _int_scaled(HPARAMS["cutout_const"]), "Cutout_Only_BBoxes": _int_scaled(HPARAMS["cutout_bbox_const"]),
    "BBox_Cutout": lambda level: ((level / MAX_LEVEL) * HPARAMS["cutout_max_pad_fraction"],
                                  HPARAMS["cutout_bbox_replace_with_mean"]),
    "Rotate_BBox": _scaled(30.0), "Rotate_Only_BBoxes": _scaled(30.0),
    "ShearX_BBox": _scaled(0.3), "ShearY_BBox": _scaled(0.3),
    "ShearX_Only_BBoxes": _scaled(0.3), "ShearY_Only_BBoxes": _scaled(0.3),
    "TranslateX_BBox": _scaled(HPARAMS["translate_const"]), "TranslateY_BBox": _scaled(HPARAMS["translate_const"]),
    "TranslateX_Only_BBoxes": _scaled(HPARAMS["translate_bbox_const"]),
    "TranslateY_Only_BBoxes": _scaled(HPARAMS["translate_bbox_const"]),
}
# ops whose argument gets a random sign (`_randomly_negate_tensor`, which also makes it a float32 tensor)
SIGNED_OPS = frozenset(name for name in _LEVEL_TO_ARG if name.startswith(("Rotate", "Shear", "Translate")))


def level_to_arg(name: str, level: float, sign: int = 1) -> tuple:
    """Arguments of op `name` at `level` (official `level_to_arg`); signed ops give `sign * magnitude` as
    float32, the others Python ints / floats / bools as the official lambdas return them."""
    args = _LEVEL_TO_ARG[name](level)
    if name in SIGNED_OPS:
        return (np.float32(args[0]) * np.float32(sign),)
    return args


def random_sign(rng) -> int:
    """Official `_randomly_negate_tensor`: keep the sign when `floor(u + 0.5)` is 1, else negate."""
    return 1 if applies(rng.random(), 0.5) else -1


@dataclass(frozen=True)
class _Op:
    """`apply(image, boxes, *args, rng=rng) -> (image, boxes)`; `prob`: the op takes the policy probability
    as first argument (box-only ops, per box); `replace`: the op takes the fill colour as last argument."""
    apply: Callable
    prob: bool = False
    replace: bool = False


def _pixel(func):
    return _Op(lambda image, boxes, *args, rng: (func(image, *args), boxes))


def _boxes(func, **fixed):
    return _Op(lambda image, boxes, *args, rng: func(image, boxes, *args, **fixed), replace=True)


def _only_boxes(func, replace=True):
    return _Op(lambda image, boxes, prob, *args, rng: apply_to_each_box(image, boxes, prob, func, *args, rng=rng),
               prob=True, replace=replace)


def _cutout_content(rng):
    return lambda content, pad_size, replace: ops.cutout(content, pad_size, replace, rng)


OPS: dict[str, _Op] = {
    "AutoContrast": _pixel(ops.autocontrast), "Equalize": _pixel(ops.equalize),
    "Posterize": _pixel(ops.posterize), "Solarize": _pixel(ops.solarize), "SolarizeAdd": _pixel(ops.solarize_add),
    "Color": _pixel(ops.color), "Contrast": _pixel(ops.contrast), "Brightness": _pixel(ops.brightness),
    "Sharpness": _pixel(ops.sharpness),
    "Cutout": _Op(lambda image, boxes, pad, replace, rng: (ops.cutout(image, pad, replace, rng), boxes),
                  replace=True),
    "BBox_Cutout": _Op(lambda image, boxes, fraction, with_mean, rng: bbox_cutout(image, boxes, fraction,
                                                                                 with_mean, rng)),
    "Rotate_BBox": _boxes(geo.rotate_with_bboxes),
    "TranslateX_BBox": _boxes(geo.translate_bbox, shift_horizontal=True),
    "TranslateY_BBox": _boxes(geo.translate_bbox, shift_horizontal=False),
    "ShearX_BBox": _boxes(geo.shear_with_bboxes, shear_horizontal=True),
    "ShearY_BBox": _boxes(geo.shear_with_bboxes, shear_horizontal=False),
    "Rotate_Only_BBoxes": _only_boxes(geo.rotate), "ShearX_Only_BBoxes": _only_boxes(geo.shear_x),
    "ShearY_Only_BBoxes": _only_boxes(geo.shear_y), "TranslateX_Only_BBoxes": _only_boxes(geo.translate_x),
    "TranslateY_Only_BBoxes": _only_boxes(geo.translate_y),
    "Flip_Only_BBoxes": _only_boxes(lambda content: content[:, ::-1], replace=False),
    "Solarize_Only_BBoxes": _only_boxes(ops.solarize, replace=False),
    "Equalize_Only_BBoxes": _only_boxes(ops.equalize, replace=False),
    # the cutout of each box draws its centre from the same rng, after that box's apply draw
    "Cutout_Only_BBoxes": _Op(lambda image, boxes, prob, pad, replace, rng: apply_to_each_box(
        image, boxes, prob, _cutout_content(rng), pad, replace, rng=rng), prob=True, replace=True),
}


def apply_op(name: str, image: np.ndarray, boxes: np.ndarray, args: tuple, rng, prob: float | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Run op `name` with its `level_to_arg` arguments, adding the policy probability (box-only ops) and the
    fill colour as the official `_parse_policy_info` does. Returns `(image [H, W, 3] uint8, boxes [K, 4])`."""
    op = OPS[name]
    if op.prob and prob is None:
        raise ValueError(f"{name}: box-only op needs the policy probability (prob=)")
    full = ((prob,) if op.prob else ()) + tuple(args) + ((REPLACE,) if op.replace else ())
    return op.apply(image, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), *full, rng=rng)


def _apply_with_prob(name: str, prob: float, level: float, image, boxes, rng):
    """Official `_apply_func_with_prob`: box-only ops always run (they use prob per box), others with `prob`."""
    if not applies(rng.random(), 1.0 if OPS[name].prob else prob):
        return image, boxes
    args = level_to_arg(name, level, random_sign(rng) if name in SIGNED_OPS else 1)
    return apply_op(name, image, boxes, args, rng, prob=prob)


def distort_image_with_autoaugment(image: np.ndarray, boxes: np.ndarray, policy: str, rng
                                   ) -> tuple[np.ndarray, np.ndarray]:
    """One uniformly chosen sub-policy of `POLICIES[policy]`, its ops applied in order with their
    probabilities. image uint8 `[H, W, 3]`, boxes `[K, 4]` normalised yxyx -> the same, K unchanged."""
    if policy not in POLICIES:
        raise ValueError(f"autoaugment policy {policy!r}: expected one of {', '.join(POLICIES)}")
    subpolicies = POLICIES[policy]
    for name, prob, level in subpolicies[int(rng.integers(0, len(subpolicies)))]:
        image, boxes = _apply_with_prob(name, prob, level, image, boxes, rng)
    return image, boxes


def distort_image_with_randaugment(image: np.ndarray, boxes: np.ndarray, num_layers: int, magnitude: float, rng
                                   ) -> tuple[np.ndarray, np.ndarray]:
    """Official RandAugment for detection: `num_layers` times, one op of `RANDAUGMENT_OPS` chosen uniformly
    and applied (no apply probability) at level `magnitude` (which may exceed 10: the official pipeline uses 15).
    The official code also draws an unused U(0.2, 0.8) per op (it reaches only ops taking a probability,
    none of these); it is not drawn here."""
    for _ in range(num_layers):
        name = RANDAUGMENT_OPS[int(rng.integers(0, len(RANDAUGMENT_OPS)))]
        args = level_to_arg(name, float(magnitude), random_sign(rng) if name in SIGNED_OPS else 1)
        image, boxes = apply_op(name, image, boxes, args, rng)
    return image, boxes


def augment(image: np.ndarray, boxes: np.ndarray, policy: str, rng) -> tuple[np.ndarray, np.ndarray]:
    """The official training option `autoaugment_policy`: a policy name of `POLICIES`, or `randaug`
    (RandAugment with 1 layer at magnitude 15, as `dataloader.py` calls it)."""
    if policy == "randaug":
        return distort_image_with_randaugment(image, boxes, RANDAUG_LAYERS, RANDAUG_MAGNITUDE, rng)
    return distort_image_with_autoaugment(image, boxes, policy, rng)
