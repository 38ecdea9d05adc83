"""Inference fixtures (`reference_outputs.npz`): network tensors, anchors and end-to-end detections.

Folder layout (as `../shared/fixtures/tf_reference_d0`): `meta.json` (`model_name`, `checkpoint.prefix`,
`image.file`), the TF checkpoint, the photo, `reference_outputs.npz` (`input_tensor` [1, H, W, 3] NHWC,
`class_outputs_p3_sub` + rows/cols, `class_outputs_p4..`, `box_outputs_p3..` [1, H_l, W_l, A*C | A*4],
`anchors` [N, 4] yxyx px, `det_boxes` [1, 100, 4] yxyx original px, `det_scores`, `det_classes` (1-based),
`det_num_valid`); optional `intermediate_features.npz` and `no_ema_outputs.npz`.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import torch

from model import AnchorGenerator
from parity.checks import FixtureError, compare, load_npz, nhwc, ported_model, variant_of

NET_TOL = 1e-3  # absolute, every network tensor (features of magnitude ~20)
ANCHOR_TOL = 1e-3  # px
INPUT_TOL = 1e-4  # absolute, our preprocessing of the photo vs TF's input tensor
DET_BOX_TOL, DET_SCORE_TOL = 0.5, 1e-3  # px after clipping to the photo, score
DET_MISSING_TOL = 0.02  # at most 2 of 100 official rows may be missing
DET_SWAP_TOL = 0.05  # rows whose soft-NMS decay changed with the order of near-tied candidates

Pairs = list[tuple[str, np.ndarray, np.ndarray]]  # (tensor name, ours, reference)


def checkpoint_of(folder: Path, meta: dict) -> Path:
    """The TF checkpoint prefix of a fixture: `checkpoint.path` (relative to the folder) or `.prefix`."""
    info = meta.get("checkpoint") or {}
    return folder / (info.get("path") or info.get("prefix") or "model")


def network_pairs(folder: Path, meta: dict) -> dict[str, Pairs]:
    """Our tensors next to the reference ones, by family: `backbone_features`, `fpn_features` (only with
    intermediate_features.npz), `class_outputs`, `box_outputs`, `no_ema_outputs` (with no_ema_outputs.npz),
    `anchors`. The EMA-ported model runs in eval mode on the fixture's own `input_tensor`."""
    name = variant_of(meta)
    ref = load_npz(folder, "reference_outputs.npz", ["input_tensor", "anchors", "class_outputs_p3_sub"])
    x = torch.from_numpy(ref["input_tensor"]).permute(0, 3, 1, 2).contiguous()
    model = ported_model(checkpoint_of(folder, meta), name, ema=True).eval()
    cfg = model.config
    levels = range(cfg.min_level, cfg.max_level + 1)
    out: dict[str, Pairs] = {}
    with torch.no_grad():
        c = model.backbone(x)
        cls_outs, box_outs = model(x)
        if (folder / "intermediate_features.npz").is_file():
            inter = load_npz(folder, "intermediate_features.npz")
            out["backbone_features"] = [(f"backbone_c{lv}", nhwc(t), inter[f"backbone_c{lv}"])
                                        for lv, t in zip(range(3, 3 + len(c)), c)]
            pyramid, p = model.fpn.add_extra_levels(c), model.fpn(c)
            extra = [lv for lv in levels if f"fpn_input_p{lv}" in inter]
            out["fpn_features"] = ([(f"fpn_input_p{lv}", nhwc(pyramid[lv - cfg.min_level]), inter[f"fpn_input_p{lv}"])
                                    for lv in extra]
                                   + [(f"bifpn_out_p{lv}", nhwc(p[lv - cfg.min_level]), inter[f"bifpn_out_p{lv}"])
                                      for lv in levels])
    rows, cols = ref["class_outputs_p3_sub_rows"], ref["class_outputs_p3_sub_cols"]
    out["class_outputs"] = [(f"class_outputs_p{cfg.min_level}_sub", nhwc(cls_outs[0])[:, rows][:, :, cols],
                             ref[f"class_outputs_p{cfg.min_level}_sub"])]
    out["class_outputs"] += [(f"class_outputs_p{lv}", nhwc(cls_outs[lv - cfg.min_level]), ref[f"class_outputs_p{lv}"])
                             for lv in levels if lv > cfg.min_level]
    out["box_outputs"] = [(f"box_outputs_p{lv}", nhwc(box_outs[lv - cfg.min_level]), ref[f"box_outputs_p{lv}"])
                          for lv in levels]
    if (folder / "no_ema_outputs.npz").is_file():
        raw = load_npz(folder, "no_ema_outputs.npz")
        with torch.no_grad():
            raw_cls, raw_box = ported_model(checkpoint_of(folder, meta), name, ema=False).eval()(x)
        out["no_ema_outputs"] = [(f"no_ema {k}", nhwc((raw_cls if k.startswith("class") else raw_box)
                                                      [int(k[-1]) - cfg.min_level]), raw[k])
                                 for k in sorted(raw) if k.startswith(("class_outputs_p", "box_outputs_p"))]
    size = tuple(meta.get("image_size_hw") or x.shape[-2:])
    out["anchors"] = [("anchors (px)", AnchorGenerator.from_config(cfg)(size).numpy(), ref["anchors"])]
    return out


