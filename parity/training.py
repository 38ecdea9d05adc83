"""Training fixtures (`train_outputs.npz`): one official training step, reproduced by the trainer's own step.

The step is `train.step.TrainStep`, what `-mode trainval` runs, built by `TrainStep.from_flags` from the
fixture's hyper-parameters given as the trainer's flags (`_trainer_flags`): the fixture's two source photos
and boxes go through `CocoDetection` + `TrainTransform` + `collate_detection` (written to a temporary
COCO-format folder), `TargetAssigner` labels the anchors, the model (raw checkpoint weights, training mode:
BN batch statistics, momentum 0.01; channels_last as the trainer on CPU) runs forward on the fixture's input
images, `detection_loss` and backward give the gradients, `EfficientDetSGD.step` adds the L2 gradient,
clips and updates, `ModelEMA.update` moves the shadows (which start at the checkpoint's
`ExponentialMovingAverage` values, like the fixture's `ema_before__*`). `float64`: the same step with the
model in float64, against `train_outputs_float64.npz`.

Folder layout (as `../shared/fixtures/tf_reference_d0_train`, see its README): `meta.json` (`model_name`,
`checkpoint.path` relative to the folder, `hparams`, `learning_rate`, `chosen_variables`,
`trainable_variables_order`, `bn_moving_stat_variables`), `inputs.npz`, `targets.npz`, `train_outputs.npz`.
TF layouts: NHWC tensors, HWIO kernels; names `<prefix>__<TF variable name with / -> __>`.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from parity.checks import FixtureError, compare, load_npz, nhwc, ported_model, scalar_check, variant_of
from utils.port_tf import tf_to_torch
from utils.tf_names import efficientdet_names

# Float32 mode: our float32 step against the official float32 step (train_outputs.npz). Neither is exact, so a
# check's tolerance is how far TF's float32 result is from exact arithmetic plus how far ours is: by the
# triangle inequality |ours - TF| <= |TF - exact| + |ours - exact|. Both distances measured on
# tf_reference_d0_train with the checks' own measures against train_outputs_float64.npz (TF: train_outputs.npz;
# ours: our float32 step, NCHW or channels_last, the larger; README_float64.md lists TF's, relative to the
# exact values where these are relative to TF's, as the checks are). Ours counts twice: it moves with the
# thread count. tests/test_train_parity.py re-measures both and checks each tolerance.
FLOAT32_FROM_EXACT = {  # check: (TF float32 from exact, ours float32 from exact)
    "class_outputs": (4.52e-4, 1.56e-5), "box_outputs": (8.46e-4, 2.07e-5),
    "cls_loss": (3.39e-5, 3.14e-6), "box_loss": (2.05e-7, 4.23e-7), "det_loss": (2.93e-5, 2.68e-6),
    "reg_l2_loss": (9.49e-8, 9.49e-8), "total_loss": (2.50e-5, 2.30e-6),
    "cls_loss_per_level": (1.37e-4, 4.27e-6), "box_loss_per_level": (2.31e-5, 1.42e-6),
    "cls_loss_per_anchor": (1.834e-3, 3.24e-5),
    "grads": (9.71e-4, 2.24e-5),  # head variables
    "grads_upstream": (6.25e-2, 1.46e-3),  # backbone / BiFPN: TF's float32 batch statistics (README_float64.md)
    "grad_norms": (3.48e-3, 1.32e-4), "grad_global_norm": (1.06e-3, 2.85e-5),
    "clipped_grads": (6.23e-2, 1.69e-3), "momentum": (6.23e-2, 1.69e-3), "values_after_step": (3.75e-4, 9.26e-6),
    "bn_stats": (1.56e-5, 2.75e-7), "ema": (3.00e-4, 7.42e-6)}


def _round_up(value: float) -> float:
    """`value` rounded up to 2 significant digits (a tolerance that reads as measured)."""
    unit = 10.0 ** (math.floor(math.log10(value)) - 1)
    return float(f"{math.ceil(value / unit - 1e-9) * unit:.2g}")


TOL = {name: _round_up(tf + 2 * ours) for name, (tf, ours) in FLOAT32_FROM_EXACT.items()}
# The input chain's checks compare float32 data of both sides (the float64 step is fed the same inputs):
TOL.update({
    "images": 1e-4,  # our TrainTransform's resize against TF's, both float32 (measured 6.2e-6)
    "gt_boxes": 1e-4,  # px: <= 1 float32 ulp below 512 px (6.1e-5); measured 0
    "targets": 0.0, "num_positives": 0.0,  # exact
    # TF's float32 log is not correctly rounded: th, tw 1 ulp from ours (ulp <= 4.8e-7 for |t| < 4; max |t|
    # 2.0, measured 6.0e-8); ty, tx are equal (model/anchors.py BoxCoder.encode)
    "box_targets": 1e-6})
EXACT = ("targets", "num_positives")  # compared for equality in both modes
# --float64: our step in float64 against the official step in float64 (train_outputs_float64.npz), one
# tolerance for every check. Measured <= 1.6e-8, except box_loss_per_level 5.5e-8: the box targets are
# float32 in both runs (the official labeller is float32-only) and TF's th, tw are 1 ulp from ours.
FLOAT64_TOL = 1e-7
GRAD_FLOOR = 1e-6  # x global norm: gradients that are 0 in exact arithmetic (a bias before a BN) are noise
REFERENCE_FILES = {False: "train_outputs.npz", True: "train_outputs_float64.npz"}


def _dataset(folder: Path, inputs: dict, meta: dict, root: Path, config):
    """The fixture's photos and boxes as a one-off COCO-format folder, read as `-mode trainval` reads data
    (`config`: the variant's, for its input normalisation)."""
    from data.coco import CocoDetection
    from data.transforms import TrainTransform

    hp = meta.get("hparams", {})
    if hp.get("input_rand_hflip", False) or hp.get("jitter_min", 1.0) != 1.0 or hp.get("jitter_max", 1.0) != 1.0:
        raise FixtureError(f"{folder}/meta.json: a random input chain (flip / scale jitter) cannot be reproduced; "
                           f"expected input_rand_hflip false and jitter_min = jitter_max = 1.0")
    images, annotations = [], []
    for b in range(len(inputs["gt_num_original"])):
        photo = inputs[f"image_uint8_{b}"]
        Image.fromarray(photo).save(root / f"{b}.png")
        images.append({"id": b, "file_name": f"{b}.png", "height": photo.shape[0], "width": photo.shape[1]})
        for k in range(int(inputs["gt_num_original"][b])):
            y0, x0, y1, x1 = (float(v) for v in inputs["gt_boxes_original"][b, k])
            annotations.append({"id": len(annotations) + 1, "image_id": b, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "category_id": int(inputs["gt_classes_original"][b, k]),
                                "iscrowd": int(inputs["gt_is_crowd_original"][b, k]) if hp.get(
                                    "skip_crowd_during_training", True) else 0})
    num_classes = int(hp.get("num_classes", 90))  # official ids 1..num_classes -> classes 0..num_classes-1
    categories = [{"id": i, "name": f"class_{i}"} for i in range(1, num_classes + 1)]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                     "categories": categories}))
    size = meta.get("image_size_hw") or inputs["images"].shape[1:3]
    normalization = {"mean_rgb": config.mean_rgb, "stddev_rgb": config.stddev_rgb}
    return CocoDetection(root / "instances.json", root, train=True, image_size=tuple(size), label_map="contiguous",
                         transform=TrainTransform(tuple(size), 1.0, 1.0, hflip=False, **normalization),
                         max_instances=int(hp.get("max_instances_per_image", 100)), **normalization)


