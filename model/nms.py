"""Non-maximum suppression as the official TF code runs it, batched: every (image, group) independently, at
most `max_per_group` selections, boxes (ymin, xmin, ymax, xmax).

Soft-NMS (`tf.raw_ops.NonMaxSuppressionV5` with `soft_nms_sigma = sigma / 2`): repeatedly select the highest
current score; every remaining box of the same group is multiplied by `exp(-iou^2 / sigma)` (sigma 0.5);
a box whose score falls to `score_threshold` (0.001) or below is dropped; no hard suppression at all.
Hard NMS (IoU 0.5): torchvision's C++ kernel on a growing prefix of the candidates (`_hard_nms`).
"""
from __future__ import annotations

import torch

SOFT_NMS_SIGMA = 0.5
SOFT_NMS_SCORE_THRESHOLD = 0.001
HARD_NMS_IOU = 0.5


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of yxyx boxes `a [..., 4]` and `b [..., 4]` (broadcast); 0 when a box is empty."""
    inter_h = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    inter_w = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = inter_h * inter_w
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return torch.where((area_a > 0) & (area_b > 0), inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, num_groups: int, max_per_group: int,
        method: str = "soft", sigma: float = SOFT_NMS_SIGMA, score_threshold: float = SOFT_NMS_SCORE_THRESHOLD,
        iou_threshold: float = HARD_NMS_IOU, best_of: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS run independently in every (image, group), all groups at once, stopping after
    `max_per_group` selections per group (so 100 iterations at most, however many boxes there are).

    `method="soft"`: gaussian soft-NMS, remaining boxes decay by `exp(-iou^2 / sigma)` and are dropped at
    `score_threshold` or below. `method="hard"`: boxes with IoU > `iou_threshold` are suppressed, no score
    threshold (official hard NMS uses -inf).
    boxes `[N, K, 4]`, scores `[N, K]`, groups `[N, K]` int64 in [0, num_groups) (all zeros for
    class-agnostic NMS). Returns `selected_scores [N, K]` (score at selection, 0 if not selected) and
    `rank [N, K]` (iteration at which it was selected; `max_per_group` if not selected).

    best_of (soft-NMS): only the `best_of` best selections of each image (over all groups) are wanted, as
    the evaluation path keeps its top 100. Scores only decay, so every later selection scores at most the
    best current score; once that is below the `best_of`-th best selection of every image, no later selection
    can enter (or reorder) the best `best_of`, and the loop stops there: the same best `best_of`, with fewer
    selections after them. Exact, and most of the loop on a trained model's outputs.
    """
    if method not in ("soft", "hard"):
        raise ValueError(f"nms method {method!r}: expected 'soft' or 'hard'")
    if method == "hard":
        return _hard_nms(boxes, scores, groups, num_groups, max_per_group, iou_threshold)
    return _soft_nms_on_best(boxes, scores, groups, num_groups, max_per_group, sigma, score_threshold, best_of)


def _soft_nms_on_best(boxes, scores, groups, num_groups, max_per_group, sigma, score_threshold, best_of,
                      prefix: int = 1024):
    """Soft-NMS with `nms`'s contract on the candidates that can matter, kept in their original order (ties
    still go to the lowest index): those above the score threshold (the others are never selected; a trained
    model leaves few) and, with one group (the image path: 49,104 candidates per D0 image), only the best
    `prefix` of those first. Scores only decay and only selected boxes decay others, so a candidate outside the
    prefix scores at most its initial score all along: once the prefix yields `max_per_group` selections, all
    scoring above the best score left outside, no outside box can be selected before them and the result is
    exact; otherwise it runs on all of them (at most one wasted prefix run: with crowded equal scores, e.g.
    a fresh model's, no prefix can prove itself)."""
    n, k = scores.shape
    masked = torch.where(scores > score_threshold, scores, -torch.inf)
    count = int((masked > -torch.inf).sum(1).max()) if scores.numel() else 0
    m = min(count, prefix) if num_groups == 1 else count
    while True:
        top = masked.topk(min(m + 1, k), dim=1)
        idx = top.indices[:, :m].sort(1).values
        sel, rank = _greedy_nms(boxes.gather(1, idx[..., None].expand(*idx.shape, 4)), scores.gather(1, idx),
                                groups.gather(1, idx), num_groups, max_per_group, "soft", sigma, score_threshold,
                                None, best_of)
        if m >= count:
            break
        outside = top.values[:, m]  # the best score left out (-inf: none above the threshold)
        chosen = rank < max_per_group
        lowest = torch.where(chosen, sel, torch.inf).amin(1)
        if bool(((outside == -torch.inf) | ((chosen.sum(1) >= max_per_group) & (lowest > outside))).all()):
            break
        m = count
    return (torch.zeros_like(scores).scatter_(1, idx, sel),
            torch.full_like(groups, max_per_group).scatter_(1, idx, rank))


