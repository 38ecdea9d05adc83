"""Anchor assignment: official ArgMax matcher semantics ("iou") and ATSS, on hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model import AnchorGenerator, BoxCoder, get_config
from train.assign import TargetAssigner, _k_nearest, box_iou
from train.loss import box_loss_sum


def assign(anchors, gt_boxes, gt_classes, **kwargs):
    """Single image helper: lists -> Targets for a batch of one."""
    assigner = TargetAssigner(torch.tensor(anchors, dtype=torch.float32), **kwargs)
    return assigner(torch.tensor([gt_boxes], dtype=torch.float32).reshape(1, -1, 4),
                    torch.tensor([gt_classes], dtype=torch.long).reshape(1, -1))


def test_box_iou_is_official_no_plus_one():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[0.0, 5.0, 10.0, 15.0],  # overlap 10 x 5 = 50, union 150 -> 1/3
                      [0.0, 10.0, 10.0, 20.0],  # touching edge: 0 (a +1 pixel convention would give > 0)
                      [5.0, 5.0, 5.0, 5.0]])  # empty box inside: intersection 0 -> exactly 0, no 0/0
    iou = box_iou(a[:, None], b[None])
    assert iou.shape == (1, 3)
    assert iou[0].tolist() == pytest.approx([1 / 3, 0.0, 0.0])


def test_iou_force_match_below_threshold():
    anchors = [[0, 0, 10, 10], [0, 10, 10, 20], [20, 20, 30, 30], [0, 0, 20, 20]]
    # gt0: IoU 90/100 = 0.9 with anchor 0 -> positive by threshold.
    # gt1: IoU with anchor 2 is 36 / (100 + 36 - 36) = 0.36 < 0.5, its best -> force-matched anyway.
    t = assign(anchors, [[0, 0, 10, 9], [20, 20, 26, 26]], [3, 5])
    assert t.cls_targets[0].tolist() == [3, -1, 5, -1]
    assert t.num_positives.item() == 2
    # box target of anchor 2 = encode(gt1): centres 23 vs 25, sizes 6 vs 10 -> (-0.2, -0.2, log 0.6, log 0.6)
    assert t.box_targets[0, 2].tolist() == pytest.approx([-0.2, -0.2, math.log(0.6), math.log(0.6)], abs=1e-6)
    assert t.box_targets[0, 1].tolist() == [0.0] * 4 and t.box_targets[0, 3].tolist() == [0.0] * 4


def test_iou_two_gts_with_the_same_best_anchor_go_to_the_lower_index():
    anchors = [[0, 0, 10, 10], [0, 0, 10, 30]]
    g_low = [0, 0, 10, 3]  # IoU anchor0 0.3, anchor1 30/300 = 0.1 -> best anchor 0
    g_high = [0, 0, 10, 9]  # IoU anchor0 0.9 (argmax of the column), anchor1 90/300 = 0.3
    # argmax_matcher: both rows force anchor 0; argmax over the one-hot rows picks the first row, so the
    # forced match beats the 0.9 threshold match, and g_high is left without any anchor.
    assert assign(anchors, [g_low, g_high], [1, 2]).cls_targets[0].tolist() == [1, -1]
    assert assign(anchors, [g_high, g_low], [2, 1]).cls_targets[0].tolist() == [2, -1]


def test_iou_force_match_overrides_another_gts_threshold_match():
    anchors = [[0, 0, 10, 10], [0, 0, 10, 12]]
    g_a = [0, 0, 10, 10]  # IoU 1.0 / 100/120 = 0.833: best anchor 0, anchor 1 matched by threshold
    g_b = [0, 10, 10, 14]  # IoU 0 (touching) / 20/140 = 0.143: best anchor 1 -> forced there
    t = assign(anchors, [g_a, g_b], [4, 7])
    assert t.cls_targets[0].tolist() == [4, 7]


def test_iou_threshold_is_inclusive_at_half():
    gt = [0, 0, 10, 5]  # area 50
    anchors = [[0, 0, 10, 5],  # IoU 1 (its best anchor)
               [0, 0, 10, 10],  # IoU 50/100 = 0.5 exactly in float32 -> positive (>= 0.5)
               [0, 0, 10, 10.2]]  # IoU 50/102 = 0.490 -> negative
    assert assign(anchors, [gt], [0]).cls_targets[0].tolist() == [0, 0, -1]


def test_empty_and_padded_ground_truth():
    anchors = [[0, 0, 10, 10], [20, 20, 30, 30]]
    # M = 0: everything is background.
    t = assign(anchors, [], [])
    assert t.cls_targets.tolist() == [[-1, -1]] and t.num_positives.item() == 0
    assert not t.box_targets.any()
    # Padding rows (class -1) never match nor force, even when their box equals an anchor.
    assigner = TargetAssigner(torch.tensor(anchors, dtype=torch.float32))
    boxes = torch.tensor([[[0, 0, 10, 10], [20, 20, 30, 30]], [[20, 20, 30, 30], [0, 0, 0, 0]]], dtype=torch.float32)
    classes = torch.tensor([[6, -1], [-1, -1]])  # image 1 has padding only: pure background
    t = assigner(boxes, classes)
    assert t.cls_targets.tolist() == [[6, -1], [-1, -1]]
    assert t.num_positives.item() == 1


def _official_argmax_matcher(sim: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Literal numpy transcription of argmax_matcher._match for one image: sim [M, A] -> matches [A]."""
    matches = sim.argmax(0)
    matches[sim.max(0) < threshold] = -1
    force_cols = sim.argmax(1)
    indicators = np.eye(sim.shape[1])[force_cols]  # tf.one_hot
    force_rows = indicators.argmax(0)
    return np.where(indicators.max(0) > 0, force_rows, matches)


