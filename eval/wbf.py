"""Weighted boxes fusion (WBF) of several detection passes, as the official `efficientdet/tf2/wbf.py` does it.

The official function (`ensemble_detections(params, detections, num_models)`, used by the official TTA
evaluation `keras/eval.py --enable_tta`) works on one image's rows, in their given order:

* per class (ascending class id), each detection in turn is compared with the *average* of every cluster
  of its class built so far (IoU, `vectorized_iou`); it joins the cluster with the highest IoU unless that
  IoU is below 0.55 (`find_matching_cluster`), else it starts a new cluster;
* a cluster's average (`average_detections`) is recomputed from all its members: each box coordinate is the
  score-weighted mean of the members' coordinates; its score is the plain mean of the members' scores
  times `min(1, members / num_models)`, so a box that only some passes found is scaled down;
* the averages of all classes are then sorted by that score, highest first (a stable sort).

Here the same decisions are made for every (image, class) group at once: step t handles the t-th detection
of every group, against its group's clusters, kept as running sums (sum of score * box, sum of scores,
count), so an average is `cluster_average` of the sums. Sums are float64, outputs float32.

The official IoU has no guard for boxes without area: two such boxes give 0 / 0 = NaN, and `NaN < 0.55` is
false, so the detection joins that cluster (the official test `test_ensemble_boxes` relies on it with
zero-height boxes). Kept: a NaN IoU is a match, ranked first (`torch.max` propagates NaN).
Left out on purpose: the official rows of one pass are zero-padded to 100 (score-0 rows that form NaN
clusters); only valid rows are fused here. With the official labels (class index + 1) its
`range(num_classes)` loop skips the last class; our class indices are 0-based and every class is fused.
The IoU formula is symmetric in x and y, so yxyx boxes (ours) and the official xyxy rows fuse alike.
"""
from __future__ import annotations

import torch

from model.postprocess import Detections

IOU_THRESHOLD = 0.55  # official find_matching_cluster


