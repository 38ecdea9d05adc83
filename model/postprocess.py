"""Post-processing of the head outputs into detections, batched, exactly as the official TF code does it.

Two official paths (`efficientdet/tf2/postprocess.py`), each with the official gaussian soft-NMS or a fast
hard NMS (IoU 0.5):

* ``"infer"`` (`postprocess_global`, the default for images): every anchor keeps its best class; one
  class-agnostic NMS over all anchors; boxes clipped to the network-input frame; at most 100 detections.
* ``"eval"`` (`generate_detections` with `max_nms_inputs=5000`, what the official COCO numbers use): the
  top-5000 (anchor, class) pairs by logit over all levels; NMS per class; the top-100 over all classes;
  boxes not clipped.

The NMS itself (soft and hard) is `model.nms`. All boxes are (ymin, xmin, ymax, xmax); detection boxes are in original-image pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .anchors import BoxCoder
from .efficientdet import anchor_rows, flatten_outputs, num_classes_of
from .nms import nms, top_selected

MAX_DETECTION_POINTS = 5000  # official eval pre-NMS top-k
MAX_DETECTIONS = 100


@dataclass
class Detections:
    """Per image up to `max_detections` rows, padded with zeros after `num_valid[i]`, best first.

    boxes `[N, D, 4]` (ymin, xmin, ymax, xmax) in original-image pixels; scores `[N, D]`;
    classes `[N, D]` int64, 0-based indices into the class outputs (official label = class + 1);
    num_valid `[N]` int64.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    num_valid: torch.Tensor


def infer_candidates(logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor):
    """Official pre-NMS of the "infer" path: every anchor with its best class.

    logits `[N, A, C]`, deltas `[N, A, 4]`, anchors `[A, 4]` -> boxes `[N, A, 4]` yxyx network px (not
    clipped), scores `[N, A]` (sigmoid of the max logit), classes `[N, A]` (argmax, first on ties).
    """
    best_logit, classes = logits.max(-1)
    return BoxCoder().decode(deltas, anchors), torch.sigmoid(best_logit), classes


def eval_candidates(logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor,
                    k: int = MAX_DETECTION_POINTS):
    """Official pre-NMS of the "eval" path: the top-k (anchor, class) pairs by logit, flattened as
    `anchor * C + class`, with their decoded boxes. Shapes `[N, k, 4]`, `[N, k]`, `[N, k]`."""
    n, num_anchors, num_classes = logits.shape
    return _pair_candidates(*_top_pairs(logits, min(k, num_anchors * num_classes)), num_classes, deltas, anchors)


def _pair_candidates(top_logits: torch.Tensor, flat: torch.Tensor, num_classes: int, deltas: torch.Tensor,
                     anchors: torch.Tensor):
    """`eval_candidates`' outputs from the top pairs (logits and `anchor * C + class` indices, `[N, k]`)."""
    anchor_idx, classes = flat // num_classes, flat % num_classes
    boxes = BoxCoder().decode(deltas.gather(1, anchor_idx[..., None].expand(*flat.shape, 4)), anchors[anchor_idx])
    return boxes, torch.sigmoid(top_logits), classes


def _top_pairs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k of `logits [N, A, C]` flattened to `[N, A * C]` (values, flat indices), ordered as TF's
    `top_k` (`_top_k`), without sorting all A * C values.

    The k-th best of the per-anchor maxima is a lower bound of the k-th best pair (those k anchors each have a
    pair at least that high), so only the pairs at or above it can be in the top k: a few thousand of the
    millions (D0: 49,104 x 90), which makes this ~10x faster than one big topk on the CPU.
    """
    n, num_anchors, _ = logits.shape
    flat = logits.reshape(n, -1)
    bound = _max_over(logits, 2).topk(k, dim=1).values[:, -1] if k <= num_anchors else None
    values, indices = [], []
    for i, row in enumerate(flat):
        candidates = (torch.arange(row.numel(), device=row.device) if bound is None
                      else (row >= bound[i]).nonzero().squeeze(1))
        top = _top_k(row[candidates], candidates, k)
        values.append(top[0])
        indices.append(top[1])
    return torch.stack(values), torch.stack(indices)


def _top_k(values: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of `values` (1-D) with their `index`, in any input order, ordered as TF's `top_k` orders
    equal values: by value (descending), then index (ascending); equal values at the k-th place are taken
    lowest index first. Top-ks over all of them, then two stable sorts of the k kept."""
    if bool(values.isnan().any()):  # NaN logits (a diverged model) have no order: torch's top-k, as before
        top = values.topk(k)
        return top.values, index[top.indices]
    kth = values.topk(k).values[-1]
    above = (values > kth).nonzero().squeeze(1)
    tied = (values == kth).nonzero().squeeze(1)
    tied = tied[index[tied].topk(k - above.numel(), largest=False).indices]  # the lowest indices among ties
    keep = torch.cat([above, tied])
    v, i = values[keep], index[keep]
    order = i.argsort()
    order = order[v[order].argsort(descending=True, stable=True)]
    return v[order], i[order]