def _hard_nms(boxes, scores, groups, num_groups, max_per_group, iou_threshold, prefix: int = 256):
    """Hard NMS with `nms`'s contract, through torchvision's C++ greedy loop on a prefix of the candidates.

    Greedy NMS decides each box from the boxes before it in score order only, so on the `m` best candidates
    it makes exactly the decisions it makes on all of them. Once that prefix yields `max_per_group` selections
    (class-agnostic) or `max_per_group` in total (per group: the rows `top_selected` keeps are then all
    among them, provided no candidate left out ties the prefix's last score, so with several groups the prefix
    is never cut inside a run of equal scores: a tied box of a lower group would come first), later
    candidates cannot matter; otherwise the prefix grows 4x. The infer path has one
    candidate per anchor (D0 512: 49,104), so this is what makes it cheap. The loop costs ~(selections x
    prefix) IoUs: the first prefix is 256, which on a COCO photo (the D0 fixture's) already yields 137 boxes
    (0.2 ms; 1,024 candidates: 1.6 ms); images with few objects need a longer one (a shapes-trained D0: 11-45
    from 256, 67-159 from 1,024), where the first try adds ~0.1 ms. Order as TF's queue: descending
    score, ties to the lowest index (forced through a strictly decreasing rank; low-precision scores tie a
    lot). Groups are kept apart by shifting each group's boxes by `group * span` along both axes (no box of
    one group then meets another's).
    """
    import torchvision  # C++ NMS kernel; imported here so that the model package loads without it

    n, k = scores.shape
    selected_scores = torch.zeros_like(scores)
    rank = torch.full((n, k), max_per_group, dtype=torch.long, device=scores.device)
    if k == 0:
        return selected_scores, rank
    span = float(boxes.abs().amax()) * 2 + 1
    for i in range(n):
        m = min(prefix, k)
        while True:
            # The first m in TF's order (descending score, ties by index): every candidate at or above the
            # m-th best score, in index order, stably sorted by score, then cut at m (one group; with several,
            # all of those tied with the m-th are kept).
            cand = (scores[i] >= scores[i].topk(m, sorted=False).values.min()).nonzero().squeeze(1)
            cand = cand[scores[i, cand].argsort(descending=True, stable=True)[:m if num_groups == 1 else None]]
            ranks = torch.arange(len(cand), 0, -1, dtype=torch.float64, device=scores.device)
            # float64: the shifts must not cost IoU precision; only the candidates' boxes are shifted
            shifted = boxes[i, cand].double() + groups[i, cand, None].double() * span
            keep = cand[torchvision.ops.nms(shifted, ranks, iou_threshold)]
            if len(cand) >= k or keep.numel() >= max_per_group:
                break
            m = min(4 * m, k)
        # Rank within the group: position among the group's selections (a stable sort keeps their order).
        by_group = groups[i, keep].argsort(stable=True)
        _, counts = groups[i, keep[by_group]].unique_consecutive(return_counts=True)
        starts = (counts.cumsum(0) - counts).repeat_interleave(counts)
        within = torch.empty_like(keep)
        within[by_group] = torch.arange(keep.numel(), device=keep.device) - starts
        keep, within = keep[within < max_per_group], within[within < max_per_group]
        selected_scores[i, keep] = scores[i, keep]
        rank[i, keep] = within
    return selected_scores, rank


