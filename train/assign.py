"""Training targets: assign ground-truth boxes to anchors, for a whole padded batch at once.

Two methods, chosen by name:

* ``"iou"`` (the official one, `tf2/anchors.py` `AnchorLabeler` + `object_detection/argmax_matcher.py`):
  each anchor takes the gt box of highest IoU if that IoU >= 0.5, else it is background; then every gt box is
  force-matched to its own best anchor (matched = unmatched threshold, so nothing is ignored).
* ``"atss"`` (Zhang et al. 2020, reference code `sfzhang15/ATSS` `atss_core/modeling/rpn/atss/loss.py`):
  per level the k anchors whose centres are nearest the gt centre are candidates; the gt's IoU threshold
  is mean + std of its candidates' IoUs; a candidate is positive if its IoU >= threshold and its centre lies
  inside the gt box; an anchor claimed by several gts goes to the one of highest IoU. IoU is the official
  EfficientDet one below (the ATSS reference inherits maskrcnn-benchmark's `+1` pixel IoU).

Boxes are (ymin, xmin, ymax, xmax) in network-input pixels. Ties are broken towards the lowest index
everywhere (anchor, gt, candidate), so results are deterministic and equal on CPU and CUDA.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from model.anchors import AnchorGenerator, BoxCoder, feature_sizes

BACKGROUND = -1  # class target of negative anchors
IGNORE = -2  # class target of anchors that take no part in the loss (neither method produces it)
ATSS_CENTRE_MARGIN = 0.01  # ATSS reference: centre inside the gt when min(l, t, r, b) > 0.01 px


class Targets(NamedTuple):
    """`cls_targets [B, A]` int64 (class >= 0, BACKGROUND or IGNORE); `box_targets [B, A, 4]` float32
    (ty, tx, th, tw), zero off positives; `num_positives` float32 scalar, positives over the whole batch."""

    cls_targets: torch.Tensor
    box_targets: torch.Tensor
    num_positives: torch.Tensor


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of yxyx boxes `[..., 4]` and `[..., 4]`, broadcast against each other -> `[...]`.

    Official `box_list_ops.iou`: intersection / (area1 + area2 - intersection), no +1 pixel, and exactly 0
    where the intersection is 0. Pairwise IoU of `[M, 4]` and `[A, 4]`: `box_iou(b1[:, None], b2[None])`.
    """
    b1 = [c.contiguous() for c in boxes1.unbind(-1)]  # contiguous coordinates broadcast ~1.5x faster
    b2 = [c.contiguous() for c in boxes2.unbind(-1)]
    inter = torch.minimum(b1[2], b2[2]).sub_(torch.maximum(b1[0], b2[0])).clamp_(min=0)
    inter.mul_(torch.minimum(b1[3], b2[3]).sub_(torch.maximum(b1[1], b2[1])).clamp_(min=0))
    union = ((b1[2] - b1[0]) * (b1[3] - b1[1])) + ((b2[2] - b2[0]) * (b2[3] - b2[1]))
    union.sub_(inter)  # official order: (area1 + area2) - intersection
    empty = inter == 0
    return inter.div_(union).masked_fill_(empty, 0.0)


