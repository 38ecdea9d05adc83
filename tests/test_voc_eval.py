"""The VOC metric (eval/voc_eval.py) on hand-computed cases, and where pycocotools' crowd rule agrees with VOC's
`difficult` and where it does not.

Boxes are written in the devkit's 1-based inclusive pixels `(xmin, ymin, xmax, ymax)`; a 10 x 10 box is
`(1, 1, 10, 10)` (the devkit's width `xmax - xmin + 1`), which is COCO `[0, 0, 10, 10]`.
"""
import numpy as np
import pytest
from pycocotools.coco import COCO

from eval.coco_eval import evaluate_coco
from eval.voc_eval import (THRESHOLDS_2007, ap_2007, ap_2010, devkit_box, evaluate_voc, match, overlaps,
                           precision_recall)


def _aps(detections, boxes, difficult):
    """(AP 2010+, AP 2007 11-point, tp, fp) of one class on one image (id 1)."""
    tp, fp, npos = match([(1, score, box) for score, box in detections],
                         {1: (np.array(boxes, dtype=float), np.array(difficult, dtype=bool))})
    recall, precision = precision_recall(tp, fp, npos)
    return ap_2010(recall, precision), ap_2007(recall, precision), tp.tolist(), fp.tolist()


def test_true_duplicate_difficult_and_missed_detections():
    """Ground truth G1 (1,1,10,10), G2 (21,1,30,10), G3 (41,1,50,10) difficult: npos = 2.

    score  box           outcome
    0.9    G1            TP (IoU 1)
    0.8    G1 again      FP (duplicate)
    0.7    G3            ignored (difficult): neither TP nor FP
    0.6    (71,1,80,10)  FP (overlaps nothing)
    0.5    G2            TP
    Cumulated over the 4 counted: TP 1 1 1 2, FP 0 1 2 2 -> recall .5 .5 .5 1, precision 1 .5 1/3 .5.
    2010+: envelope from the right 1 .5 .5 .5; recall steps 0 -> .5 (precision 1) and .5 -> 1 (.5):
        AP = .5 * 1 + .5 * .5 = .75.
    2007: t = 0 .. 0.5 (6 points): max precision at recall >= t is 1; t = 0.6 .. 1 (5 points): .5;
        AP = (6 + 2.5) / 11 = 0.772727...
    """
    g1, g2, g3 = (1, 1, 10, 10), (21, 1, 30, 10), (41, 1, 50, 10)
    ap, ap07, tp, fp = _aps([(0.9, g1), (0.8, g1), (0.7, g3), (0.6, (71, 1, 80, 10)), (0.5, g2)],
                            [g1, g2, g3], [False, False, True])
    assert tp == [1, 0, 0, 0, 1] and fp == [0, 1, 0, 1, 0]
    assert ap == pytest.approx(0.75, abs=1e-12) and ap07 == pytest.approx(8.5 / 11, abs=1e-12)


def test_iou_is_at_least_one_half_with_the_plus_one_pixel_convention():
    """Detection (1,1,10,5) on G (1,1,10,10): the devkit's areas are 10 x 5 = 50 and 10 x 10 = 100, IoU
    50 / 100 = 0.5 exactly, a TP because the devkit tests `ovmax >= 0.5`. Without the +1 (9 x 4 / 9 x 9 =
    0.444) or with `> 0.5` it would be a miss: AP 1 here, 0 there."""
    assert overlaps((1, 1, 10, 5), np.array([[1, 1, 10, 10]]))[0] == 0.5
    assert _aps([(0.9, (1, 1, 10, 5))], [(1, 1, 10, 10)], [False])[:2] == (1.0, pytest.approx(1.0))
    assert overlaps((1, 1, 10, 10), np.array([[11, 1, 20, 10]]))[0] == -np.inf  # touching only: no overlap


def test_a_detection_goes_to_its_best_box_even_if_already_detected():
    """G1 (1,1,10,10), G2 (3,1,12,10). d1 = G1 (TP). d2 = (1,1,11,10): IoU with G1 100 / 110 = .909, with G2
    90 / 120 = .75; the devkit takes the best, G1, already detected: FP (a free G2 at .75 does not help).
    recall .5 .5, precision 1 .5 -> 2010+: .5 * 1 + .5 * 0 = .5; 2007: 6 points of 1 -> 6 / 11."""
    ap, ap07, tp, fp = _aps([(0.9, (1, 1, 10, 10)), (0.8, (1, 1, 11, 10))], [(1, 1, 10, 10), (3, 1, 12, 10)],
                            [False, False])
    assert tp == [1, 0] and fp == [0, 1]
    assert ap == pytest.approx(0.5) and ap07 == pytest.approx(6 / 11)


def test_ties_keep_the_given_order_as_matlab_sort_does():
    """One box G; two detections of score .5, the miss listed first. Stable order: FP then TP, recall 0 1,
    precision 0 .5 -> 2010+ AP .5 (it would be 1 with the TP first)."""
    g = (1, 1, 10, 10)
    assert _aps([(0.5, (51, 51, 60, 60)), (0.5, g)], [g], [False])[0] == pytest.approx(0.5)
    assert _aps([(0.5, g), (0.5, (51, 51, 60, 60))], [g], [False])[0] == pytest.approx(1.0)


