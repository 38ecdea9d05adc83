"""Check this implementation against a reference folder made by the official TF code.

    python -m parity.tf_parity FIXTURE_DIR [--json] [--float64]

The kind of fixture is read off its files: `reference_outputs.npz` -> "inference", `train_outputs.npz` ->
"training", `autoaugment_cases.npz` -> "augmentation". The variant is meta.json's `model_name`; a training
fixture names its checkpoint in `checkpoint.path` (relative to the folder); with `--float64` the trainer's step
runs in float64 against the official step in float64 (`train_outputs_float64.npz`), every check within 1e-7
(`parity.training.FLOAT64_TOL`). Exit status: 0 all checks within
tolerance, 1 some check out of tolerance, 2 the folder cannot be checked (one-line error on stderr).

Another module adds a kind with `KINDS[name] = function(folder: Path, meta: dict) -> {check: {"max_abs",
"rel", "tol", "ok"}}` and a file name in `KIND_FILES`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from parity.checks import FixtureError, read_meta

CHECK_HELP = """checks (tol bounds `rel` unless marked [abs]: then `max_abs`; [exact]: equality):
 inference: input_tensor [abs] our preprocessing of the photo; backbone_features, fpn_features,
   class_outputs, box_outputs, no_ema_outputs [abs] network tensors (EMA / raw weights, eval mode);
   anchors [abs] px; detections: `-mode infer --nms soft --threshold 0` on the photo, fraction of the
   official det_* rows (with area inside the photo) not found by class and box (0.5 px), max_abs = worst box
   px; detection_scores: fraction of the found rows whose score is off by more than 1e-3 (soft-NMS order of
   near-tied candidates), max_abs = worst score.
 training: images (input chain), gt_boxes [abs] px, targets [exact] class target + match of every anchor and
   gt classes, box_targets [abs], num_positives [exact] per image and loss normaliser; class_outputs,
   box_outputs (training-mode forward, rel to each tensor's max); cls_loss, box_loss, det_loss, reg_l2_loss,
   total_loss; cls_loss_per_level, box_loss_per_level, cls_loss_per_anchor (focal-loss maps); grads (chosen
   head variables, rel to each tensor's norm), grads_upstream (chosen backbone / BiFPN variables);
   grad_norms (all trainable variables, rel to the largest); grad_global_norm (before and after clipping);
   clipped_grads, momentum, values_after_step (one SGD step), bn_stats (moving statistics after the
   forward), ema (shadows after the step, TF1 det_model_fn convention).
 augmentation: as defined by parity/augment.py."""


def _inference(folder: Path, meta: dict) -> dict:
    from parity.inference import inference_checks
    return inference_checks(folder, meta)


def _training(folder: Path, meta: dict, float64: bool = False) -> dict:
    from parity.training import training_checks
    return training_checks(folder, meta, float64=float64)


def _augmentation(folder: Path, meta: dict) -> dict:
    try:
        from parity.augment import augmentation_checks
    except ImportError:
        raise FixtureError("augmentation fixtures are not supported by this build") from None
    return augmentation_checks(folder)


KINDS: dict[str, Callable[[Path, dict], dict]] = {"inference": _inference, "training": _training,
                                                  "augmentation": _augmentation}
KIND_FILES = {"reference_outputs.npz": "inference", "train_outputs.npz": "training",
              "autoaugment_cases.npz": "augmentation"}


def detect_kind(folder: Path) -> str:
    if not folder.is_dir():
        raise FixtureError(f"{folder}: not a folder")
    kinds = [kind for file, kind in KIND_FILES.items() if (folder / file).is_file()]
    if len(kinds) != 1:
        raise FixtureError(f"{folder}: expected exactly one of {', '.join(KIND_FILES)}, found "
                           f"{len(kinds) or 'none'}")
    return kinds[0]


def run(folder: Path, float64: bool = False) -> dict:
    """`{"model", "kind", "float64", "checks", "ok"}` for the fixture at `folder` (raises FixtureError when
    unusable); `float64`: the float64 comparison of a training fixture."""
    kind = detect_kind(folder)
    if float64 and not (kind == "training" and (folder / "train_outputs_float64.npz").is_file()):
        raise FixtureError(f"{folder}: --float64 needs a training fixture with train_outputs_float64.npz")
    meta = read_meta(folder) if kind != "augmentation" or (folder / "meta.json").is_file() else {}
    checks = _training(folder, meta, float64=True) if float64 else KINDS[kind](folder, meta)
    return {"model": meta.get("model_name"), "kind": kind, "float64": float64, "checks": checks,
            "ok": all(c["ok"] for c in checks.values())}


def format_table(result: dict) -> str:
    lines = [f"{result['model']} ({result['kind']} fixture{', float64' if result.get('float64') else ''})",
             f"{'check':<22} {'max |Δ|':>10} {'rel':>10} {'tol':>8}  ok"]
    for name, c in result["checks"].items():
        lines.append(f"{name:<22} {c['max_abs']:>10.3e} {c['rel']:>10.3e} {c['tol']:>8.1e}  "
                     f"{'ok' if c['ok'] else 'FAIL'}")
    lines.append("all within tolerance" if result["ok"] else "OUT OF TOLERANCE: " + ", ".join(
        n for n, c in result["checks"].items() if not c["ok"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity.tf_parity", description=__doc__.split("\n\n")[0],
                                     epilog=CHECK_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fixture", type=Path, metavar="FIXTURE_DIR", help="reference folder (see README)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--float64", action="store_true",
                        help="training fixture: run our step in float64 and compare it with the official float64 "
                             "step (train_outputs_float64.npz), every check within 1e-7")
    args = parser.parse_args(argv)
    try:
        result = run(args.fixture, args.float64)
    except (FixtureError, ValueError, OSError) as e:  # FixtureError: the folder; others: this build cannot run it
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else format_table(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