def box_iou(clusters: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Official `vectorized_iou`: IoU of `clusters [..., K, 4]` with `box [..., 4]` -> `[..., K]`.

    Corners (a1, b1, a2, b2), either axis first. No guard: two boxes without area give NaN.
    """
    box = box.unsqueeze(-2)
    inter_a = (torch.minimum(clusters[..., 2], box[..., 2]) - torch.maximum(clusters[..., 0], box[..., 0])).clamp(min=0)
    inter_b = (torch.minimum(clusters[..., 3], box[..., 3]) - torch.maximum(clusters[..., 1], box[..., 1])).clamp(min=0)
    inter = inter_a * inter_b
    area_c = (clusters[..., 2] - clusters[..., 0]) * (clusters[..., 3] - clusters[..., 1])
    area_b = (box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1])
    return inter / (area_c + area_b - inter)


def match_clusters(averages: torch.Tensor, exists: torch.Tensor, boxes: torch.Tensor,
                   iou_threshold: float = IOU_THRESHOLD) -> torch.Tensor:
    """Official `find_matching_cluster` for G groups at once.

    averages `[G, K, 4]` cluster average boxes (K >= 1), exists `[G, K]` bool (which clusters are real), boxes `[G, 4]`
    one detection per group. Returns `[G]` int64: the cluster of highest IoU (first on ties), or -1 when the
    group has no cluster or that IoU is below `iou_threshold` (a NaN IoU is not below it: a match).
    """
    best, index = torch.where(exists, box_iou(averages, boxes), -torch.inf).max(-1)
    return torch.where(exists.any(-1) & ~(best < iou_threshold), index, -1)


def cluster_average(box_sum: torch.Tensor, score_sum: torch.Tensor, count: torch.Tensor,
                    num_models: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Official `average_detections` from a cluster's sums: box_sum `[..., 4]` (sum of score * box),
    score_sum `[...]`, count `[...]` members. Returns the score-weighted mean box `[..., 4]` and the score
    `mean(scores) * min(1, count / num_models)` `[...]`."""
    box = box_sum / score_sum.unsqueeze(-1)
    score = score_sum / count * torch.clamp(count / num_models, max=1.0)
    return box, score


def fuse_detections(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, valid: torch.Tensor,
                    num_models: int, iou_threshold: float = IOU_THRESHOLD) -> Detections:
    """WBF of each image's rows, in the given row order (the order matters: clustering is greedy).

    boxes `[N, P, 4]` (yxyx original px), scores `[N, P]`, classes `[N, P]` int64, valid `[N, P]` bool: the
    detections of all `num_models` passes of image i, concatenated. Returns `Detections` with one row per
    fused cluster, best first, `D` = the most clusters of an image (no cap: the official function returns
    every cluster), float32.
    """
    n, p = scores.shape
    img, row = valid.nonzero(as_tuple=True)  # row-major: each image's rows in their given order
    cls = classes[img, row]
    key = img * (int(cls.max()) + 1 if cls.numel() else 1) + cls  # group = (image, class), classes ascending
    order = key.argsort(stable=True)
    key, img, row, cls = key[order], img[order], row[order], cls[order]
    group_keys, group, sizes = torch.unique_consecutive(key, return_inverse=True, return_counts=True)
    g, t_max = len(group_keys), int(sizes.max()) if sizes.numel() else 0
    step = torch.arange(len(key), device=key.device) - (sizes.cumsum(0) - sizes)[group]  # index within group

    det_boxes = boxes.new_zeros(g, t_max, 4, dtype=torch.float64)
    det_scores = scores.new_zeros(g, t_max, dtype=torch.float64)
    present = torch.zeros(g, t_max, dtype=torch.bool, device=scores.device)
    det_boxes[group, step] = boxes[img, row].double()
    det_scores[group, step] = scores[img, row].double()
    present[group, step] = True

    box_sum, score_sum = torch.zeros_like(det_boxes), torch.zeros_like(det_scores)
    count = torch.zeros_like(det_scores)
    clusters = torch.zeros(g, dtype=torch.long, device=scores.device)
    slots = torch.arange(t_max, device=scores.device)
    rows = torch.arange(g, device=scores.device)
    for t in range(t_max):  # detection t of every group: its group has at most t clusters, in slots < t + 1
        averages, _ = cluster_average(box_sum[:, :t + 1], score_sum[:, :t + 1], count[:, :t + 1], num_models)
        match = match_clusters(averages, slots[:t + 1] < clusters[:, None], det_boxes[:, t], iou_threshold)
        active = present[:, t]
        target = torch.where(match >= 0, match, clusters)[active]
        box_sum[rows[active], target] += det_scores[active, t, None] * det_boxes[active, t]
        score_sum[rows[active], target] += det_scores[active, t]
        count[rows[active], target] += 1
        clusters += active & (match < 0)

    real = slots < clusters[:, None]  # [G, T]
    fused_boxes, fused_scores = cluster_average(box_sum[real], score_sum[real], count[real], num_models)
    group_of = rows[:, None].expand(g, t_max)[real]
    fused_img = group_keys.new_zeros(g)
    fused_img[group] = img
    fused_cls = group_keys.new_zeros(g)
    fused_cls[group] = cls
    return _per_image(fused_boxes.float(), fused_scores.float(), fused_cls[group_of], fused_img[group_of], n)


def _per_image(boxes, scores, classes, images, n) -> Detections:
    """Clusters (boxes `[Q, 4]`, scores, classes, images `[Q]`, ordered by image, class, creation) ->
    `Detections` `[n, D]`: each image's clusters by descending score, ties in that order (the official
    stable `list.sort(reverse=True)`), zero-padded."""
    by_score = scores.argsort(descending=True, stable=True)
    order = by_score[images[by_score].argsort(stable=True)]  # image-major, score-descending within
    boxes, scores, classes, images = boxes[order], scores[order], classes[order], images[order]
    num_valid = torch.bincount(images, minlength=n)
    slot = torch.arange(len(images), device=images.device) - (num_valid.cumsum(0) - num_valid)[images]
    d = int(num_valid.max()) if n else 0
    out = Detections(boxes.new_zeros(n, d, 4), scores.new_zeros(n, d), classes.new_zeros(n, d), num_valid)
    out.boxes[images, slot], out.scores[images, slot], out.classes[images, slot] = boxes, scores, classes
    return out
