"""Training fixtures (`train_outputs.npz`): one official training step, reproduced by the project's training code.

The step runs exactly the pieces `-mode trainval` runs (`train.trainer.Trainer.train_step`): the fixture's
two source photos and boxes go through `CocoDetection` + `TrainTransform` + `collate_detection` (written to a
temporary COCO-format folder), `TargetAssigner` labels the anchors, the model (raw checkpoint weights, training
mode: BN batch statistics, momentum 0.01) runs forward, `detection_loss` and backward give the gradients,
`EfficientDetSGD.step` adds the L2 gradient, clips and updates, `ModelEMA.update` moves the shadows (which
start at the checkpoint's `ExponentialMovingAverage` values, like the fixture's `ema_before__*`).

Folder layout (as `../shared/fixtures/tf_reference_d0_train`, see its README): `meta.json` (`model_name`,
`checkpoint.path` relative to the folder, `hparams`, `learning_rate`, `chosen_variables`,
`trainable_variables_order`, `bn_moving_stat_variables`), `inputs.npz`, `targets.npz`, `train_outputs.npz`.
TF layouts: NHWC tensors, HWIO kernels; names `<prefix>__<TF variable name with / -> __>`.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model import AnchorGenerator
from parity.checks import FixtureError, compare, load_npz, nhwc, ported_model, scalar_check, variant_of
from utils.port_tf import tf_to_torch
from utils.tf_names import efficientdet_names

TOL = {"images": 1e-4, "gt_boxes": 1e-4, "targets": 0.0, "box_targets": 1e-5, "num_positives": 0.0,
       "outputs": 1e-3, "losses": 1e-4, "grads": 1e-3, "bn_stats": 1e-4}
# Conditioning of this kind of fixture (random weights, training-mode BN over a batch of 2): TF's float32
# training forward is ~40x further from exact (float64) arithmetic than ours (class logits 5e-3 vs 1.2e-4),
# and perturbing the input by 1e-5 moves our own backbone gradients by ~2 %. What depends on the logits' last
# digits or on gradients upstream of the heads gets a tolerance for that (README, training parity):
COND_TOL = {"level_losses": 3e-4, "loss_maps": 3e-3, "grads_upstream": 0.1, "grad_norms": 1e-2, "step": 1e-3}
GRAD_FLOOR = 1e-6  # x global norm: gradients that are 0 in exact arithmetic (a bias before a BN) are noise


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


def run_step(folder: Path, meta: dict) -> dict:
    """Run the step; returns our tensors by name (numpy, TF layouts where the fixture has them)."""
    from data.coco import collate_detection
    from train.assign import TargetAssigner
    from train.ema import ModelEMA
    from train.loss import detection_loss, focal_loss_per_anchor
    from train.optim import build_optimizer

    name = variant_of(meta)
    hp = meta.get("hparams", {})
    if meta.get("backbone_drop_connect_used", False):
        raise FixtureError(f"{folder}/meta.json: backbone_drop_connect_used is true; a random drop-connect "
                           f"forward cannot be compared (generate the fixture without it)")
    inputs = load_npz(folder, "inputs.npz", ["images", "gt_num_original", "gt_boxes_original"])
    checkpoint = folder / (meta.get("checkpoint") or {}).get("path", "model")
    model = ported_model(checkpoint, name, ema=False)
    for module in model.modules():  # the fixture's training forward ran without drop-connect
        if hasattr(module, "survival_prob"):
            module.survival_prob = 0.0
    ema = ModelEMA(model, float(hp.get("moving_average_decay", 0.9998)))
    ema.module.load_state_dict(ported_model(checkpoint, name, ema=True).state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        dataset = _dataset(folder, inputs, meta, Path(tmp), model.config)
        images, batch = collate_detection([dataset[i] for i in range(len(dataset))])

    cfg = model.config
    assigner = TargetAssigner.from_generator(AnchorGenerator.from_config(cfg), tuple(images.shape[-2:]))
    targets = assigner(batch["gt_boxes"], batch["gt_classes"])
    matches = assigner.match(batch["gt_boxes"], batch["gt_classes"])
    optimizer = build_optimizer(model, float(meta.get("learning_rate", 0.01)), float(hp.get("momentum", 0.9)),
                                float(hp.get("weight_decay", 4e-5)), float(hp.get("clip_gradients_norm", 10.0)))
    loss_args = {k: float(hp[k]) for k in ("alpha", "gamma", "delta", "box_loss_weight", "label_smoothing") if k in hp}

    # NCHW, as the trainer with --nchw (and on CUDA): on CPU, channels_last training-mode BN statistics are
    # ~100x less accurate in float32 (stem variance 1.4e-4 from float64 vs 8.5e-7), more than TF's own error.
    model.train()
    cls_outs, box_outs = model(torch.from_numpy(inputs["images"]).permute(0, 3, 1, 2).contiguous())
    losses = detection_loss(cls_outs, box_outs, targets.cls_targets, targets.box_targets, targets.num_positives,
                            **loss_args)
    out = {"images": nhwc(images), "gt_boxes": batch["gt_boxes"].numpy(), "gt_classes": batch["gt_classes"].numpy(),
           "cls_targets": targets.cls_targets.numpy(), "box_targets": targets.box_targets.numpy(),
           "match_results": matches.numpy(), "num_positives": (matches >= 0).sum(1).float().numpy(),
           "num_positives_sum": float(targets.num_positives) + 1.0,
           "class_outputs": [nhwc(c) for c in cls_outs], "box_outputs": [nhwc(b) for b in box_outs],
           "cls_loss": float(losses["cls_loss"].detach()), "box_loss": float(losses["box_loss"].detach()),
           "det_loss": float(losses["loss"].detach()), "reg_l2_loss": float(optimizer.reg_l2_loss())}
    out["total_loss"] = out["det_loss"] + out["reg_l2_loss"]
    _per_level(out, cls_outs, box_outs, targets, loss_args, focal_loss_per_anchor)
    out["bn_after_forward"] = {k: v.clone() for k, v in model.state_dict().items()}

    losses["loss"].backward()
    lookup = _tf_lookup(model)
    params = dict(model.named_parameters())
    stages = {"grad_det": _grads(params)}

    def observed(stage, run):  # record the gradients after each stage of the optimiser's own step
        def wrapped():
            result = run()
            stages[stage] = _grads(params)
            return result
        return wrapped

    optimizer.add_l2_gradients_ = observed("grad_total", optimizer.add_l2_gradients_)
    optimizer.clip_gradients_ = observed("grad_clipped", optimizer.clip_gradients_)
    optimizer.step()
    ema.update(model)
    out.update(stages, lookup=lookup, values_after_step={k: p.detach().clone() for k, p in params.items()},
               momentum={k: optimizer.state[p]["momentum_buffer"].clone() for k, p in params.items()},
               ema_after_step=ema.module.state_dict(), learning_rate=float(meta.get("learning_rate", 0.01)),
               ema_decay=ema.decay_at(ema.num_updates), global_norm_after_clipping=float(optimizer.last_grad_norm))
    return out


def _grads(params: dict) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in params.items() if p.grad is not None}


def _per_level(out: dict, cls_outs, box_outs, targets, loss_args: dict, focal_loss_per_anchor) -> None:
    """Per-level losses and the per-anchor focal-loss maps `[B, H, W, A]` (normalised as official)."""
    from model import flatten_outputs
    from train.loss import box_loss_sum

    logits, deltas = flatten_outputs(cls_outs, box_outs)
    normaliser = out["num_positives_sum"]
    focal = {k: v for k, v in loss_args.items() if k in ("alpha", "gamma", "label_smoothing")}
    per_anchor = focal_loss_per_anchor(logits.detach(), targets.cls_targets, **focal) / normaliser
    out["cls_loss_per_anchor"], out["cls_loss_per_level"], out["box_loss_per_level"] = [], [], []
    start = 0
    for c in cls_outs:
        b, _, h, w = c.shape
        n = h * w * (box_outs[0].shape[1] // 4)
        out["cls_loss_per_anchor"].append(per_anchor[:, start:start + n].reshape(b, h, w, -1).numpy())
        out["cls_loss_per_level"].append(float(per_anchor[:, start:start + n].sum()))
        box = box_loss_sum(deltas[:, start:start + n].detach(), targets.box_targets[:, start:start + n],
                           loss_args.get("delta", 0.1))
        out["box_loss_per_level"].append(float(box) / (4.0 * normaliser))
        start += n


def _tf_value(store: dict, lookup: dict, tf_name: str) -> torch.Tensor:
    key, j = lookup[tf_name]
    return store[key] if j is None else store[key][j]


def _reference(name: str, array: np.ndarray) -> torch.Tensor:
    return tf_to_torch(name, array) if array.ndim else torch.tensor(float(array))


def training_checks(folder: Path, meta: dict, ours: dict | None = None) -> dict[str, dict]:
    """Every check of a training fixture (names: `parity.tf_parity --help`). `ours`: a `run_step` result to
    reuse (the step is run otherwise)."""
    ours = ours if ours is not None else run_step(folder, meta)
    ref = load_npz(folder, "train_outputs.npz", ["cls_loss", "box_loss", "total_loss", "reg_l2_loss"])
    checks, levels = _input_checks(folder, ours)
    rows, cols = ref["class_outputs_p3_sub_rows"], ref["class_outputs_p3_sub_cols"]
    p3 = ours["class_outputs"][0]
    b, y, x, a = ref[f"class_outputs_p{levels[0]}_positive_index"].T
    positive = p3.reshape(*p3.shape[:3], ours["cls_loss_per_anchor"][0].shape[-1], -1)[b, y, x, a]
    checks["class_outputs"] = compare([(p3[:, rows][:, :, cols], ref[f"class_outputs_p{levels[0]}_sub"]),
                                       (positive, ref[f"class_outputs_p{levels[0]}_positive_logits"])]
                                      + [(o, ref[f"class_outputs_p{lv}"]) for lv, o in
                                         zip(levels[1:], ours["class_outputs"][1:])], TOL["outputs"])
    checks["box_outputs"] = compare([(o, ref[f"box_outputs_p{lv}"]) for lv, o in zip(levels, ours["box_outputs"])],
                                    TOL["outputs"])
    for loss in ("cls_loss", "box_loss", "det_loss", "reg_l2_loss", "total_loss"):
        checks[loss] = scalar_check(ours[loss], float(ref[loss]), TOL["losses"])
    for loss in ("cls_loss", "box_loss"):
        checks[f"{loss}_per_level"] = compare([(np.float64(o), r) for o, r in zip(
            ours[f"{loss}_per_level"], ref[f"{loss}_per_level"])], COND_TOL["level_losses"])
    checks["cls_loss_per_anchor"] = compare([(o, ref[f"cls_loss_per_anchor_p{lv}"]) for lv, o in
                                             zip(levels, ours["cls_loss_per_anchor"])], COND_TOL["loss_maps"])
    checks.update(_step_checks(ours, ref, meta))
    return checks


def _input_checks(folder: Path, ours: dict) -> tuple[dict[str, dict], list[int]]:
    """Input chain and anchor targets; also returns the pyramid levels of targets.npz."""
    inputs = load_npz(folder, "inputs.npz", ["images", "gt_boxes_network", "gt_classes_network", "gt_num_network"])
    tg = load_npz(folder, "targets.npz", ["num_positives", "num_positives_sum", "match_results"])
    levels = sorted(int(k.rsplit("_p", 1)[1]) for k in tg if k.startswith("cls_targets_p"))
    counts = inputs["gt_num_network"]

    def by_level(prefix, last=()):  # [B, H_l, W_l, A * k] per level -> [B, N, *last] in our anchor order
        return np.concatenate([tg[f"{prefix}_p{lv}"].reshape(len(counts), -1, *last) for lv in levels], 1)

    classes = inputs["gt_classes_network"]
    checks = {"images": compare([(ours["images"], inputs["images"])], TOL["images"]),
              "gt_boxes": compare([(ours["gt_boxes"][b, :n], inputs["gt_boxes_network"][b, :n])
                                   for b, n in enumerate(counts)], TOL["gt_boxes"], "abs"),
              "targets": compare([(ours["cls_targets"], by_level("cls_targets")),
                                  (ours["match_results"], tg["match_results"]),
                                  (ours["gt_classes"][ours["gt_classes"] >= 0] + 1, classes[classes > 0])],
                                 TOL["targets"], "exact"),
              "box_targets": compare([(ours["box_targets"], by_level("box_targets", (4,)))], TOL["box_targets"], "abs"),
              "num_positives": compare([(ours["num_positives"], tg["num_positives"]),
                                        (np.float32(ours["num_positives_sum"]), tg["num_positives_sum"])],
                                       TOL["num_positives"], "exact")}
    return checks, levels


def _step_checks(ours: dict, ref: dict, meta: dict) -> dict[str, dict]:
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

    checks = {"grads": norm_check(grad_pairs("grad_det", True) + grad_pairs("grad_total", True), TOL["grads"]),
              "grads_upstream": norm_check(grad_pairs("grad_det", False) + grad_pairs("grad_total", False),
                                           COND_TOL["grads_upstream"])}
    # Per-variable norms of all trainable variables, |Δ| relative to the largest one (a scalar fusion weight's
    # gradient of 0.03 is all noise at this conditioning).
    ours_norms = np.array([float(total[n].double().norm()) for n in order])
    checks["grad_norms"] = compare([(ours_norms, ref["grad_norm_per_variable_total"])], COND_TOL["grad_norms"])
    checks["grad_global_norm"] = compare([(np.float64(global_norm), ref["grad_global_norm_total"]),
                                          (np.float64(ours["global_norm_after_clipping"]),
                                           ref["grad_global_norm_after_clipping"])], 2 * TOL["grads"])
    clip_scale = float(ref["grad_global_norm_after_clipping"] / ref["grad_global_norm_total"])
    checks["clipped_grads"] = norm_check(grad_pairs("grad_clipped", True) + grad_pairs("grad_clipped", False),
                                         COND_TOL["grads_upstream"], clip_scale)

    def step_pairs(store, prefix, scale=1.0):
        return [(_tf_value(store, lookup, n) * scale, _reference(n, ref[f"{prefix}__{s}"])) for n, s in chosen]

    checks["values_after_step"] = compare(step_pairs(ours["values_after_step"], "value_after_step"),
                                          COND_TOL["step"])
    # torch / TF1 keep accum = g (v -= lr * accum); the fixture holds the Keras slot m = -lr * g (v += m).
    lr = ours["learning_rate"]
    checks["momentum"] = norm_check(step_pairs(ours["momentum"], "momentum_after_step", -lr),
                                    COND_TOL["grads_upstream"], clip_scale * lr)
    bn = [n for n in meta.get("bn_moving_stat_variables", []) if f"bn_after_forward__{n.replace('/', '__')}" in ref]
    checks["bn_stats"] = compare([(_tf_value(ours["bn_after_forward"], lookup, n),
                                   _reference(n, ref[f"bn_after_forward__{n.replace('/', '__')}"])) for n in bn],
                                 TOL["bn_stats"])
    checks["ema"] = compare(step_pairs(ours["ema_after_step"], "ema_after_step_tf1"), COND_TOL["step"])
    return checks
