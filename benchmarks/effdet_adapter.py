"""effdet 0.4.1 (`tf_efficientdet_dN`) as a peer of this project in training benchmarks: its train bench, the
conversion of our padded targets to its conventions, its decoding behind our `Detector` interface, and a check
that the conversion is right.

Conventions (effdet `anchors.py`, `bench.py`, `loss.py`):
* targets: `{"bbox": [B, M, 4], "cls": [B, M]}`. `AnchorLabeler.batch_label_anchors` reads the boxes as
  (ymin, xmin, ymax, xmax) pixels of the network input (its anchors are built yxyx) and the classes as 1-based
  (it subtracts 1 after matching; background becomes -1); rows with `cls <= -1` are dropped before matching.
  Ours (`data.coco.collate_detection`): the same yxyx network px, 0-based classes, padding rows -1. So the
  boxes pass unchanged and real classes get +1; padding keeps -1.
* detections: `generate_detections` returns `[B, 100, 6]` rows (xmin, ymin, xmax, ymax, score, class) with
  1-based classes, boxes multiplied by `img_scale`, zero rows after the last detection. `EffdetDetector`
  passes our letterbox `image_scale` (original px per network px) as `img_scale` and no `img_size`, so boxes
  are scaled back exactly as ours and, like our official evaluation path, not clipped; it returns our
  `model.postprocess.Detections` (yxyx, 0-based classes).

Used by `benchmarks/train_vs_effdet.py`, whose table lives in docs/training.md.
"""
from __future__ import annotations

import torch
from torch import nn

from model.postprocess import Detections


def create_effdet_train(variant: str, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    """effdet's `DetBenchTrain` (its model, anchors, `AnchorLabeler` and `DetectionLoss`) of a from-scratch
    `tf_efficientdet_{variant}` (no pretrained backbone either) for `num_classes` at `image_size` (H, W)."""
    from effdet import create_model
    return create_model(f"tf_efficientdet_{variant}", bench_task="train", bench_labeler=True, pretrained=False,
                        pretrained_backbone=False, num_classes=num_classes, image_size=tuple(image_size))


def effdet_target(gt_boxes: torch.Tensor, gt_classes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our padded batch targets (`gt_boxes [B, M, 4]` yxyx network px, `gt_classes [B, M]` 0-based, -1 padding)
    -> effdet's target dict (same boxes, 1-based classes, -1 padding)."""
    return {"bbox": gt_boxes, "cls": torch.where(gt_classes >= 0, gt_classes + 1, gt_classes)}


def flat_levels(per_level: list[torch.Tensor]) -> torch.Tensor:
    """effdet's per-level `[B, H_l, W_l, A]` anchor labels -> `[B, sum H_l W_l A]` in our anchor order
    (level, y, x, anchor), the order both anchor generators use."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in per_level], 1)


class EffdetDetector(nn.Module):
    """effdet's own decoding (`_post_process`: top-5000 of all logits; `generate_detections`: its anchors, its
    batched soft- or hard NMS, top-100) of `model` (an effdet `EfficientDet`, e.g. an EMA copy) behind the
    interface of `eval.evaluator.Detector`: `forward(images [N, 3, S_h, S_w], scales [N]) -> Detections`."""

    def __init__(self, model: nn.Module, soft_nms: bool):
        super().__init__()
        from effdet.anchors import Anchors
        self.model, self.soft_nms = model.eval(), soft_nms
        self.anchors = Anchors.from_config(model.config).boxes
        self.config = model.config

    @torch.no_grad()
    def forward(self, images: torch.Tensor, scales: torch.Tensor) -> Detections:
        from effdet.bench import _batch_detection, _post_process
        cls_outs, box_outs = self.model(images)
        cls_top, box_top, indices, classes = _post_process(cls_outs, box_outs, self.config.num_levels,
                                                           self.config.num_classes,
                                                           self.config.max_detection_points)
        rows = _batch_detection(images.shape[0], cls_top, box_top, self.anchors.to(images.device), indices, classes,
                                scales.float(), None, max_det_per_image=self.config.max_det_per_image,
                                soft_nms=self.soft_nms)  # [N, D, 6] xyxy original px, score, 1-based class
        valid = rows[..., 5] > 0  # padding rows are all zeros; real classes are >= 1
        return Detections(boxes=rows[..., [1, 0, 3, 2]], scores=rows[..., 4],
                          classes=(rows[..., 5].long() - 1).clamp(min=0), num_valid=valid.sum(1))


@torch.no_grad()
def check_target_conversion(bench: nn.Module, our_cls_targets: torch.Tensor, our_anchors: torch.Tensor,
                            gt_boxes: torch.Tensor, gt_classes: torch.Tensor, min_overlap: float = 0.7,
                            min_same_class: float = 0.95) -> dict:
    """Assert that effdet labels a batch as we do, so the target conversion is right.

    Both sides use the official ArgMax matcher (IoU 0.5, force-match) on anchors equal but for effdet's rounded
    aspect ratios (1.4, 0.7) vs exact sqrt(2): their positive anchors must mostly coincide (`min_overlap`
    intersection over union of the positive sets), with the same 0-based class on nearly all shared positives
    (`min_same_class`: where gt boxes overlap, the slightly different anchors can be force-matched to different
    boxes), and every image with boxes must have positives. Boxes read as xyxy (overlap ~0.06 at 256 px), or
    classes off by one (no shared positive of the same class), fail this.

    our_cls_targets `[B, A]` (ours: class >= 0, -1 background), our_anchors `[A, 4]` yxyx. Returns the counts.
    """
    anchors = bench.anchors.boxes
    if anchors.shape != our_anchors.shape:
        raise AssertionError(f"effdet has {anchors.shape[0]} anchors, ours {our_anchors.shape[0]}")
    target = effdet_target(gt_boxes, gt_classes)
    cls_levels, _, num_positives = bench.anchor_labeler.batch_label_anchors(target["bbox"], target["cls"])
    theirs = flat_levels(cls_levels)
    positive_theirs, positive_ours = theirs >= 0, our_cls_targets >= 0
    has_boxes = (gt_classes >= 0).any(1)
    if not bool((num_positives[has_boxes] > 0).all()):
        raise AssertionError(f"effdet's labeler found no positive anchor in an image with boxes: {num_positives}")
    shared = positive_theirs & positive_ours
    overlap = float(shared.sum() / (positive_theirs | positive_ours).sum().clamp(min=1))
    if overlap < min_overlap:
        raise AssertionError(f"effdet's positive anchors overlap ours by {overlap:.2f} (< {min_overlap}): "
                             f"the boxes are not read as yxyx network pixels")
    same_class = float((theirs[shared] == our_cls_targets[shared]).float().mean())
    if same_class < min_same_class:
        raise AssertionError(f"effdet's classes equal ours on only {same_class:.2f} of the shared positive anchors "
                             f"(< {min_same_class}): the class ids are not converted to effdet's 1-based ids")
    return {"effdet_positives": int(num_positives.sum()), "ours_positives": int(positive_ours.sum()),
            "positive_overlap": round(overlap, 4), "same_class": round(same_class, 4),
            "max_anchor_delta_px": float((anchors - our_anchors).abs().max())}
