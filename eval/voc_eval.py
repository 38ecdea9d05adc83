"""The Pascal VOC detection metric, computed as the VOC devkit's MATLAB code does.

Per class, over the evaluated images (`VOCevaldet.m`):
* detections sorted by decreasing score (MATLAB's `sort` is stable: ties keep the order given);
* each detection goes to the ground-truth box of its image it overlaps most (IoU with the devkit's `+1`
  pixel convention: a box `xmin..xmax` is `xmax - xmin + 1` wide; the first box wins a tie), over every box of
  the class, already matched or difficult included;
* `IoU >= 0.5` (`ovmax >= VOCopts.minoverlap`, not `>`): on a difficult box it is ignored (neither true nor
  false positive, whether or not that box was detected before); on a box not yet detected a true positive,
  which marks it detected; on one already detected a false positive (a duplicate). Below 0.5: false positive;
* recall = TP / (non-difficult boxes), precision = TP / (TP + FP), cumulated in score order (0 while only
  ignored detections have come: the devkit's 0/0 is NaN, which its `max` skips, so the APs agree, except
  when every detection of a class is ignored: the devkit's 11-point AP is then NaN, here 0);
* AP, VOC2010+ (`VOCap.m`): the area under the precision envelope (precision made monotone from the right)
  at each recall where recall changes, with end points (0, 0) and (1, 0) added;
* AP, VOC2007 11-point: the mean over t in MATLAB's `0:0.1:1` of the highest precision at recall >= t (0 if
  none). MATLAB's colon computes the first half of a range as `a + k*d` and the second half as
  `b - (n-k)*d`, so its t = 0.6 and 0.7 are the doubles nearest 0.6 and 0.7, while 0.3 is `3 * 0.1` =
  0.30000000000000004. (`numpy.arange(0, 1.1, 0.1)`, used by py-faster-rcnn's `voc_eval.py` and its copies,
  gives 0.6000000000000001 and 0.7000000000000001 instead: a recall of exactly 3/5 or 7/10 counts there in
  the devkit, not in those ports.)
mAP is the mean AP over the classes with at least one non-difficult box (the devkit would give NaN / 0 for a
class without any; VOC itself has none such).

Boxes here are COCO `[x, y, w, h]` in continuous pixels (`data.voc`: `[xmin - 1, xmax)`), turned back into
the devkit's 1-based inclusive `xmin = x + 1, xmax = x + w`: the devkit's `+1` IoU of those equals the
continuous IoU of the COCO boxes.
"""
from __future__ import annotations

import numpy as np
from pycocotools.coco import COCO

MIN_OVERLAP = 0.5  # VOCopts.minoverlap
THRESHOLDS_2007 = tuple([k * 0.1 for k in range(6)] + [1 - k * 0.1 for k in range(4, -1, -1)])  # MATLAB 0:0.1:1


def devkit_box(bbox) -> tuple[float, float, float, float]:
    """COCO `[x, y, w, h]` (continuous px) -> the devkit's `(xmin, ymin, xmax, ymax)` (1-based, inclusive)."""
    x, y, w, h = (float(v) for v in bbox)
    return x + 1, y + 1, x + w, y + h