def _greedy_nms(boxes, scores, groups, num_groups, max_per_group, method, sigma, score_threshold, iou_threshold,
                best_of: int | None = None):
    """The loop of `nms`, on all the candidates it is given (soft-NMS; for hard NMS, the vectorised
    reference that `_hard_nms` is tested against); `best_of`: see `nms`."""
    n, k = scores.shape
    active = scores > score_threshold if method == "soft" else torch.ones_like(scores, dtype=torch.bool)
    current = torch.where(active, scores, -torch.inf)
    selected_scores = torch.zeros_like(scores)
    rank = torch.full((n, k), max_per_group, dtype=torch.long, device=scores.device)
    index = torch.arange(k, device=scores.device).expand(n, k)
    rows = torch.arange(n, device=scores.device)[:, None].expand(n, num_groups)
    for it in range(max_per_group):
        if not active.any():
            break
        if best_of is not None and it % 4 == 3 and best_of <= k:  # every 4 steps: a top-k is not free
            kth_best = selected_scores.topk(best_of, dim=1).values[:, -1]  # 0 while fewer are selected
            if bool((current.amax(1) < kth_best).all()):
                break
        # The best remaining box of each group; ties go to the lowest index, like TF's priority queue.
        if num_groups == 1:
            pick = current.argmax(1, keepdim=True)  # argmax returns the first maximal index
            picked = active.gather(1, pick)
        else:
            group_max = current.new_full((n, num_groups), -torch.inf).scatter_reduce(1, groups, current, "amax")
            is_max = active & (current == group_max.gather(1, groups))
            pick = torch.full((n, num_groups), k, dtype=torch.long, device=scores.device)
            pick = pick.scatter_reduce(1, groups, torch.where(is_max, index, k), "amin")
            picked = pick < k  # [N, G]
            pick = pick.clamp(max=k - 1)
        sel_rows, sel_cols = rows[picked], pick[picked]
        selected_scores[sel_rows, sel_cols] = current[sel_rows, sel_cols]
        rank[sel_rows, sel_cols] = it
        active[sel_rows, sel_cols] = False
        # Compare every remaining box with the box just selected in its own group.
        chosen = boxes.gather(1, pick[..., None].expand(n, num_groups, 4))  # [N, G, 4]
        reference = chosen if num_groups == 1 else chosen.gather(1, groups[..., None].expand(n, k, 4))
        iou = pairwise_iou(boxes, reference)
        affected = active & (picked if num_groups == 1 else picked.gather(1, groups))
        if method == "soft":
            current = torch.where(affected, current * torch.exp(-iou * iou / sigma), current)
            active &= current > score_threshold
        else:
            active &= ~(affected & (iou > iou_threshold))
        current = torch.where(active, current, -torch.inf)
    return selected_scores, rank


def top_selected(scores: torch.Tensor, rank: torch.Tensor, groups: torch.Tensor, max_per_group: int,
                  max_detections: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices `[N, D]` of the best selected rows and a validity mask, score first, then (group, rank):
    the order TF's top_k gives over per-group results concatenated group by group."""
    n, k = scores.shape
    count = int((rank < max_per_group).sum(1).max()) if k else 0
    if count < k // 4:  # few selections (hard NMS on one candidate per anchor): sort those only
        # the selected rows in index order (then unselected ones, invalid anyway): a top-k, not a sort of all k
        key = torch.arange(k, 0, -1, dtype=torch.float32, device=rank.device).expand(n, k)
        rows = torch.where(rank < max_per_group, key, 0.0).topk(max(count, 1), dim=1).indices
        idx, valid = top_selected(scores.gather(1, rows), rank.gather(1, rows), groups.gather(1, rows),
                                   max_per_group, max_detections)
        return rows.gather(1, idx.clamp(max=rows.shape[1] - 1)), valid
    order = groups * (max_per_group + 1) + rank
    order = torch.where(rank < max_per_group, order, torch.iinfo(torch.long).max)
    by_group = order.argsort(dim=1, stable=True)
    sorted_scores = torch.where(rank.gather(1, by_group) < max_per_group, scores.gather(1, by_group), -1.0)
    by_score = sorted_scores.argsort(dim=1, descending=True, stable=True)[:, :max_detections]
    if k < max_detections:  # fewer candidates than output rows: pad with invalid rows
        by_score = torch.cat([by_score, by_score.new_zeros(n, max_detections - k)], 1)
        sorted_scores = torch.cat([sorted_scores, sorted_scores.new_full((n, 1), -1.0)], 1)
        by_score[:, k:] = k
        by_group = torch.cat([by_group, by_group.new_zeros(n, 1)], 1)
    return by_group.gather(1, by_score), sorted_scores.gather(1, by_score) >= 0