def _tf_lookup(model) -> dict[str, tuple[str, int | None]]:
    """TF variable name -> (our state-dict key, element index for stacked scalars or None)."""
    out = {}
    for key, tf in efficientdet_names(model).items():
        for j, name in enumerate(tf) if isinstance(tf, list) else [(None, tf)]:
            out[name] = (key, j)
    return out


def _trainer_flags(folder: Path, meta: dict, extra: tuple[str, ...]) -> argparse.Namespace:
    """The fixture's hyper-parameters as the trainer's flags (`train.cli`), plus `extra` (e.g. `--nchw`).

    The rate is constant in the fixture: `--warmup-epochs 0` makes the trainer's cosine schedule give exactly
    `--lr` at the first step. What the trainer has no flag for must be the official default it uses."""
    from train.cli import add_train_args

    hp = meta.get("hparams", {})
    fixed = {"momentum": 0.9, "alpha": 0.25, "gamma": 1.5, "delta": 0.1, "box_loss_weight": 50.0}
    other = {k: hp[k] for k, v in fixed.items() if k in hp and float(hp[k]) != v}
    if other:
        raise FixtureError(f"{folder}/meta.json: hparams {other} differ from the trainer's fixed official values")
    parser = argparse.ArgumentParser()
    add_train_args(parser, validate=False)
    return parser.parse_args([
        "--lr", repr(float(meta.get("learning_rate", 0.01))), "--warmup-epochs", "0", "--epochs", "1",
        "--weight-decay", repr(float(hp.get("weight_decay", 4e-5))),
        "--clip-norm", repr(float(hp.get("clip_gradients_norm", 10.0))),
        "--ema-decay", repr(float(hp.get("moving_average_decay", 0.9998))),
        "--label-smoothing", repr(float(hp.get("label_smoothing", 0.0))), "--device", "cpu", *extra])