def overlaps(box, boxes: np.ndarray) -> np.ndarray:
    """Devkit IoU of `box` with each of `boxes [K, 4]`; -inf where they do not intersect (`iw > 0 & ih > 0`
    fails), as the devkit leaves those out of its maximum."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]) + 1
    ih = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]) + 1
    union = ((box[2] - box[0] + 1) * (box[3] - box[1] + 1)
             + (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1) - iw * ih)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((iw > 0) & (ih > 0), iw * ih / union, -np.inf)


def match(detections: list[tuple], ground_truth: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """`(tp, fp, npos)` of one class: tp / fp `[D]` 0/1 in decreasing score order, npos the non-difficult boxes.

    detections: `(image_id, score, devkit box)`; ground_truth: image_id -> `(boxes [K, 4] devkit, difficult [K])`
    for every evaluated image (a detection on another image is an error, as in the devkit).
    """
    npos = int(sum((~np.asarray(d, dtype=bool)).sum() for _, d in ground_truth.values()))
    detected = {image: np.zeros(len(d), dtype=bool) for image, (_, d) in ground_truth.items()}
    order = np.argsort(-np.array([s for _, s, _ in detections], dtype=np.float64), kind="stable")
    tp, fp = np.zeros(len(detections)), np.zeros(len(detections))
    for rank, index in enumerate(order):
        image, _, box = detections[index]
        if image not in ground_truth:
            raise ValueError(f"VOC metric: a detection on image {image}, which is not an evaluated image")
        boxes, difficult = ground_truth[image]
        iou = overlaps(box, boxes)
        j = int(np.argmax(iou)) if len(iou) else -1  # the first maximum, as the devkit's `ov > ovmax`
        if j < 0 or iou[j] < MIN_OVERLAP:
            fp[rank] = 1
        elif not difficult[j]:
            if detected[image][j]:
                fp[rank] = 1
            else:
                tp[rank], detected[image][j] = 1, True
    return tp, fp, npos


def precision_recall(tp: np.ndarray, fp: np.ndarray, npos: int) -> tuple[np.ndarray, np.ndarray]:
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    return tp / npos, tp / np.maximum(tp + fp, np.finfo(np.float64).tiny)


def ap_2010(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2010+ AP (`VOCap.m`)."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # mpre(i) = max(mpre(i), mpre(i+1)), from the right
    i = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))


def ap_2007(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007 11-point AP (`VOCevaldet.m` of the 2007 devkit), summed in its order."""
    ap = 0.0
    for t in THRESHOLDS_2007:
        above = precision[recall >= t]
        ap += (float(above.max()) if above.size else 0.0) / 11
    return ap


def reports_voc_metric(coco: COCO) -> bool:
    """True for a dataset read from VOC (or converted from it): its `info` says `format: voc`."""
    info = coco.dataset.get("info")
    return isinstance(info, dict) and info.get("format") == "voc"


def evaluate_voc(coco: COCO, results: list[dict], image_ids: list[int] | None = None) -> dict:
    """VOC metric of COCO-format `results` on `image_ids` (default: all) of `coco`, whose annotations mark
    difficult objects with `difficult: 1` (else `iscrowd: 1`). Returns `{"mAP", "mAP_07", "classes": {name:
    {"AP", "AP_07", "objects", "difficult", "detections"}}}`; AP None for a class with no non-difficult box."""
    image_ids = sorted(coco.getImgIds() if image_ids is None else image_ids)
    wanted = set(image_ids)
    classes = {}
    for category in sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"]):
        ground_truth = {}
        for image in image_ids:
            anns = [a for a in coco.imgToAnns.get(image, ()) if a["category_id"] == category["id"]]
            ground_truth[image] = (np.array([devkit_box(a["bbox"]) for a in anns]).reshape(-1, 4),
                                   np.array([bool(a.get("difficult", a.get("iscrowd", 0))) for a in anns], bool))
        detections = [(r["image_id"], r["score"], devkit_box(r["bbox"])) for r in results
                      if r["category_id"] == category["id"] and r["image_id"] in wanted]
        tp, fp, npos = match(detections, ground_truth)
        entry = {"AP": None, "AP_07": None, "objects": npos, "detections": len(detections),
                 "difficult": int(sum(d.sum() for _, d in ground_truth.values()))}
        if npos:
            recall, precision = precision_recall(tp, fp, npos)
            entry.update(AP=ap_2010(recall, precision), AP_07=ap_2007(recall, precision))
        classes[category["name"]] = entry
    scored = [c for c in classes.values() if c["AP"] is not None]
    mean = (lambda key: float(np.mean([c[key] for c in scored])) if scored else 0.0)
    return {"mAP": mean("AP"), "mAP_07": mean("AP_07"), "classes": classes}


def format_voc(stats: dict) -> str:
    """Per-class AP@0.5 (VOC2007 11-point and VOC2010+ all-point) and the means, as a table."""
    lines = [f"{'VOC AP@0.5':<20} {'objects':>8} {'11-point':>9} {'all-point':>9}"]
    for name, c in stats["classes"].items():
        aps = ("-", "-") if c["AP"] is None else (f"{c['AP_07']:.4f}", f"{c['AP']:.4f}")
        lines.append(f"{name:<20} {c['objects']:>8} {aps[0]:>9} {aps[1]:>9}")
    lines.append(f"{'mAP':<20} {'':>8} {stats['mAP_07']:>9.4f} {stats['mAP']:>9.4f}")
    return "\n".join(lines)
