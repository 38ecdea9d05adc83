"""Weighted boxes fusion (`eval.wbf`) against the semantics of the official `efficientdet/tf2/wbf.py`.

The cases of the official `tf2/wbf_test.py` are restated by hand (same inputs; the official rows are
`[image_id, x1, y1, x2, y2, score, class]`, here the four box numbers are passed as they are: the IoU is
symmetric in the two axes), with the expected values worked out in each docstring. Then the batched fusion is
checked against a plain restatement of the official loop (`official_fusion`) on random overlapping boxes.
"""
import pytest
import torch

from eval.wbf import IOU_THRESHOLD, box_iou, cluster_average, fuse_detections, match_clusters


def fuse_one(boxes, scores, classes, num_models):
    """`fuse_detections` of one image: (boxes [Q, 4], scores [Q], classes [Q]) as lists."""
    boxes, scores = torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores, dtype=torch.float32)
    dets = fuse_detections(boxes[None], scores[None], torch.tensor(classes)[None],
                           torch.ones(1, len(scores), dtype=torch.bool), num_models)
    q = int(dets.num_valid[0])
    return dets.boxes[0, :q], dets.scores[0, :q], dets.classes[0, :q].tolist()


def test_iou_cases():
    """Official test_detection_iou_*: [1,1,3,3] with itself 1; with [2,2,4,4] the 1x1 overlap over 4 + 4 - 1
    = 1/7; [1,1,3,2] and [2,1,4,2] overlap 1x1 over 2 + 2 - 1 = 1/3; [1,1,3,3] and [3,3,5,5] only touch: 0;
    the vector case is the three of them at once."""
    clusters = torch.tensor([[1., 1, 3, 3], [2, 2, 4, 4], [3, 3, 5, 5]])
    torch.testing.assert_close(box_iou(clusters, torch.tensor([1., 1, 3, 3])), torch.tensor([1, 1 / 7, 0]))
    torch.testing.assert_close(box_iou(torch.tensor([[1., 1, 3, 2]]), torch.tensor([2., 1, 4, 2])),
                               torch.tensor([1 / 3]))


def test_iou_of_boxes_without_area_is_nan():
    """No guard, as official: 0 / 0."""
    assert box_iou(torch.tensor([[2., 1, 10, 1]]), torch.tensor([3., 1, 10, 1])).isnan().all()


def _match(clusters, box):
    clusters = torch.tensor(clusters, dtype=torch.float32)[None]
    return int(match_clusters(clusters, torch.ones(clusters.shape[:2], dtype=torch.bool),
                              torch.tensor(box, dtype=torch.float32)[None])[0])


def test_find_matching_cluster_cases():
    """Official test_find_matching_cluster_matches: box [1,1,2,2] is its own cluster (IoU 1) and misses
    [3,3,2,2] (no overlap: IoU 0), in either order -> index 0, then 1.
    test_find_matching_cluster_best_overlap: box [3,1,13,2] with [1,1,11,2]: overlap 8 x 1 over 10 + 10 - 8,
    IoU 2/3 >= 0.55 -> 0; adding [2,1,12,2]: overlap 9 over 11, IoU 9/11 is higher -> 1.
    No cluster, or none at 0.55 -> -1."""
    match, miss = [1, 1, 2, 2], [3, 3, 2, 2]
    assert _match([match, miss], [1, 1, 2, 2]) == 0
    assert _match([miss, match], [1, 1, 2, 2]) == 1
    assert _match([[1, 1, 11, 2]], [3, 1, 13, 2]) == 0
    assert _match([[1, 1, 11, 2], [2, 1, 12, 2]], [3, 1, 13, 2]) == 1
    assert _match([miss], [1, 1, 2, 2]) == -1
    assert int(match_clusters(torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.bool), torch.ones(1, 4))[0]) == -1


def test_threshold_is_inclusive_at_055():
    """`max < 0.55` -> no match: an IoU of exactly 0.55 matches. [0,0,1,1] vs [0,0,1,0.55]: 0.55 / 1."""
    assert IOU_THRESHOLD == 0.55
    assert _match([[0, 0, 1, 1]], [0, 0, 1, 0.55]) == 0
    assert _match([[0, 0, 1, 1]], [0, 0, 1, 0.5499]) == -1


