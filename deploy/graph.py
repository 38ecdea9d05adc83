"""The official image path as one exportable graph: network -> box decoding -> best class per anchor ->
class-agnostic hard NMS (IoU 0.5) -> top 100, with ONNX `NonMaxSuppression` in the exported file.

`DetectionGraph(model, image_size)(images [N, 3, H, W]) -> (boxes, scores, classes, num_valid)`:
boxes `[N, 100, 4]` float32 (ymin, xmin, ymax, xmax) in network-input pixels, clipped to the input frame;
scores `[N, 100]` float32 (sigmoid of the best logit); classes `[N, 100]` int64, 0-based class index;
num_valid `[N]` int64. Rows after `num_valid[i]` are zeros. Multiply the boxes by the image scale
(original px per network px) to get original-image pixels. This is `model.postprocess.postprocess(...,
mode="infer", method="hard")` with unit scales (`efficientdet/tf2/postprocess.py`, `postprocess_global`).

The NMS step is the custom op `effdet::select_hard_nms`: in PyTorch it runs our own hard NMS (so the
eager graph *is* our infer path); in ONNX it becomes `NonMaxSuppression` (boxes in ONNX's default
corner format, which is yxyx, `center_point_box=0`) followed by a scatter of the selected anchors into
fixed `[N, 100]` slots, so the exported outputs have static shapes apart from the batch.
"""
from __future__ import annotations

import torch
from torch import nn

from model import AnchorGenerator, BoxCoder, EfficientDet
from model.efficientdet import flatten_outputs
from model.nms import HARD_NMS_IOU
from model.postprocess import MAX_DETECTIONS, _select

OUTPUT_NAMES = ("boxes", "scores", "classes", "num_valid")


@torch.library.custom_op("effdet::select_hard_nms", mutates_args=())
def select_hard_nms(boxes: torch.Tensor, scores: torch.Tensor, max_detections: int,
                    iou_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-agnostic greedy hard NMS per image: boxes `[N, A, 4]` yxyx, scores `[N, A]` -> indices
    `[N, max_detections]` int64 of the selected anchors, best first (0 in unused slots) and their count `[N]`."""
    if iou_threshold != HARD_NMS_IOU:
        raise ValueError(f"iou_threshold {iou_threshold}: our hard NMS runs at {HARD_NMS_IOU}")
    groups = torch.zeros(scores.shape, dtype=torch.long, device=scores.device)
    idx, valid, _ = _select(boxes, scores, groups, 1, "hard", max_detections)
    return torch.where(valid, idx, 0), valid.sum(1)


@select_hard_nms.register_fake
def _(boxes, scores, max_detections, iou_threshold):
    n = scores.shape[0]
    return scores.new_empty((n, max_detections), dtype=torch.long), scores.new_empty((n,), dtype=torch.long)


def select_hard_nms_onnx(boxes, scores, max_detections: int, iou_threshold: float):
    """ONNX translation of `select_hard_nms` (onnxscript, opset 18)."""
    from onnxscript import INT64
    from onnxscript.onnx_opset import opset18 as op

    # NonMaxSuppression: boxes [N, A, 4], scores [N, classes=1, A] -> selected [K, 3] (image, class, anchor),
    # image by image, best first within an image; it stops after max_detections selections per image.
    selected = op.NonMaxSuppression(boxes, op.Unsqueeze(scores, [1]), op.Constant(value_ints=[max_detections]),
                                    op.Constant(value_floats=[iou_threshold]), center_point_box=0)
    image = op.Slice(selected, [0], [1], [1])  # [K, 1]
    anchor = op.Squeeze(op.Slice(selected, [2], [3], [1]), [1])  # [K]
    n = op.Shape(scores, start=0, end=1)  # [1]
    images = op.Range(op.Constant(value_int=0), op.Squeeze(n, [0]), op.Constant(value_int=1))  # [N]
    one_hot = op.Cast(op.Equal(image, op.Unsqueeze(images, [0])), to=INT64.dtype)  # [K, N]
    # Slot of each selection within its image: how many selections of that image came before it.
    slot = op.Sub(op.GatherElements(op.CumSum(one_hot, op.Constant(value_int=0)), image, axis=1),
                  op.Constant(value_ints=[1]))  # [K, 1]
    empty = op.Expand(op.Constant(value_ints=[0]), op.Concat(n, op.Constant(value_ints=[max_detections]), axis=0))
    indices = op.ScatterND(empty, op.Concat(image, slot, axis=1), anchor)
    return indices, op.ReduceSum(one_hot, op.Constant(value_ints=[0]), keepdims=0)


CUSTOM_TRANSLATIONS = {torch.ops.effdet.select_hard_nms.default: select_hard_nms_onnx}


class DetectionGraph(nn.Module):
    """`model` (a plain `EfficientDet`) + anchors of `image_size` (H, W) + the official infer post-processing
    with hard NMS; see the module docstring for the outputs."""

    def __init__(self, model: EfficientDet, image_size: tuple[int, int], max_detections: int = MAX_DETECTIONS):
        super().__init__()
        self.model, self.image_size, self.max_detections = model, tuple(image_size), max_detections
        self.register_buffer("anchors", AnchorGenerator.from_config(model.config)(self.image_size).clone())
        self.register_buffer("limit", torch.tensor([image_size[0], image_size[1]] * 2, dtype=torch.float32))

    def forward(self, images: torch.Tensor):
        logits, deltas = flatten_outputs(*self.model(images))  # [N, A, C], [N, A, 4]
        best_logit, classes = logits.float().max(-1)
        boxes = BoxCoder().decode(deltas.float(), self.anchors)
        idx, num_valid = select_hard_nms(boxes, torch.sigmoid(best_logit), self.max_detections, HARD_NMS_IOU)
        valid = torch.arange(self.max_detections, device=images.device)[None] < num_valid[:, None]
        picked = boxes.gather(1, idx[..., None].expand(*idx.shape, 4))
        picked = torch.minimum(picked.clamp(min=0), self.limit)  # official infer path clips to the input frame
        scores = torch.sigmoid(best_logit.gather(1, idx))
        return (torch.where(valid[..., None], picked, 0.0), torch.where(valid, scores, 0.0),
                torch.where(valid, classes.gather(1, idx), 0), num_valid)
