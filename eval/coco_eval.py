"""COCO evaluation with pycocotools: detections -> COCO results json -> the 12 standard numbers."""
from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from model.postprocess import Detections

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
_STAT_LABELS = (
    "AP @[IoU=0.50:0.95 | area=all | maxDets=100]", "AP @[IoU=0.50 | area=all | maxDets=100]",
    "AP @[IoU=0.75 | area=all | maxDets=100]", "AP @[IoU=0.50:0.95 | area=small | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area=medium | maxDets=100]", "AP @[IoU=0.50:0.95 | area=large | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=all | maxDets=1]", "AR @[IoU=0.50:0.95 | area=all | maxDets=10]",
    "AR @[IoU=0.50:0.95 | area=all | maxDets=100]", "AR @[IoU=0.50:0.95 | area=small | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=medium | maxDets=100]", "AR @[IoU=0.50:0.95 | area=large | maxDets=100]",
)


def detections_to_coco(dets: Detections, image_ids: list[int], category_ids: list[int]) -> list[dict]:
    """COCO results entries `{"image_id", "category_id", "bbox": [x, y, w, h], "score"}` of a batch.

    `category_ids[c]` is the dataset category id of class index c; detections of classes without one (unused
    ids of the 90-id COCO space) are left out, as COCOeval would ignore them. Boxes are converted from yxyx.
    """
    boxes, scores, classes = dets.boxes.cpu().numpy(), dets.scores.cpu().numpy(), dets.classes.cpu().numpy()
    results = []
    for i, image_id in enumerate(image_ids):
        for j in range(int(dets.num_valid[i])):
            category = category_ids[int(classes[i, j])]
            if category is None:
                continue
            ymin, xmin, ymax, xmax = (float(v) for v in boxes[i, j])
            results.append({"image_id": int(image_id), "category_id": int(category),
                            "bbox": [round(xmin, 3), round(ymin, 3), round(xmax - xmin, 3), round(ymax - ymin, 3)],
                            "score": round(float(scores[i, j]), 5)})
    return results


def evaluate_coco(coco_gt: COCO, results: list[dict], image_ids: list[int] | None = None,
                  verbose: bool = False) -> dict[str, float]:
    """The 12 COCO bbox numbers of `results` on `image_ids` (default: every image of `coco_gt`).

    No detections at all gives zeros (pycocotools itself cannot load an empty result list).
    """
    if not results:
        return {name: 0.0 for name in STAT_NAMES}
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # pycocotools reports -1 where a category of areas has no ground truth: keep it, it is meaningful.
    return {name: float(v) for name, v in zip(STAT_NAMES, np.asarray(evaluator.stats))}


def format_stats(stats: dict[str, float]) -> str:
    """The 12 numbers as a table, in pycocotools' order and wording."""
    return "\n".join(f"{name:<6} {label:<52} {stats[name]:7.4f}" for name, label in zip(STAT_NAMES, _STAT_LABELS))