@pytest.mark.parametrize("weights, expected", [((0.5, 0.5), 2.0), ((1.0, 0.0), 1.0), ((1.0, 2.0), 7 / 3)])
def test_weighted_average_cases(weights, expected):
    """Official test_weighted_average: samples 1 and 3 with weights (.5, .5) -> 2, (1, 0) -> 1, (1, 2) -> 7/3.
    Restated through the fusion: two boxes [0,1,10,10] and [0,3,10,10] (IoU 7/9: one cluster) with those
    scores; the fused x1 is the score-weighted mean of 1 and 3, the other sides stay."""
    boxes, scores, classes = fuse_one([[0, 1, 10, 10], [0, 3, 10, 10]], weights, [0, 0], num_models=2)
    torch.testing.assert_close(boxes, torch.tensor([[0, expected, 10, 10]]))
    torch.testing.assert_close(scores, torch.tensor([sum(weights) / 2]))  # mean x min(1, 2/2)


def test_average_detections_cases():
    """Official test_average_detections, from the members' sums: d1 = [1,1,2,2] score .3, d2 = [3,3,4,4]
    score .7. Box = (.3 d1 + .7 d2) / 1.0 = [2.4, 2.4, 3.4, 3.4]; score = mean .5 x min(1, 2 / num_models):
    .5 for 1 model, .5 x 2/3 = .3333 for 3. d2 alone with 2 models: [3,3,4,4], .7 x 1/2 = .35."""
    d1, d2 = torch.tensor([1., 1, 2, 2]), torch.tensor([3., 3, 4, 4])
    box_sum, score_sum, count = 0.3 * d1 + 0.7 * d2, torch.tensor(1.0), torch.tensor(2.0)
    for num_models, score in ((1, 0.5), (3, 1 / 3)):
        box, fused = cluster_average(box_sum, score_sum, count, num_models)
        torch.testing.assert_close(box, torch.tensor([2.4, 2.4, 3.4, 3.4]))
        torch.testing.assert_close(fused, torch.tensor(score))
    box, fused = cluster_average(0.7 * d2, torch.tensor(0.7), torch.tensor(1.0), 2)
    torch.testing.assert_close(box, d2)
    torch.testing.assert_close(fused, torch.tensor(0.35))


def test_ensemble_boxes_case():
    """Official test_ensemble_boxes (num_classes 3, num_models 2): d1 [2,1,10,1] .75 class 1, d2 [3,1,10,1]
    .75 class 1, d3 [3,1,10,1] 1.0 class 2. The boxes have no height: d2's IoU with d1 is 0/0 = NaN, not
    below 0.55, so it joins d1: box (.75 x 2 + .75 x 3) / 1.5 = 2.5, score .75 x min(1, 2/2) = .75. d3 is
    alone in class 2: .5 x ... = 1.0 x 1/2 = .5. Sorted by score: [[2.5,1,10,1] .75 1, [3,1,10,1] .5 2]."""
    boxes, scores, classes = fuse_one([[2, 1, 10, 1], [3, 1, 10, 1], [3, 1, 10, 1]], [0.75, 0.75, 1.0], [1, 1, 2], 2)
    torch.testing.assert_close(boxes, torch.tensor([[2.5, 1, 10, 1], [3, 1, 10, 1]]))
    torch.testing.assert_close(scores, torch.tensor([0.75, 0.5]))
    assert classes == [1, 2]


def test_clusters_are_matched_against_their_running_average():
    """A chain: a = [0,0,10,10] (1.0), b = [0,4,10,14] (1.0): IoU 6/14 < .55 with a, so b starts a cluster;
    c = [0,2,10,12] (1.0) has IoU 8/12 with both: ties go to the first cluster (a). Then the average of a
    and c is [0,1,10,11]; d = [0,3,10,13] has IoU 8/12 with it and 9/11 with b -> b. Scores with 4 models:
    2/4 each; boxes [0,1,10,11] and [0,3.5,10,13.5]."""
    boxes, scores, _ = fuse_one([[0, 0, 10, 10], [0, 4, 10, 14], [0, 2, 10, 12], [0, 3, 10, 13]], [1.0] * 4,
                                [0] * 4, num_models=4)
    torch.testing.assert_close(boxes, torch.tensor([[0, 1, 10, 11], [0, 3.5, 10, 13.5]]))
    torch.testing.assert_close(scores, torch.tensor([0.5, 0.5]))