def test_eleven_points_are_matlab_colon_values():
    """5 boxes, 3 found first then 2 misses: recall .2 .4 .6 .6 .6 (3/5 = the double nearest 0.6), precision
    1 1 1 .75 .6. MATLAB's 0:0.1:1 has t(7) = 1 - 4 * 0.1 = that same double, so t = 0.6 counts precision 1:
    AP 2007 = 7 / 11 (numpy.arange's 0.6000000000000001 would miss it: 6 / 11). 2010+: .2 + .2 + .2 + .4 * 0
    = 0.6. Also t(4) = 3 * 0.1 = 0.30000000000000004 > 0.3 in MATLAB as in numpy."""
    boxes = [(1 + 20 * k, 1, 10 + 20 * k, 10) for k in range(5)]
    far = (200, 200, 210, 210)
    ap, ap07, _, _ = _aps([(0.9, boxes[0]), (0.8, boxes[1]), (0.7, boxes[2]), (0.6, far), (0.5, far)],
                          boxes, [False] * 5)
    assert THRESHOLDS_2007[6] == 3 / 5 and THRESHOLDS_2007[7] == 7 / 10 and THRESHOLDS_2007[3] > 0.3
    assert ap07 == pytest.approx(7 / 11, abs=1e-12) and ap == pytest.approx(0.6, abs=1e-12)


def _coco(boxes, crowd):
    """A one-image, one-class COCO of `boxes` (devkit coordinates) with `difficult` = `iscrowd` = `crowd`."""
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "width": 300, "height": 300, "file_name": "a.jpg"}],
                    "categories": [{"id": 1, "name": "thing"}],
                    "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "iscrowd": int(c),
                                     "difficult": int(c),
                                     "bbox": [b[0] - 1, b[1] - 1, b[2] - b[0] + 1, b[3] - b[1] + 1],
                                     "area": (b[2] - b[0] + 1) * (b[3] - b[1] + 1)}
                                    for k, (b, c) in enumerate(zip(boxes, crowd))]}
    coco.createIndex()
    return coco


def _both(coco, detections):
    """(VOC 2010+ AP, pycocotools AP@0.5) of `(score, devkit box)` detections."""
    results = [{"image_id": 1, "category_id": 1, "score": s, "bbox": [b[0] - 1, b[1] - 1, b[2] - b[0] + 1,
                                                                       b[3] - b[1] + 1]} for s, b in detections]
    assert [devkit_box(r["bbox"]) for r in results] == [tuple(map(float, b)) for _, b in detections]
    return evaluate_voc(coco, results)["mAP"], evaluate_coco(coco, results)["AP50"]


def test_pycocotools_crowd_agrees_with_voc_difficult_on_a_detection_of_the_box_itself():
    """G normal (1,1,10,10), D difficult (51,1,60,10). The detection of D comes first (score .9): counted as
    an FP it would make AP .5; both VOC (difficult) and pycocotools (crowd) ignore it: AP 1."""
    coco = _coco([(1, 1, 10, 10), (51, 1, 60, 10)], [False, True])
    assert _both(coco, [(0.9, (51, 1, 60, 10)), (0.8, (1, 1, 10, 10))]) == (pytest.approx(1.0), pytest.approx(1.0))


def test_where_pycocotools_crowd_and_voc_difficult_differ():
    """1. A small detection inside a large difficult box: pycocotools' crowd IoU is intersection / detection
    area (= 1), so it is ignored (AP 1); the devkit's IoU is 400 / 10000 = .04, an FP first (AP .5).
    2. The duplicate case of `test_a_detection_goes_to_its_best_box_even_if_already_detected`: pycocotools
    gives the second detection to the free box (AP 1), the devkit counts it FP (AP .5)."""
    coco = _coco([(1, 1, 100, 100), (201, 201, 210, 210)], [True, False])
    assert _both(coco, [(0.9, (1, 1, 20, 20)), (0.8, (201, 201, 210, 210))]) == (pytest.approx(0.5),
                                                                                 pytest.approx(1.0))
    coco = _coco([(1, 1, 10, 10), (3, 1, 12, 10)], [False, False])
    voc, ap50 = _both(coco, [(0.9, (1, 1, 10, 10)), (0.8, (1, 1, 11, 10))])
    assert voc == pytest.approx(0.5) and ap50 == pytest.approx(1.0)


def test_classes_without_ground_truth_are_left_out_of_the_mean():
    coco = _coco([(1, 1, 10, 10)], [False])
    coco.dataset["categories"].append({"id": 2, "name": "absent"})
    coco.createIndex()
    stats = evaluate_voc(coco, [{"image_id": 1, "category_id": 2, "score": 0.9, "bbox": [0, 0, 10, 10]}])
    assert stats["classes"]["absent"] == {"AP": None, "AP_07": None, "objects": 0, "detections": 1, "difficult": 0}
    assert stats["classes"]["thing"]["AP"] == 0.0 and stats["mAP"] == 0.0 and stats["mAP_07"] == 0.0