def _top_pairs_by_level(cls_outs: list[torch.Tensor], num_classes: int, k: int
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`_top_pairs` of the per-level class outputs without concatenating them into anchor rows (a 4.4 M-value
    copy per D0 image, ~6 ms from NCHW outputs): the same bound, the pairs at or above it gathered level by
    level in the outputs' own layout, then the same top-k. None if k > the anchors."""
    best = torch.cat([_best_logits(c, num_classes) for c in cls_outs], 1)  # [N, anchors]
    if k > best.shape[1]:
        return None
    bound = best.topk(k, dim=1).values[:, -1]
    values, indices = [], []
    for i in range(best.shape[0]):
        level_values, level_flat, start = [], [], 0
        for output in cls_outs:
            v, flat = _pairs_at_least(output[i], num_classes, bound[i])
            level_values.append(v)
            level_flat.append(flat + start * num_classes)
            start += output[i].numel() // num_classes  # the level's anchors
        top = _top_k(torch.cat(level_values), torch.cat(level_flat), k)
        values.append(top[0])
        indices.append(top[1])
    return torch.stack(values), torch.stack(indices)


def _pairs_at_least(output: torch.Tensor, num_classes: int, bound: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits >= `bound` of one image's level `[A * C, H, W]` and their indices `row * C + class` over
    its anchor rows (y -> x -> anchor), in the memory layout's own order."""
    if output.is_contiguous():  # NCHW: [A, C, H*W]
        grid = output.reshape(-1, num_classes, output.shape[1] * output.shape[2])
        anchor, cls, pixel = (grid >= bound).nonzero(as_tuple=True)
        return grid[anchor, cls, pixel].float(), (pixel * grid.shape[0] + anchor) * num_classes + cls
    rows = anchor_rows(output[None], num_classes)[0]  # channels_last: a view, [H*W*A, C]
    row, cls = (rows >= bound).nonzero(as_tuple=True)
    return rows[row, cls].float(), row * num_classes + cls


def select_detections(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, image_scales: torch.Tensor,
                      per_class: bool, method: str = "soft", clip_size: tuple[int, int] | None = None,
                      max_detections: int = MAX_DETECTIONS) -> Detections:
    """NMS over candidates (boxes `[N, K, 4]` yxyx network px, scores `[N, K]`, classes `[N, K]`), then the
    best `max_detections` per image, boxes clipped to `clip_size` (H, W) if given, then scaled by
    `image_scales [N]` to original pixels. `per_class` runs NMS per class (eval path), else across classes."""
    num_groups = int(classes.max()) + 1 if per_class and classes.numel() else 1
    groups = classes if per_class else torch.zeros_like(classes)
    idx, valid, scores_at = _select(boxes, scores, groups, num_groups, method, max_detections)
    return _detections(boxes, scores_at, classes.gather(1, idx), idx, valid, image_scales, clip_size)


def _select(boxes, scores, groups, num_groups, method, max_detections):
    """NMS, then the best rows: indices `[N, D]` into the candidates, validity `[N, D]`, their NMS scores."""
    selected, rank = nms(boxes, scores, groups, num_groups, max_detections, method, best_of=max_detections)
    idx, valid = top_selected(selected, rank, groups, max_detections, max_detections)
    return idx, valid, selected.gather(1, idx)


def _detections(boxes, scores, classes, idx, valid, image_scales, clip_size) -> Detections:
    """`Detections` from the selected rows `idx [N, D]` of `boxes [N, K, 4]` (their `scores`, `classes`
    `[N, D]`), invalid rows zeroed, boxes clipped to `clip_size` and scaled to original pixels."""
    out_boxes = boxes.gather(1, idx[..., None].expand(*idx.shape, 4))
    if clip_size is not None:
        limit = out_boxes.new_tensor([clip_size[0], clip_size[1], clip_size[0], clip_size[1]])
        out_boxes = torch.minimum(out_boxes.clamp(min=0), limit)
    out_boxes = out_boxes * image_scales.to(out_boxes)[:, None, None]
    zeros = torch.zeros_like
    return Detections(
        boxes=torch.where(valid[..., None], out_boxes, zeros(out_boxes)),
        scores=torch.where(valid, scores, zeros(scores)),
        classes=torch.where(valid, classes, zeros(classes)),
        num_valid=valid.sum(1),
    )


def postprocess(cls_outs: list[torch.Tensor], box_outs: list[torch.Tensor], anchors: torch.Tensor,
                image_scales: torch.Tensor, image_size: tuple[int, int], mode: str = "infer",
                method: str = "soft", max_detections: int = MAX_DETECTIONS) -> Detections:
    """Head outputs of N images -> `Detections` (see the module docstring for the two official paths).

    anchors `[A, 4]` yxyx network px (from `AnchorGenerator`); image_scales `[N]` original px per network
    px (`1 / resize scale`); image_size (H, W) of the network input (the "infer" path clips to it).
    Outputs of any float dtype and memory layout; scores and boxes are computed in float32.
    """
    if mode == "infer":
        return _postprocess_infer(cls_outs, box_outs, anchors, image_scales, image_size, method, max_detections)
    if mode == "eval":
        num_classes = num_classes_of(cls_outs, box_outs)
        pairs = _top_pairs_by_level(cls_outs, num_classes, MAX_DETECTION_POINTS)
        if pairs is None:  # fewer anchors than pairs to keep (tiny inputs): the plain top-k of all pairs
            logits, deltas = flatten_outputs(cls_outs, box_outs)
            candidates = eval_candidates(logits.float(), deltas.float(), anchors)
        else:
            deltas = torch.cat([anchor_rows(b, 4) for b in box_outs], 1).float()
            candidates = _pair_candidates(*pairs, num_classes, deltas, anchors)
        return select_detections(*candidates, image_scales, per_class=True, method=method,
                                 max_detections=max_detections)
    raise ValueError(f"post-processing mode {mode!r}: expected 'infer' or 'eval'")


def _postprocess_infer(cls_outs, box_outs, anchors, image_scales, image_size, method, max_detections):
    """`infer_candidates` + `select_detections` without rearranging the logits (`[N, A, C]`, 4.4 M values per
    D0 image): the best logit of every anchor is reduced level by level in the outputs' own memory layout
    (NCHW, as the plain model and the engines return them, or channels_last, as the fused module does), and
    the class (argmax) is found only for the selected anchors. Same detections, several times faster on the
    CPU (an NCHW -> anchor-rows copy of the logits alone cost ~6 ms per D0 image)."""
    num_classes = num_classes_of(cls_outs, box_outs)
    grids = [class_grid(c, num_classes) for c in cls_outs]
    best_logit = torch.cat([_best_logits(c, num_classes) for c in cls_outs], 1)  # [N, anchors]
    deltas = torch.cat([anchor_rows(b, 4) for b in box_outs], 1).float()
    boxes = BoxCoder().decode(deltas, anchors)
    groups = torch.zeros(best_logit.shape, dtype=torch.long, device=best_logit.device)
    idx, valid, scores = _select(boxes, torch.sigmoid(best_logit), groups, 1, method, max_detections)
    return _detections(boxes, scores, _best_class(grids, idx), idx, valid, image_scales, image_size)


def class_grid(output: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One level's class output `[N, A * C, H, W]` -> `[N, A, C, H * W]`, a view in either memory layout
    (NCHW: the pixel axis is contiguous; channels_last: the class axis is)."""
    n, _, h, w = output.shape
    return output.reshape(n, -1, num_classes, h * w)


def _best_logits(output: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One level's class output `[N, A * C, H, W]` -> the best logit of each anchor `[N, H * W * A]` (float32),
    reduced along whichever axis the memory layout makes cheap: the classes of the anchor rows (channels_last,
    where they are contiguous) or the class axis of `class_grid` (NCHW, vectorised over the pixels)."""
    output = output.float()  # a bf16 reduction is ~5x slower on CPU (and max-with-indices 5x more)
    if output.is_contiguous():
        best = _max_over(class_grid(output, num_classes), 2)  # [N, A, H*W]
        return best.transpose(1, 2).reshape(best.shape[0], -1)
    return _max_over(anchor_rows(output, num_classes), 2)


def _max_over(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The max over `dim`: the element-wise maximum of its two halves first (a vectorised pass), then ATen's
    reduction over half the length (a short reduction along the contiguous axis is slow on the CPU: D0's P3
    logits as anchor rows, 36,864 x 90 float32, 0.40 ms instead of 0.67). Exact; NaN propagates as in `amax`."""
    length = x.shape[dim]
    half = length // 2
    if half < 8:
        return x.amax(dim)
    best = torch.maximum(x.narrow(dim, 0, half), x.narrow(dim, half, half)).amax(dim)
    return best if length % 2 == 0 else torch.maximum(best, x.select(dim, length - 1))


def _best_class(grids: list[torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """Argmax class (first on ties, like `tf.math.argmax`) of the anchors `idx [N, D]` (indices over all
    levels, each level's rows y -> x -> anchor) from the per-level logits `grids[l] [N, A, C, H_l * W_l]`."""
    classes, start = torch.zeros_like(idx), 0
    images = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(idx)
    for grid in grids:
        per_pixel = grid.shape[1]
        count = per_pixel * grid.shape[3]
        inside = (idx >= start) & (idx < start + count)
        local = (idx - start).clamp(0, count - 1)
        rows = grid[images, local % per_pixel, :, local // per_pixel]  # [N, D, C]
        classes = torch.where(inside, rows.float().argmax(-1), classes)
        start += count
    return classes