def family_check(pairs: Pairs, family: str) -> dict:
    """The check of one family of `network_pairs`: max |Δ| over its tensors, absolute tolerance."""
    return compare([(o, r) for _, o, r in pairs], ANCHOR_TOL if family == "anchors" else NET_TOL, "abs")


def infer_detections(folder: Path, meta: dict, workdir: Path) -> tuple[list[dict], np.ndarray]:
    """What a user gets: the checkpoint ported to `workdir/weights.pth` (EMA), then `main.py -mode infer
    --weights ... --images <photo> --nms soft --threshold 0`. Returns (`run_infer`'s detections,
    the photo as uint8 `[H, W, 3]`)."""
    from PIL import Image

    from eval.infer import add_infer_args, run_infer
    from utils.port_tf import port_tf_checkpoint

    image = folder / ((meta.get("image") or {}).get("file") or "image.png")
    if not image.is_file():
        raise FixtureError(f"{image}: the fixture's photo is missing")
    weights = workdir / "weights.pth"
    port_tf_checkpoint(checkpoint_of(folder, meta), variant_of(meta), ema=True).save(weights, source=str(folder))
    parser = argparse.ArgumentParser()
    add_infer_args(parser)
    args = parser.parse_args(["--weights", str(weights), "--images", str(image), "--nms", "soft", "--threshold",
                              "0", "--output", str(workdir / "out"), "--device", "cpu"])
    with contextlib.redirect_stdout(io.StringIO()):
        return run_infer(args), np.asarray(Image.open(image).convert("RGB"))


def detection_checks(detections: list[dict], ref: dict[str, np.ndarray], photo_hw: tuple[int, int]
                     ) -> dict[str, dict]:
    """The official rows `det_*` (image 0) in `detections` (`run_infer` dicts: `class` 0-based, `bbox`
    [x, y, w, h] original px, `score`). Official boxes are clipped to the photo like ours; rows left without
    area there are not compared (`-mode infer` drops them on purpose, see `eval.infer.image_detections`).

    "detections": an official row is found when a row of ours has its class and a box within DET_BOX_TOL px;
        `max_abs` = worst box |Δ| (px) of the found rows, `rel` = fraction not found, tol DET_MISSING_TOL.
    "detection_scores": of the found rows, `rel` = fraction whose score is off by more than DET_SCORE_TOL,
        `max_abs` = worst score |Δ|, tol DET_SWAP_TOL: two candidates whose scores are closer than TF's own
        float32 error may be selected in the other order by soft-NMS, which changes the decay of a few rows.
    """
    n = int(ref["det_num_valid"][0])
    height, width = photo_hw
    ref_boxes = np.clip(ref["det_boxes"][0, :n].astype(np.float64), 0, [height, width, height, width])
    has_area = (ref_boxes[:, 2] > ref_boxes[:, 0]) & (ref_boxes[:, 3] > ref_boxes[:, 1])
    ours = np.array([[d["bbox"][1], d["bbox"][0], d["bbox"][1] + d["bbox"][3], d["bbox"][0] + d["bbox"][2]]
                     for d in detections], dtype=np.float64).reshape(-1, 4)
    classes = np.array([d["class"] + 1 for d in detections])
    scores = np.array([d["score"] for d in detections], dtype=np.float64)
    box_deltas, score_deltas = [], []
    for box, cls, score in zip(ref_boxes[has_area], ref["det_classes"][0, :n][has_area],
                               ref["det_scores"][0, :n][has_area]):
        delta = np.abs(ours - box).max(1) if len(ours) else np.zeros(0)
        same = (classes == int(cls)) & (delta <= DET_BOX_TOL)
        if same.any():
            k = np.flatnonzero(same)[np.abs(scores[same] - score).argmin()]
            box_deltas.append(delta[k])
            score_deltas.append(abs(scores[k] - score))
    total = int(has_area.sum())
    missing = (total - len(box_deltas)) / total if total else 0.0
    off = sum(d > DET_SCORE_TOL for d in score_deltas) / max(len(score_deltas), 1)
    return {"detections": {"max_abs": float(max(box_deltas, default=0.0)), "rel": missing,
                           "tol": DET_MISSING_TOL, "ok": bool(missing <= DET_MISSING_TOL)},
            "detection_scores": {"max_abs": float(max(score_deltas, default=0.0)), "rel": float(off),
                                 "tol": DET_SWAP_TOL, "ok": bool(off <= DET_SWAP_TOL)}}


def inference_checks(folder: Path, meta: dict) -> dict[str, dict]:
    """Every check of an inference fixture (see `parity.tf_parity --help` for the names)."""
    from data.transforms import preprocess_for_eval
    from model import get_config

    checks = {family: family_check(pairs, family) for family, pairs in network_pairs(folder, meta).items()}
    ref = load_npz(folder, "reference_outputs.npz", ["det_boxes", "det_scores", "det_classes", "det_num_valid"])
    with tempfile.TemporaryDirectory() as tmp:
        detections, photo = infer_detections(folder, meta, Path(tmp))
    size = ref["input_tensor"].shape[1:3]
    cfg = get_config(variant_of(meta))
    ours, _ = preprocess_for_eval(photo, size, cfg.mean_rgb, cfg.stddev_rgb)
    checks["input_tensor"] = compare([(ours.permute(1, 2, 0)[None], ref["input_tensor"])], INPUT_TOL, "abs")
    checks.update(detection_checks(detections, ref, photo.shape[:2]))
    return checks