def test_classes_are_fused_apart_and_ties_keep_class_order():
    """Identical boxes of two classes stay two detections; equal scores are listed class by class (the
    official stable sort over clusters gathered class by class)."""
    boxes, scores, classes = fuse_one([[0, 0, 5, 5]] * 2, [0.5, 0.5], [3, 1], num_models=1)
    assert classes == [1, 3]
    torch.testing.assert_close(scores, torch.tensor([0.5, 0.5]))


def official_fusion(boxes, scores, classes, num_models):
    """The official ensemble_detections restated in plain Python on one image (member lists, averages
    recomputed from the members, per class ascending, stable sort by score)."""
    def iou(a, b):
        inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    def average(members):
        total = sum(s for _, s in members)
        box = [sum(b[k] * s for b, s in members) / total for k in range(4)]
        return box, total / len(members) * min(1, len(members) / num_models)

    out = []
    for cid in sorted(set(classes)):
        clusters, averages = [], []
        for box, score, c in zip(boxes, scores, classes):
            if c != cid:
                continue
            ious = [iou(a, box) for a, _ in averages]
            if not ious or max(ious) < IOU_THRESHOLD:
                clusters.append([(box, score)])
                averages.append(average(clusters[-1]))
            else:
                best = ious.index(max(ious))
                clusters[best].append((box, score))
                averages[best] = average(clusters[best])
        out += [(box, score, cid) for box, score in averages]
    out.sort(reverse=True, key=lambda d: d[1])
    return out


def random_passes(generator, n_boxes):
    """Boxes jittered around a few objects, as passes of one image give: float64 lists."""
    centres = torch.rand(4, 2, generator=generator, dtype=torch.float64) * 80 + 10
    pick = torch.randint(0, 4, (n_boxes,), generator=generator)
    size = torch.rand(n_boxes, 2, generator=generator, dtype=torch.float64) * 6 + 12
    centre = centres[pick] + torch.randn(n_boxes, 2, generator=generator, dtype=torch.float64) * 2
    boxes = torch.cat([centre - size / 2, centre + size / 2], 1)
    scores = torch.rand(n_boxes, generator=generator, dtype=torch.float64) * 0.9 + 0.05
    classes = torch.randint(0, 3, (n_boxes,), generator=generator)
    return boxes, scores, classes


def test_batched_fusion_matches_the_official_loop():
    """Three images of 40 / 0 / 25 rows at once (with invalid padding rows mixed in) against
    `official_fusion` image by image: same clusters, boxes, scores, classes and order."""
    generator = torch.Generator().manual_seed(0)
    counts, width = (40, 0, 25), 48
    boxes, scores = torch.zeros(3, width, 4), torch.zeros(3, width)
    classes, valid = torch.zeros(3, width, dtype=torch.long), torch.zeros(3, width, dtype=torch.bool)
    expected = []
    for i, n in enumerate(counts):
        b, s, c = random_passes(generator, n)
        slots = torch.randperm(width, generator=generator)[:n].sort().values  # valid rows among padding
        boxes[i, slots], scores[i, slots], classes[i, slots], valid[i, slots] = b.float(), s.float(), c, True
        expected.append(official_fusion(b.float().double().tolist(), s.float().double().tolist(), c.tolist(), 3))
    dets = fuse_detections(boxes, scores, classes, valid, num_models=3)
    assert dets.num_valid.tolist() == [len(e) for e in expected]
    assert any(len(e) < n for e, n in zip(expected, counts) if n)  # boxes were fused
    for i, rows in enumerate(expected):
        q = len(rows)
        torch.testing.assert_close(dets.boxes[i, :q],
                                   torch.tensor([r[0] for r in rows], dtype=torch.float32).reshape(q, 4))
        torch.testing.assert_close(dets.scores[i, :q], torch.tensor([r[1] for r in rows], dtype=torch.float32))
        assert dets.classes[i, :q].tolist() == [r[2] for r in rows]
        assert not dets.scores[i, q:].any()