def run_step(folder: Path, meta: dict, dtype: torch.dtype = torch.float32, flags: tuple[str, ...] = ()) -> dict:
    """Run the trainer's step (`train.step.TrainStep`, built from the fixture's hyper-parameters as flags
    plus `flags`, e.g. `--nchw`; by default channels_last, as `-mode trainval` on CPU) on the fixture's
    batch, the model in `dtype`; returns our tensors by name (numpy, TF layouts where the fixture has them)."""
    from data.coco import collate_detection
    from train.step import TrainStep, lr_schedule

    name = variant_of(meta)
    if meta.get("backbone_drop_connect_used", False):
        raise FixtureError(f"{folder}/meta.json: backbone_drop_connect_used is true; a random drop-connect "
                           f"forward cannot be compared (generate the fixture without it)")
    inputs = load_npz(folder, "inputs.npz", ["images", "gt_num_original", "gt_boxes_original"])
    checkpoint = folder / (meta.get("checkpoint") or {}).get("path", "model")
    model = ported_model(checkpoint, name, ema=False).to(dtype)
    for module in model.modules():  # the fixture's training forward ran without drop-connect
        if hasattr(module, "survival_prob"):
            module.survival_prob = 0.0
    args = _trainer_flags(folder, meta, flags)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = _dataset(folder, inputs, meta, Path(tmp), model.config)
        images, batch = collate_detection([dataset[i] for i in range(len(dataset))])
    image_size = tuple(images.shape[-2:])
    step = TrainStep.from_flags(model, args, image_size, lr_schedule(args, 1, len(images)), torch.device("cpu"))
    step.ema.module.load_state_dict(ported_model(checkpoint, name, ema=True).state_dict())  # ema_before__*

    out = {"images": nhwc(images), "gt_boxes": batch["gt_boxes"].numpy(), "gt_classes": batch["gt_classes"].numpy()}
    matches = step.assigner.match(batch["gt_boxes"], batch["gt_classes"])
    out.update(match_results=matches.numpy(), num_positives=(matches >= 0).sum(1).float().numpy())

    def on_forward(forward):  # the forward's tensors, the loss terms and the BN statistics it updated
        targets, losses = forward.targets, forward.losses
        out.update(cls_targets=targets.cls_targets.numpy(), box_targets=targets.box_targets.numpy(),
                   num_positives_sum=float(targets.num_positives) + 1.0,
                   class_outputs=[nhwc(c) for c in forward.cls_outputs],
                   box_outputs=[nhwc(b) for b in forward.box_outputs],
                   cls_loss=float(losses["cls_loss"].detach()), box_loss=float(losses["box_loss"].detach()),
                   det_loss=float(losses["loss"].detach()), reg_l2_loss=float(step.optimizer.reg_l2_loss()),
                   bn_after_forward={k: v.clone() for k, v in model.state_dict().items()})
        out["total_loss"] = out["det_loss"] + out["reg_l2_loss"]
        _per_level(out, forward.cls_outputs, forward.box_outputs, targets, args.label_smoothing)

    params = dict(model.named_parameters())
    stages = {}

    def observed(before, stage, run):  # the gradients before / after a stage of the optimiser's own step
        def wrapped():
            if before:
                stages[before] = _grads(params)
            result = run()
            stages[stage] = _grads(params)
            return result
        return wrapped

    step.observe = on_forward
    step.optimizer.add_l2_gradients_ = observed("grad_det", "grad_total", step.optimizer.add_l2_gradients_)
    step.optimizer.clip_gradients_ = observed(None, "grad_clipped", step.optimizer.clip_gradients_)
    lr = step.optimizer.param_groups[0]["lr"]
    if step(torch.from_numpy(inputs["images"]).permute(0, 3, 1, 2), batch["gt_boxes"], batch["gt_classes"]) is None:
        raise FixtureError(f"{folder}: the training loss is not finite")
    out.update(stages, lookup=_tf_lookup(model), values_after_step={k: p.detach().clone() for k, p in params.items()},
               momentum={k: step.optimizer.state[p]["momentum_buffer"].clone() for k, p in params.items()},
               ema_after_step=step.ema.module.state_dict(), learning_rate=lr,
               ema_decay=step.ema.decay_at(step.ema.num_updates),
               global_norm_after_clipping=float(step.optimizer.last_grad_norm))
    return out


