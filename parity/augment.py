"""Parity of `data/autoaugment*.py` with the official AutoAugment outputs (fixture kind `augmentation`).

The fixture (`tf_reference_autoaugment/`: `cases.json`, `autoaugment_cases.npz`, see its README) holds, for
every op at fixed levels and signs, the official output image and boxes, the exact arguments, and the random
values the official code drew. Each case is replayed here with those values and compared.

`augmentation_checks(folder)` -> `{name: {"max_abs", "rel", "tol", "ok"}}`:
* `aug_<case>_image`: `max_abs` = largest intensity difference; `rel` = fraction of pixels with a channel
  off by more than one level. Ops that resample or blend in float (geometric warps, Color, Contrast,
  Brightness, Sharpness, AutoContrast) may be one level off anywhere and more on at most 1 % of the pixels
  (`tol` = 0.01: a `.5` sampling coordinate or a float32 rounding can flip a pixel); the integer ops must be
  exact (`max_abs` 0, `tol` 0). A case whose recorded draws do not fit our draws fails with `inf`.
* `aug_<case>_boxes`: `max_abs` = `rel` = max |delta| in normalised units, `tol` = 1e-4.
* `aug_level_to_arg`, `aug_policies`: number of mismatching entries (`tol` 0).
Cases: `case000`..`case067` (single ops) and `policy_test_signpos` / `policy_test_signneg` (the whole `test`
policy through `distort_image_with_autoaugment`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data import autoaugment as aa
from parity.checks import FixtureError

IMAGE_TOL, BOX_TOL = 0.01, 1e-4
# ops whose official implementation interpolates / rounds floats: up to 1 % of values may be off by > 1 level
_FLOAT_OPS = frozenset({"Color", "Contrast", "Brightness", "Sharpness", "AutoContrast", "Rotate_BBox",
                        "ShearX_BBox", "ShearY_BBox", "TranslateX_BBox", "TranslateY_BBox", "Rotate_Only_BBoxes",
                        "ShearX_Only_BBoxes", "ShearY_Only_BBoxes", "TranslateX_Only_BBoxes",
                        "TranslateY_Only_BBoxes"})


class Replay:
    """Stands for the `numpy.random.Generator` of the ops and replays recorded draws: `random()` pops from
    `uniforms`, `integers(low, high)` from `integers` (checked to lie in [low, high)), `permutation(n)` from
    `permutations`."""

    def __init__(self, uniforms=(), integers=(), permutations=()):
        self.uniforms, self.ints, self.perms = list(uniforms), list(integers), list(permutations)

    def random(self) -> float:
        return float(self.uniforms.pop(0))

    def integers(self, low: int, high: int) -> int:
        value = int(self.ints.pop(0))
        if not low <= value < high:
            raise AssertionError(f"recorded draw {value} outside [{low}, {high})")
        return value

    def permutation(self, n: int) -> np.ndarray:
        order = np.asarray(self.perms.pop(0), dtype=np.int64)
        if sorted(order.tolist()) != list(range(n)):
            raise AssertionError(f"recorded order {order.tolist()} is not a permutation of {n} boxes")
        return order

    def exhausted(self) -> bool:
        return not (self.uniforms or self.ints or self.perms)


def _shuffle_order(case: dict, boxes: np.ndarray) -> list[int]:
    """Box indices in the recorded `tf.random.shuffle` order (the shuffled boxes are recorded by value)."""
    shuffled = np.asarray(next(v for _, op, v in case["random_values_drawn"] if op == "RandomShuffle"))
    return [int(np.abs(boxes - row).sum(1).argmin()) for row in shuffled]


def _replay_case(case: dict, boxes: np.ndarray) -> Replay:
    """The draws of one single-op case, in the order our implementation makes them."""
    op, drawn = case["op"], [v for _, kind, v in case["random_values_drawn"] if kind == "RandomUniformInt"]
    if op.endswith("_Only_BBoxes") and op != "Cutout_Only_BBoxes":
        # official call with prob 3.0: per-box probability 1, every box processed in the recorded order
        return Replay(uniforms=[0.0] * len(boxes), permutations=[_shuffle_order(case, boxes)])
    if op == "Cutout_Only_BBoxes":
        # the fixture processed every box in list order, drawing (row, col) per box in crop coordinates
        return Replay(uniforms=[0.0] * len(boxes), integers=drawn, permutations=[list(range(len(boxes)))])
    return Replay(integers=drawn)  # Cutout: row, col; BBox_Cutout: box index, row, col


def _replay_policy(run: dict) -> Replay:
    """`test` policy run: graph draws `random_uniform` (the sign of TranslateX_BBox), `random_uniform_1`
    (sub-policy), `cond_1/random_uniform[_1]` (apply draws of the two ops); reordered as ours: sub-policy,
    apply op 1, sign, apply op 2."""
    values = {name: value for name, _, value in run["random_values_drawn"]}
    return Replay(uniforms=[values["cond_1/random_uniform/RandomUniform"], values["random_uniform/RandomUniform"],
                            values["cond_1/random_uniform_1/RandomUniform"]],
                  integers=[values["random_uniform_1"]])


def _image_check(ours: np.ndarray, ref: np.ndarray, exact: bool) -> dict:
    if ours.shape != ref.shape:
        return {"max_abs": float("inf"), "rel": 1.0, "tol": 0.0, "ok": False}
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    max_abs, rel = float(diff.max()), float((diff.max(axis=-1) > 1).mean())
    tol = 0.0 if exact else IMAGE_TOL
    return {"max_abs": max_abs, "rel": rel, "tol": tol, "ok": max_abs == 0 if exact else rel <= tol}


def _boxes_check(ours: np.ndarray, ref: np.ndarray) -> dict:
    if ours.shape != ref.shape:
        return {"max_abs": float("inf"), "rel": float("inf"), "tol": BOX_TOL, "ok": False}
    delta = float(np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max(initial=0.0))
    return {"max_abs": delta, "rel": delta, "tol": BOX_TOL, "ok": delta <= BOX_TOL}


def _plain(value):
    """numpy scalars -> Python scalars (bools stay bools), for an exact, type-aware comparison with json."""
    return value.item() if isinstance(value, np.generic) else value


def _same_args(ours: tuple, ref: list) -> bool:
    ours = [_plain(v) for v in ours]
    return len(ours) == len(ref) and all(type(a) is type(b) and a == b for a, b in zip(ours, ref))


def _count(mismatches: int) -> dict:
    return {"max_abs": float(mismatches), "rel": float(mismatches), "tol": 0.0, "ok": mismatches == 0}


def _table_checks(meta: dict) -> dict[str, dict]:
    table = meta["level_to_arg_table"]
    arg_misses = sum(not _same_args(aa.level_to_arg(name, row["level"]), row["args"])
                     for name, rows in table.items() for row in rows)
    arg_misses += len(set(table) ^ set(aa.OPS))
    policy_misses = sum(
        [[list(op) for op in sub] for sub in aa.POLICIES.get(name, ())] != subs
        for name, subs in meta["policies"].items())
    policy_misses += len(set(meta["policies"]) ^ set(aa.POLICIES))
    policy_misses += list(aa.RANDAUGMENT_OPS) != meta["randaugment"]["available_ops"]
    policy_misses += sorted(aa.SIGNED_OPS) != sorted(meta["signed_ops"])
    return {"aug_level_to_arg": _count(arg_misses), "aug_policies": _count(policy_misses)}


_FAILED = {"max_abs": float("inf"), "rel": float("inf"), "tol": 0.0, "ok": False}


def _load(folder: Path) -> tuple[dict, dict]:
    try:
        meta = json.loads((folder / "cases.json").read_text())
        with np.load(folder / "autoaugment_cases.npz") as npz:
            arrays = dict(npz)
        keys = ["input_image", "input_boxes"] + [f"{c['key']}_{part}" for c in meta["cases"] + meta["policy_runs"]
                                                  for part in ("image", "boxes")]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FixtureError(f"{folder}: not a readable AutoAugment fixture ({type(e).__name__}: {e})") from None
    missing = [key for key in keys if key not in arrays]
    if missing:
        raise FixtureError(f"{folder}: autoaugment_cases.npz lacks {', '.join(missing[:3])}")
    return meta, arrays


def augmentation_checks(folder: Path) -> dict[str, dict]:
    """All checks of the fixture in `folder` (see the module docstring)."""
    folder = Path(folder)
    meta, arrays = _load(folder)
    image, boxes = arrays["input_image"], arrays["input_boxes"]
    if {k: float(v) for k, v in meta["augmentation_hparams"].items()} != {k: float(v) for k, v in aa.HPARAMS.items()}:
        raise FixtureError(f"{folder}: hparams {meta['augmentation_hparams']} are not data/autoaugment.HPARAMS")
    checks = _table_checks(meta)
    runs = [(case["key"], case["op"] not in _FLOAT_OPS, lambda case=case: _run_case(case, image, boxes))
            for case in meta["cases"]]
    runs += [(run["key"], False, lambda run=run: aa.distort_image_with_autoaugment(
        image, boxes, run["policy"], _replay_policy(run))) for run in meta["policy_runs"]]
    for key, exact, call in runs:
        try:
            out_image, out_boxes = call()
        except AssertionError:  # our draws do not fit the recorded ones
            checks[f"aug_{key}_image"], checks[f"aug_{key}_boxes"] = dict(_FAILED), dict(_FAILED)
            continue
        checks[f"aug_{key}_image"] = _image_check(out_image, arrays[key + "_image"], exact)
        checks[f"aug_{key}_boxes"] = _boxes_check(out_boxes, arrays[key + "_boxes"])
    return checks


def _run_case(case: dict, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One op with the case's arguments and recorded draws (box-only ops with prob 3.0, as recorded)."""
    rng = _replay_case(case, boxes)
    prob = 3.0 if aa.OPS[case["op"]].prob else None
    result = aa.apply_op(case["op"], image, boxes, tuple(case["args"]), rng, prob=prob)
    if not rng.exhausted():
        raise AssertionError(f"{case['key']}: recorded draws left unused")
    return result