def _k_nearest(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Indices `[..., k]` of the k smallest values of `dist [..., n]`, ties broken by lowest index.

    `topk` alone leaves the order of equal values unspecified (anchors sharing a centre are equidistant);
    the entries equal to the k-th value are re-chosen by index, without sorting all n.
    """
    values, indices = dist.topk(k, dim=-1, largest=False, sorted=True)  # values < k-th come first
    kth = values[..., -1:]
    num_less = (values < kth).sum(-1, keepdim=True)
    position = torch.arange(dist.shape[-1], device=dist.device, dtype=torch.int32)
    ties = torch.where(dist == kth, position, dist.shape[-1]).topk(k, dim=-1, largest=False).values
    slot = torch.arange(k, device=dist.device)
    tie_pick = ties.gather(-1, (slot - num_less).clamp_(min=0)).long()
    return torch.where(slot < num_less, indices, tie_pick)


class TargetAssigner:
    """Assigns a padded batch of gt boxes to a fixed set of anchors.

    Args:
        anchors: `[A, 4]` yxyx pixels, in `AnchorGenerator` order (level -> y -> x -> anchor).
        level_sizes: anchors per level (sum = A); required by ``"atss"`` only. `from_generator` fills it.
        method: ``"iou"`` (official) or ``"atss"``.
        iou_threshold: ``"iou"``: positive if best IoU >= this (official 0.5), background below.
        atss_topk: ``"atss"``: candidates per level and gt (reference 9).
    """

    def __init__(self, anchors: torch.Tensor, level_sizes: Sequence[int] | None = None, method: str = "iou",
                 iou_threshold: float = 0.5, atss_topk: int = 9):
        if method not in ("iou", "atss"):
            raise ValueError(f"unknown assignment method {method!r}: expected 'iou' or 'atss'")
        if level_sizes is not None and sum(level_sizes) != anchors.shape[0]:
            raise ValueError(f"level_sizes {list(level_sizes)} sum to {sum(level_sizes)}, not {anchors.shape[0]}")
        if method == "atss":
            if level_sizes is None:
                raise ValueError("method 'atss' needs level_sizes (anchors per level); use from_generator")
            if sum(min(atss_topk, n) for n in level_sizes) < 2:
                raise ValueError("method 'atss' needs at least 2 candidates per gt for the IoU std")
        self.anchors = anchors.float()
        self.level_sizes = None if level_sizes is None else [int(n) for n in level_sizes]
        self.method, self.iou_threshold, self.atss_topk = method, iou_threshold, atss_topk
        self.box_coder = BoxCoder()

    @classmethod
    def from_generator(cls, generator: AnchorGenerator, image_size: tuple[int, int],
                       device: torch.device | str = "cpu", **kwargs) -> "TargetAssigner":
        """Anchors and per-level counts (`H_l * W_l * anchors_per_location`) of one image size."""
        sizes = feature_sizes(image_size, generator.min_level, generator.max_level)
        return cls(generator(image_size, device), [h * w * generator.num_anchors for h, w in sizes], **kwargs)

    @torch.no_grad()
    def __call__(self, gt_boxes: torch.Tensor, gt_classes: torch.Tensor) -> Targets:
        """`gt_boxes [B, M, 4]` yxyx pixels, `gt_classes [B, M]` int (class >= 0, -1 = padding row).

        Callers drop empty boxes first (the official data pipeline does): a zero-area gt still gets force-matched
        by ``"iou"`` (to the first anchor, as the official argmax does) with a meaningless box target.
        """
        anchors = self.anchors.to(gt_boxes.device)
        num_gt = gt_classes.shape[1]
        gt_boxes, gt_classes = gt_boxes.float(), gt_classes.long()
        matches = self.match(gt_boxes, gt_classes)
        positive = matches >= 0
        cls_targets = torch.full_like(matches, BACKGROUND)
        box_targets = torch.zeros(*matches.shape, 4, device=gt_boxes.device)
        if num_gt:
            index = matches.clamp(min=0)
            cls_targets = torch.where(positive, gt_classes.gather(1, index), cls_targets)
            matched = gt_boxes.gather(1, index[..., None].expand(-1, -1, 4))
            # Official target_assigner: encode the matched gt for matched anchors, zeros elsewhere.
            box_targets = torch.where(positive[..., None], self.box_coder.encode(matched, anchors), box_targets)
        return Targets(cls_targets, box_targets, positive.sum().float())

    @torch.no_grad()
    def match(self, gt_boxes: torch.Tensor, gt_classes: torch.Tensor) -> torch.Tensor:
        """`[B, A]` int64: the gt row (index into `gt_boxes[b]`) each anchor is assigned to, -1 = background
        (the official `match_results`). Same arguments as `__call__`."""
        anchors = self.anchors.to(gt_boxes.device)
        batch, num_gt = gt_classes.shape
        valid = gt_classes >= 0
        if num_gt == 0:
            return torch.full((batch, anchors.shape[0]), -1, dtype=torch.long, device=gt_boxes.device)
        if self.method == "iou":
            return self._match_iou(anchors, gt_boxes.float(), valid)
        return self._match_atss(anchors, gt_boxes.float(), valid)

    def _match_iou(self, anchors: torch.Tensor, gt_boxes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """`[B, A]` gt index per anchor (-1 background), official ArgMaxMatcher semantics."""
        batch, num_gt = valid.shape
        num_anchors = anchors.shape[0]
        iou = box_iou(gt_boxes[:, :, None, :], anchors[None, None])  # [B, M, A]
        iou.masked_fill_(~valid[..., None], -1.0)  # padding rows never win
        best_iou, matches = iou.max(dim=1)  # per anchor, first gt on ties (tf.argmax)
        matches.masked_fill_(best_iou < self.iou_threshold, -1)  # "below unmatched" -> negative
        # force_match_for_each_row: each gt takes its best anchor (first anchor on ties); when gts share a best
        # anchor, the one-hot + argmax over rows in argmax_matcher.py gives it to the lowest gt index.
        best_anchor = iou.argmax(dim=2).masked_fill_(~valid, num_anchors)  # padding -> spare column
        rows = torch.arange(num_gt, device=iou.device).expand(batch, num_gt)
        forced = torch.full((batch, num_anchors + 1), num_gt, dtype=torch.long, device=iou.device)
        forced = forced.scatter_reduce_(1, best_anchor, rows, "amin")[:, :num_anchors]
        return torch.where(forced < num_gt, forced, matches)

    def _match_atss(self, anchors: torch.Tensor, gt_boxes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """`[B, A]` gt index per anchor (-1 background), ATSS reference semantics (no ignored anchors)."""
        batch, num_gt = valid.shape
        anchor_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2  # [A, 2] (cy, cx)
        gt_ctr = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # [B, M, 2]
        candidates, start = [], 0
        for size in self.level_sizes:  # a handful of levels; everything inside is batched
            ctr = anchor_ctr[start:start + size]
            dist = (gt_ctr[..., 0, None] - ctr[:, 0]).square_()  # squared distance orders like the distance
            dist.add_((gt_ctr[..., 1, None] - ctr[:, 1]).square_())  # [B, M, size]
            candidates.append(_k_nearest(dist, min(self.atss_topk, size)) + start)
            start += size
        candidates = torch.cat(candidates, -1)  # [B, M, K]
        iou = box_iou(gt_boxes[:, :, None, :], anchors[candidates])  # [B, M, K]
        threshold = iou.mean(-1, keepdim=True) + iou.std(-1, keepdim=True)  # unbiased std, as torch .std()
        cy, cx = anchor_ctr[candidates].unbind(-1)
        gy0, gx0, gy1, gx1 = gt_boxes[:, :, None, :].unbind(-1)
        inside = torch.stack([cy - gy0, cx - gx0, gy1 - cy, gx1 - cx], -1).amin(-1) > ATSS_CENTRE_MARGIN
        positive = (iou >= threshold) & inside & valid[..., None]
        # An anchor positive for several gts goes to the highest IoU (lowest gt index on ties).
        flat_index = candidates.reshape(batch, -1)
        best = torch.full((batch, anchors.shape[0]), -1.0, device=iou.device)
        best.scatter_reduce_(1, flat_index, torch.where(positive, iou, -1.0).reshape(batch, -1), "amax")
        winner = positive & (iou == best.gather(1, flat_index).view_as(iou))
        rows = torch.arange(num_gt, device=iou.device)[None, :, None].expand_as(candidates)
        matches = torch.full((batch, anchors.shape[0]), num_gt, dtype=torch.long, device=iou.device)
        matches.scatter_reduce_(1, flat_index, torch.where(winner, rows, num_gt).reshape(batch, -1), "amin")
        return matches.masked_fill_(matches == num_gt, -1)