def _random_batch(generator, image_size, batch=3, max_boxes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    yx = torch.rand(batch, max_boxes, 2, generator=g) * image_size * 0.8
    hw = torch.rand(batch, max_boxes, 2, generator=g) * image_size * 0.5 + 2
    boxes = torch.cat([yx, (yx + hw).clamp(max=image_size)], -1)
    classes = torch.randint(0, 90, (batch, max_boxes), generator=g)
    classes[1, 4:] = -1  # padding
    classes[2, :] = -1  # an image without boxes
    return boxes, classes


def test_iou_batch_equals_official_matcher_per_image():
    generator = AnchorGenerator.from_config(get_config("efficientdet-d0"))
    assigner = TargetAssigner.from_generator(generator, (128, 128))
    boxes, classes = _random_batch(generator, 128)
    t = assigner(boxes, classes)
    anchors = generator((128, 128))
    for b in range(boxes.shape[0]):
        valid = classes[b] >= 0
        expected = np.full(anchors.shape[0], -1)
        if valid.any():
            sim = box_iou(boxes[b, valid][:, None], anchors[None]).numpy()
            matches = _official_argmax_matcher(sim)
            expected = np.where(matches >= 0, classes[b, valid].numpy()[matches.clip(0)], -1)
        assert np.array_equal(t.cls_targets[b].numpy(), expected)
    positive = t.cls_targets >= 0
    assert t.num_positives.item() == positive.sum().item() > 0
    assert (t.box_targets[~positive] == 0).all()


def _official_encode_float32(boxes: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """`faster_rcnn_box_coder._encode` with `box_list.get_center_coordinates_and_sizes`, in numpy float32, op
    for op: size = max - min, centre = min + size / 2, sizes + 1e-8, then (dy / ha, dx / wa, log, log)."""
    def centres_sizes(b):
        ymin, xmin, ymax, xmax = b.T
        h, w = ymax - ymin, xmax - xmin
        return ymin + h / np.float32(2), xmin + w / np.float32(2), h, w
    (yc, xc, h, w), (yca, xca, ha, wa) = centres_sizes(boxes), centres_sizes(anchors)
    eps = np.float32(1e-8)
    ha, wa, h, w = ha + eps, wa + eps, h + eps, w + eps
    return np.stack([(yc - yca) / ha, (xc - xca) / wa, np.log(h / ha), np.log(w / wa)], -1)


def test_box_targets_follow_the_official_float32_arithmetic_where_centres_coincide():
    """A gt box whose x-centre (80) is the centre of P5 anchors (stride 32): in exact arithmetic tx = 0 there,
    but the official float32 coder takes the anchor centre as `xmin + (xmax - xmin) / 2`, which for the
    aspect-2 anchor [-10.51, 170.51] is not 80, and gets tx = -4.2146844e-08. The loss mask
    `box_targets != 0` keeps that element, so it must be kept here too: same targets, same mask, same loss."""
    generator = AnchorGenerator.from_config(get_config("efficientdet-d0"))
    assigner = TargetAssigner.from_generator(generator, (512, 512))
    gt_boxes, gt_classes = torch.tensor([[[30.0, 16.0, 150.0, 144.0]]]), torch.tensor([[3]])
    targets = assigner(gt_boxes, gt_classes)
    positive = torch.nonzero(targets.cls_targets[0] >= 0).squeeze(1)
    anchors = generator((512, 512))[positive].numpy()
    ours = targets.box_targets[0, positive].numpy()
    official = _official_encode_float32(np.repeat(gt_boxes[0].numpy(), len(positive), 0), anchors)
    assert np.array_equal(ours[:, :2], official[:, :2])  # ty, tx: bit for bit
    np.testing.assert_allclose(ours[:, 2:], official[:, 2:], rtol=1e-6)  # th, tw: log, within float32 ulps
    assert np.array_equal(ours != 0, official != 0)

    # Positive anchors centred on x = 80 in exact arithmetic (their float32 corners are rounded).
    on_centre = np.abs((anchors[:, 1].astype(np.float64) + anchors[:, 3]) / 2 - 80.0) < 1e-4
    tiny = on_centre & (ours[:, 1] != 0)
    assert on_centre.sum() == 8 and tiny.sum() == 2 and np.all(ours[tiny, 1] == np.float32(-4.2146844e-08))
    assert np.all(anchors[tiny, 3] - anchors[tiny, 1] > 181)  # the aspect-2 anchors (width 128 sqrt(2))
    assert np.all(np.float32(80) - (anchors[tiny, 1] + anchors[tiny, 3]) / np.float32(2) == 0)  # (min + max) / 2

    # The box loss includes those two elements (Huber at delta 0.1 of outputs 0.05 against the targets).
    outputs = torch.full_like(targets.box_targets, 0.05)
    d = 0.05 - official.astype(np.float64)
    huber = np.where(np.abs(d) <= 0.1, 0.5 * d ** 2, 0.1 * np.abs(d) - 0.005)
    expected = huber[official != 0].sum()
    assert float(box_loss_sum(outputs, targets.box_targets)) == pytest.approx(expected, rel=1e-6)
    exact_zero = official != 0
    exact_zero[tiny, 1] = False  # the mask exact arithmetic (or a (min + max) / 2 centre) would give
    assert expected - huber[exact_zero].sum() == pytest.approx(2 * 0.5 * 0.05 ** 2, rel=1e-5)


def test_atss_threshold_mean_plus_unbiased_std():
    gt = [0, 0, 10, 10]
    # Three levels of two anchors and k = 2: all six are candidates. IoUs with the gt:
    #   [0,0,10,10] 1.0   [0,0,10,9] 0.9   [1,1,9,9] 0.64   [2,2,8,8] 0.36   [3,3,7,7] 0.16   [4,4,6,6] 0.04
    # mean = 3.1 / 6 = 0.516667; sum of squared deviations = 2.3764 - 6 * 0.516667^2 = 0.774733
    # unbiased std (torch .std(), as the ATSS reference) = sqrt(0.774733 / 5) = 0.393633 -> threshold 0.910300
    # (population std sqrt(0.774733 / 6) = 0.359336 would give 0.876003 and make the 0.9 anchor positive).
    anchors = [[0, 0, 10, 10], [0, 0, 10, 9], [1, 1, 9, 9], [2, 2, 8, 8], [3, 3, 7, 7], [4, 4, 6, 6]]
    t = assign(anchors, [gt], [8], method="atss", level_sizes=[2, 2, 2], atss_topk=2)
    assert t.cls_targets[0].tolist() == [8, -1, -1, -1, -1, -1]
    assert t.num_positives.item() == 1
    assert t.box_targets[0, 0].abs().max().item() < 1e-6  # anchor == gt: zero deltas


def test_atss_centre_must_be_inside_the_gt():
    gt = [0, 0, 10, 10]
    # One level of six anchors, all candidates. IoUs: edge 0.5, inner 0.49, four far anchors 0.
    # mean = 0.99 / 6 = 0.165; sum sq. dev. = 0.25 + 0.2401 - 6 * 0.165^2 = 0.32675
    # std = sqrt(0.32675 / 5) = 0.255636 -> threshold 0.420636: both pass the IoU test, but the centre of
    # "edge" is (5, 10), on the gt's right edge (distance 0 <= the 0.01 margin) -> not positive.
    edge, inner = [0, 0, 10, 20], [1.5, 1.5, 8.5, 8.5]
    far = [[40, 40, 50, 50], [40, 0, 50, 10], [0, 40, 10, 50], [-50, -50, -40, -40]]
    t = assign([edge, inner] + far, [gt], [2], method="atss", level_sizes=[6])
    assert t.cls_targets[0].tolist() == [-1, 2, -1, -1, -1, -1]


def test_atss_anchor_claimed_by_two_gts_goes_to_highest_iou_then_lowest_index():
    g0, g1 = [0, 0, 10, 10], [0, 2, 10, 12]
    x = [0, 1.5, 10, 11.5]  # IoU with g0 85/115 = 0.739, with g1 95/105 = 0.905 -> g1 despite its index
    tie = [0, 1, 10, 11]  # IoU 90/110 with both (bitwise equal) -> g0, the lower index
    far = [[40, 40, 50, 50], [40, 0, 50, 10], [0, 40, 10, 50], [-50, -50, -40, -40]]
    # Thresholds (all 6 anchors candidates): g0 0.662, g1 0.733, so both anchors are positive for both gts.
    t = assign([x, tie] + far, [g0, g1], [10, 11], method="atss", level_sizes=[6])
    assert t.cls_targets[0].tolist() == [11, 10, -1, -1, -1, -1]
    expected = BoxCoder().encode(torch.tensor(g1, dtype=torch.float32), torch.tensor(x, dtype=torch.float32))
    assert torch.allclose(t.box_targets[0, 0], expected)


def test_k_nearest_breaks_ties_by_lowest_index():
    dist = torch.tensor([[3.0, 1.0, 2.0, 1.0, 2.0, 2.0, 0.5]])
    # sorted by (value, index): 6 (0.5), 1, 3 (1.0), 2, 4, 5 (2.0), 0 -> k = 4 takes the first 2.0, index 2
    assert sorted(_k_nearest(dist, 4)[0].tolist()) == [1, 2, 3, 6]
    assert sorted(_k_nearest(dist, 2)[0].tolist()) == [1, 6]


def _reference_atss(anchors, level_sizes, boxes, classes, k=9):
    """Per-image, per-gt transcription of the ATSS reference (sfzhang15/ATSS prepare_targets, 'ATSS')."""
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    if boxes.shape[0] == 0:
        return torch.full((anchors.shape[0],), -1)
    iou = box_iou(boxes[:, None], anchors[None])  # [M, A]
    best = torch.full((anchors.shape[0],), -1.0)
    owner = torch.full((anchors.shape[0],), -1)
    for m in range(boxes.shape[0]):
        gc = (boxes[m, :2] + boxes[m, 2:]) / 2
        d = ((centres - gc) ** 2).sum(-1)
        cand, start = [], 0
        for n in level_sizes:
            order = torch.sort(d[start:start + n], stable=True).indices[:min(k, n)]
            cand.append(order + start)
            start += n
        cand = torch.cat(cand)
        thr = iou[m, cand].mean() + iou[m, cand].std()
        l_t = centres[cand] - boxes[m, :2]
        r_b = boxes[m, 2:] - centres[cand]
        inside = torch.cat([l_t, r_b], -1).min(-1).values > 0.01
        for a in cand[(iou[m, cand] >= thr) & inside].tolist():
            if iou[m, a] > best[a]:
                best[a], owner[a] = iou[m, a], m
    return torch.where(owner >= 0, classes[owner.clamp(min=0)], -1)


def test_atss_batch_equals_reference_per_image():
    generator = AnchorGenerator.from_config(get_config("efficientdet-d0"))
    assigner = TargetAssigner.from_generator(generator, (128, 128), method="atss")
    assert assigner.level_sizes == [16 * 16 * 9, 8 * 8 * 9, 4 * 4 * 9, 2 * 2 * 9, 9]
    boxes, classes = _random_batch(generator, 128, seed=1)
    t = assigner(boxes, classes)
    anchors = generator((128, 128))
    for b in range(boxes.shape[0]):
        valid = classes[b] >= 0
        expected = _reference_atss(anchors, assigner.level_sizes, boxes[b, valid], classes[b, valid])
        assert torch.equal(t.cls_targets[b], expected)
    assert t.num_positives.item() == (t.cls_targets >= 0).sum().item() > 0


def test_assigner_argument_errors():
    anchors = torch.zeros(6, 4)
    with pytest.raises(ValueError, match="unknown assignment method"):
        TargetAssigner(anchors, method="maxiou")
    with pytest.raises(ValueError, match="needs level_sizes"):
        TargetAssigner(anchors, method="atss")
    with pytest.raises(ValueError, match="sum to 5"):
        TargetAssigner(anchors, level_sizes=[3, 2])