def _grads(params: dict) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in params.items() if p.grad is not None}


def _per_level(out: dict, cls_outs, box_outs, targets, label_smoothing: float) -> None:
    """Per-level losses and the per-anchor focal-loss maps `[B, H, W, A]` (normalised as official), by the
    loss functions of the step, with its (official default) alpha, gamma and delta."""
    from model import flatten_outputs
    from train.loss import box_loss_sum, focal_loss_per_anchor

    logits, deltas = flatten_outputs(cls_outs, box_outs)
    normaliser = out["num_positives_sum"]
    per_anchor = focal_loss_per_anchor(logits.detach(), targets.cls_targets,
                                       label_smoothing=label_smoothing) / normaliser
    out["cls_loss_per_anchor"], out["cls_loss_per_level"], out["box_loss_per_level"] = [], [], []
    start = 0
    for c in cls_outs:
        b, _, h, w = c.shape
        n = h * w * (box_outs[0].shape[1] // 4)
        out["cls_loss_per_anchor"].append(per_anchor[:, start:start + n].reshape(b, h, w, -1).numpy())
        out["cls_loss_per_level"].append(float(per_anchor[:, start:start + n].sum()))
        box = box_loss_sum(deltas[:, start:start + n].detach(), targets.box_targets[:, start:start + n])
        out["box_loss_per_level"].append(float(box) / (4.0 * normaliser))
        start += n


def _tf_value(store: dict, lookup: dict, tf_name: str) -> torch.Tensor:
    key, j = lookup[tf_name]
    return store[key] if j is None else store[key][j]


def _reference(name: str, array: np.ndarray) -> torch.Tensor:
    """A fixture tensor in our layout, in its own precision (float32, or float64 for the float64 file)."""
    return tf_to_torch(name, array, array.dtype) if array.ndim else torch.tensor(array.item(), dtype=torch.float64)


def training_checks(folder: Path, meta: dict, ours: dict | None = None, float64: bool = False) -> dict[str, dict]:
    """Every check of a training fixture (names: `parity.tf_parity --help`). `float64`: our step in float64
    against `train_outputs_float64.npz`, every check at `FLOAT64_TOL`; the input chain's `images` check is
    left out there (both sides are the same float32 data, checked by the float32 run). `ours`: a `run_step`
    result to reuse (of the same precision; the step is run otherwise)."""
    ours = ours if ours is not None else run_step(folder, meta, torch.float64 if float64 else torch.float32)
    ref = load_npz(folder, REFERENCE_FILES[float64], ["cls_loss", "box_loss", "total_loss", "reg_l2_loss"])

    def tol(name: str) -> float:
        return FLOAT64_TOL if float64 and name not in EXACT else TOL[name]

    checks, levels = _input_checks(folder, ours, tol)
    if float64:
        del checks["images"]
    rows, cols = ref["class_outputs_p3_sub_rows"], ref["class_outputs_p3_sub_cols"]
    p3 = ours["class_outputs"][0]
    b, y, x, a = ref[f"class_outputs_p{levels[0]}_positive_index"].T
    positive = p3.reshape(*p3.shape[:3], ours["cls_loss_per_anchor"][0].shape[-1], -1)[b, y, x, a]
    checks["class_outputs"] = compare([(p3[:, rows][:, :, cols], ref[f"class_outputs_p{levels[0]}_sub"]),
                                       (positive, ref[f"class_outputs_p{levels[0]}_positive_logits"])]
                                      + [(o, ref[f"class_outputs_p{lv}"]) for lv, o in
                                         zip(levels[1:], ours["class_outputs"][1:])], tol("class_outputs"))
    checks["box_outputs"] = compare([(o, ref[f"box_outputs_p{lv}"]) for lv, o in zip(levels, ours["box_outputs"])],
                                    tol("box_outputs"))
    for loss in ("cls_loss", "box_loss", "det_loss", "reg_l2_loss", "total_loss"):
        checks[loss] = scalar_check(ours[loss], float(ref[loss]), tol(loss))
    for loss in ("cls_loss", "box_loss"):
        checks[f"{loss}_per_level"] = compare([(np.float64(o), r) for o, r in zip(
            ours[f"{loss}_per_level"], ref[f"{loss}_per_level"])], tol(f"{loss}_per_level"))
    checks["cls_loss_per_anchor"] = compare([(o, ref[f"cls_loss_per_anchor_p{lv}"]) for lv, o in
                                             zip(levels, ours["cls_loss_per_anchor"])], tol("cls_loss_per_anchor"))
    checks.update(_step_checks(ours, ref, meta, tol))
    return checks


def _input_checks(folder: Path, ours: dict, tol) -> tuple[dict[str, dict], list[int]]:
    """Input chain and anchor targets; also returns the pyramid levels of targets.npz."""
    inputs = load_npz(folder, "inputs.npz", ["images", "gt_boxes_network", "gt_classes_network", "gt_num_network"])
    tg = load_npz(folder, "targets.npz", ["num_positives", "num_positives_sum", "match_results"])
    levels = sorted(int(k.rsplit("_p", 1)[1]) for k in tg if k.startswith("cls_targets_p"))
    counts = inputs["gt_num_network"]

    def by_level(prefix, last=()):  # [B, H_l, W_l, A * k] per level -> [B, N, *last] in our anchor order
        return np.concatenate([tg[f"{prefix}_p{lv}"].reshape(len(counts), -1, *last) for lv in levels], 1)

    classes = inputs["gt_classes_network"]
    checks = {"images": compare([(ours["images"], inputs["images"])], tol("images")),
              "gt_boxes": compare([(ours["gt_boxes"][b, :n], inputs["gt_boxes_network"][b, :n])
                                   for b, n in enumerate(counts)], tol("gt_boxes"), "abs"),
              "targets": compare([(ours["cls_targets"], by_level("cls_targets")),
                                  (ours["match_results"], tg["match_results"]),
                                  (ours["gt_classes"][ours["gt_classes"] >= 0] + 1, classes[classes > 0])],
                                 tol("targets"), "exact"),
              "box_targets": compare([(ours["box_targets"], by_level("box_targets", (4,)))], tol("box_targets"),
                                     "abs"),
              "num_positives": compare([(ours["num_positives"], tg["num_positives"]),
                                        (np.float32(ours["num_positives_sum"]), tg["num_positives_sum"])],
                                       tol("num_positives"), "exact")}
    return checks, levels


def _step_checks(ours: dict, ref: dict, meta: dict, tol) -> dict[str, dict]:
    """Gradients, norms, clipping, SGD step, BN statistics and EMA, by TF variable name."""
    lookup = ours["lookup"]
    chosen = [(v["official_name"], v["key_suffix"]) for v in meta["chosen_variables"]]
    order = meta["trainable_variables_order"]
    total = {n: _tf_value(ours["grad_total"], lookup, n) for n in order}
    global_norm = float(torch.stack([g.double().norm() for g in total.values()]).norm())
    floor = GRAD_FLOOR * float(ref["grad_global_norm_total"])

    def grad_pairs(stage, head: bool):
        return [(_tf_value(ours[stage], lookup, n), _reference(n, ref[f"{stage}__{s}"])) for n, s in chosen
                if n.startswith(("class_net/", "box_net/")) == head and f"{stage}__{s}" in ref]

    def norm_check(pairs, tol, floor_scale=1.0):
        """‖Δ‖ / max(‖reference‖, floor): gradients that are 0 in exact arithmetic are compared to the floor."""
        rel = max((float((o.double() - r.double()).norm()) / max(float(r.double().norm()), floor * floor_scale)
                   for o, r in pairs), default=0.0)
        return {**compare(pairs, tol, "norm"), "rel": rel, "ok": rel <= tol}

    checks = {"grads": norm_check(grad_pairs("grad_det", True) + grad_pairs("grad_total", True), tol("grads")),
              "grads_upstream": norm_check(grad_pairs("grad_det", False) + grad_pairs("grad_total", False),
                                           tol("grads_upstream"))}
    # Per-variable norms of all trainable variables, |Δ| relative to the largest one (a scalar fusion weight's
    # gradient of 0.03 is all noise at this conditioning).
    ours_norms = np.array([float(total[n].double().norm()) for n in order])
    checks["grad_norms"] = compare([(ours_norms, ref["grad_norm_per_variable_total"])], tol("grad_norms"))
    checks["grad_global_norm"] = compare([(np.float64(global_norm), ref["grad_global_norm_total"]),
                                          (np.float64(ours["global_norm_after_clipping"]),
                                           ref["grad_global_norm_after_clipping"])], tol("grad_global_norm"))
    clip_scale = float(ref["grad_global_norm_after_clipping"] / ref["grad_global_norm_total"])
    checks["clipped_grads"] = norm_check(grad_pairs("grad_clipped", True) + grad_pairs("grad_clipped", False),
                                         tol("clipped_grads"), clip_scale)

    def step_pairs(store, prefix, scale=1.0):
        return [(_tf_value(store, lookup, n) * scale, _reference(n, ref[f"{prefix}__{s}"])) for n, s in chosen]

    checks["values_after_step"] = compare(step_pairs(ours["values_after_step"], "value_after_step"),
                                          tol("values_after_step"))
    # torch / TF1 keep accum = g (v -= lr * accum); the fixture holds the Keras slot m = -lr * g (v += m).
    lr = ours["learning_rate"]
    checks["momentum"] = norm_check(step_pairs(ours["momentum"], "momentum_after_step", -lr),
                                    tol("momentum"), clip_scale * lr)
    bn = [n for n in meta.get("bn_moving_stat_variables", []) if f"bn_after_forward__{n.replace('/', '__')}" in ref]
    checks["bn_stats"] = compare([(_tf_value(ours["bn_after_forward"], lookup, n),
                                   _reference(n, ref[f"bn_after_forward__{n.replace('/', '__')}"])) for n in bn],
                                 tol("bn_stats"))
    checks["ema"] = compare(step_pairs(ours["ema_after_step"], "ema_after_step_tf1"), tol("ema"))
    return checks
