"""Criteria for reduced-precision and other-engine outputs that hold however a CPU's kernels round.

Comparing rankings or top-k lists of scores that sit closer together than the precision's error fails on
one CPU and passes on another (AMX and AVX512-BF16 kernels accumulate differently). Two criteria instead:

* `relative_errors`: the norm-wise relative error of all class logits and of all box outputs, judged in
  units of the precision's unit roundoff `u`. Measured on the ported fixture photo (AMD EPYC, oneDNN and
  ATen's generic kernels; OpenVINO): bf16 and fp16 give 1.0-1.2 u on the class logits and 7-9 u on the box
  outputs (smaller values, so relatively larger rounding), in both precisions: the error scales with u.
  The bounds `LOW_PRECISION_BOUND` are ~3.5x those values; a real defect (a lost bias, an overflow, a wrong
  fold) moves the outputs by orders of magnitude more.
* `decided_detections`: a detection can be required of a lower precision only where fp32 decides it by
  more than the error measured on the same input, Δ = max |p_low - p_fp32| over every anchor and class
  probability. Then, with hard NMS of the "infer" path, a theorem rather than a tolerance says it must be
  found: its anchor's best class leads the anchor's other classes by > 2Δ, its score leads every anchor
  whose box overlaps it (IoU >= 0.3 in either run) by > 2Δ, and fewer than 100 anchors score within 2Δ of
  it. So in the other run no box of higher score overlaps it enough to suppress it (NMS IoU 0.5), and it is
  among the 100 kept.
"""
from __future__ import annotations

import torch

from model import BoxCoder, flatten_outputs
from model.nms import HARD_NMS_IOU, pairwise_iou
from model.postprocess import MAX_DETECTIONS, _select

UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
# (class logits, box outputs) in units of u: ~3.5x the measured 1.2 u / 9.2 u (module docstring)
LOW_PRECISION_BOUND = (4.0, 32.0)


def relative_errors(outputs, reference) -> tuple[float, float]:
    """Norm-wise relative error `||a - b|| / ||b||` of the class logits and of the box outputs (all levels of
    all images), `outputs` / `reference` = `(cls_outs, box_outs)` as `EfficientDet.forward` returns them."""
    errors = []
    for ours, ref in zip(outputs, reference):
        a = torch.cat([t.detach().double().flatten() for t in ours])
        b = torch.cat([t.detach().double().flatten() for t in ref])
        errors.append(float((a - b).norm() / b.norm()))
    return errors[0], errors[1]


def assert_close_in_roundoff(outputs, reference, precision: str) -> tuple[float, float]:
    """Finite outputs, within `LOW_PRECISION_BOUND` units of `precision`'s unit roundoff; returns the errors."""
    assert all(bool(torch.isfinite(t).all()) for t in outputs[0] + outputs[1]), f"{precision}: non-finite outputs"
    u = UNIT_ROUNDOFF[precision]
    cls_err, box_err = relative_errors(outputs, reference)
    assert cls_err <= LOW_PRECISION_BOUND[0] * u, f"{precision} class logits: {cls_err:.2e} = {cls_err / u:.1f} u"
    assert box_err <= LOW_PRECISION_BOUND[1] * u, f"{precision} box outputs: {box_err:.2e} = {box_err / u:.1f} u"
    return cls_err, box_err


def _anchor_view(outputs, anchors):
    """Image 0 of `outputs`: per-anchor class probabilities `[A, C]` and decoded boxes `[A, 4]` (network px)."""
    logits, deltas = flatten_outputs(*outputs)
    return torch.sigmoid(logits[0].double()), BoxCoder().decode(deltas[0].float(), anchors)


def _selected(probs: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Anchors kept by the "infer" path with hard NMS (best class per anchor, class-agnostic), best first."""
    scores = probs.max(-1).values.float()[None]
    idx, valid, _ = _select(boxes[None], scores, torch.zeros_like(scores, dtype=torch.long), 1, "hard", MAX_DETECTIONS)
    return idx[0][valid[0]]


def decided_detections(reference, other, anchors: torch.Tensor) -> tuple[list[int], list[int], float]:
    """`(decided, missed, delta)`: the anchors of fp32's detections (image 0) that `other` must also detect
    (module docstring), those of them that `other` does not detect with the same class, and Δ."""
    p_ref, boxes_ref = _anchor_view(reference, anchors)
    p_other, boxes_other = _anchor_view(other, anchors)
    delta = float((p_other - p_ref).abs().max())
    score_ref, class_ref = p_ref.max(-1)
    class_other = p_other.argmax(-1)
    kept_other = set(_selected(p_other, boxes_other).tolist())
    decided, missed = [], []
    for a in _selected(p_ref, boxes_ref).tolist():
        s = float(score_ref[a])
        second = float(p_ref[a].topk(2).values[1])
        near = (pairwise_iou(boxes_ref, boxes_ref[a]) >= HARD_NMS_IOU - 0.2) | \
               (pairwise_iou(boxes_other, boxes_other[a]) >= HARD_NMS_IOU - 0.2)
        near[a] = False
        rivals = score_ref[near]
        if (s - second > 2 * delta and (rivals.numel() == 0 or s - float(rivals.max()) > 2 * delta)
                and int((score_ref > s - 2 * delta).sum()) < MAX_DETECTIONS):
            decided.append(a)
            if a not in kept_other or int(class_other[a]) != int(class_ref[a]):
                missed.append(a)
    return decided, missed, delta
