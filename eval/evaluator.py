"""Running a detector over a dataset: batched forward + official post-processing, COCO results, metrics.

Shared by `-mode eval` and the per-epoch validation of `-mode trainval` (which shards images over DDP ranks).
"""
from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from data.bad_images import BadImage, BadImageBudget, BadImageLimit
from data.coco import CocoDetection, collate_detection
from eval.coco_eval import detections_to_coco, evaluate_coco
from eval.tta import TestTimeAugmentation, WithOriginals, collate_with_originals
from model import AnchorGenerator, EfficientDet
from model.config import parse_image_size
from model.inference import check_finite, prepare_for_inference
from model.postprocess import Detections, postprocess
from utils.threads import torch_threads


class Detector(nn.Module):
    """Model + anchors + post-processing: `forward(images [N, 3, S_h, S_w], scales [N]) -> Detections`.

    image_size: the network input size, S or (S_h, S_w).

    mode "eval" (official COCO path, per-class NMS over the top-5000) or "infer" (best class per anchor,
    class-agnostic NMS, boxes clipped); nms "soft" (official gaussian) or "hard" (IoU 0.5). The network runs
    as `prepare_for_inference` makes it (BN folded, fused kernels, `precision` "fp32"/"bf16"/"fp16",
    optionally `torch.compile`d), or as `network` runs it when given: any callable `images -> (cls_outs,
    box_outs)` with the plain model's layouts, e.g. an exported model on another engine (`deploy.backends`);
    post-processing always runs in float32. Non-finite network outputs are a RuntimeError (`check_finite`).

    tta "flip" | "scales" | "flip+scales" (`eval.tta`): each image also goes through the network mirrored
    and/or at 0.8x / 1.2x, the passes fused by weighted boxes fusion; `forward` then needs `originals` (the
    decoded RGB uint8 images) for the scales. An exported network (not a torch module) runs one input size:
    with it, only "flip".
    """

    def __init__(self, model: EfficientDet, image_size: int | tuple[int, int], mode: str = "eval", nms: str = "soft",
                 precision: str = "fp32", compile: bool = False, network=None, tta: str | None = None):
        super().__init__()
        self.image_size = parse_image_size(image_size)
        self.model = network if network is not None else prepare_for_inference(model, precision, compile=compile)
        self.engine = not isinstance(self.model, nn.Module)  # an engine's export, on the engine's own threads
        self.mode, self.nms, self.precision = mode, nms, precision
        self.anchors = AnchorGenerator.from_config(model.config)
        self.tta = TestTimeAugmentation.from_name(tta, self.image_size, model.config.size_divisor,
                                                  model.config.mean_rgb, model.config.stddev_rgb) if tta else None
        if self.tta and self.tta.needs_originals and self.engine:
            raise ValueError(f"--tta {tta}: an exported network runs {self.image_size[0]}x{self.image_size[1]} "
                             f"(HxW) inputs only; use --tta flip, or --backend torch")

    @torch.no_grad()
    def forward(self, images: torch.Tensor, scales: torch.Tensor, originals: list | None = None) -> Detections:
        """images `[N, 3, S_h, S_w]` and scales `[N]` from the eval preprocessing at `image_size`; originals:
        the N decoded images, only needed (and used) by a TTA with scales."""
        # Beside an engine, torch's part runs on one thread, so that no idle torch thread spins against the
        # engine's next call (`utils.threads`).
        with torch_threads(1 if self.engine else None):
            if self.tta:
                return self.tta(self._detect, images, scales, originals)
            return self._detect(images, scales)

    def _detect(self, images: torch.Tensor, scales: torch.Tensor) -> Detections:
        """One pass at the images' own size (TTA runs other sizes through it)."""
        cls_outs, box_outs = self.model(images)
        check_finite(cls_outs, box_outs, self.precision)  # an overflow must not pass for "no objects"
        size = tuple(images.shape[-2:])
        anchors = self.anchors(size, images.device)
        return postprocess(cls_outs, box_outs, anchors, scales, size, self.mode, self.nms)


def run_detection(detector: Detector, dataset: CocoDetection, batch_size: int, workers: int,
                  device: torch.device, max_images: int | None = None, rank: int = 0, world_size: int = 1,
                  progress: bool = True, bad_images: BadImageBudget | None = None
                  ) -> tuple[list[dict], dict, list[BadImage]]:
    """Detect on (this rank's share of) the first `max_images` images of an evaluation `dataset`.

    Returns COCO results (category ids of the dataset), stats (images read, failed, seconds, img/s) and the
    images that could not be read. Each failure is passed to `bad_images` as it happens (which says so, and
    raises once their count passes its limit).
    """
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    tta = getattr(detector, "tta", None)  # any detector module may be run; only ours has a TTA
    originals = bool(tta) and tta.needs_originals  # TTA scales resize the decoded images
    subset = Subset(WithOriginals(dataset) if originals else dataset, list(range(rank, count, world_size)))
    loader = DataLoader(subset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                        collate_fn=collate_with_originals if originals else collate_detection)
    results, images_done, failures = [], 0, []
    start = time.perf_counter()
    # `with`: an error mid-run clears the bar first, so its message stands on a line of its own
    with tqdm(total=len(subset), desc="detect", unit="img", disable=not progress, dynamic_ncols=True,
              leave=False) as bar:
        for images, targets in loader:
            failures += targets["failures"]
            if bad_images is not None:
                bad_images.add(targets["failures"])
            if images is None:  # every image of the batch failed
                bar.update(targets["num_failed"])
                continue
            scales = torch.tensor(targets["scales"], dtype=torch.float32, device=device)
            extra = (targets["originals"],) if originals else ()
            dets = detector(images.to(device, non_blocking=True), scales, *extra)
            results += detections_to_coco(dets, targets["image_ids"].tolist(), dataset.class_to_category)
            images_done += len(images)
            bar.update(len(images) + targets["num_failed"])
            bar.set_postfix(img_s=f"{images_done / (time.perf_counter() - start):.1f}", dets=len(results))
    seconds = time.perf_counter() - start
    return results, {"images": images_done, "failed": len(failures), "seconds": seconds,
                     "img_per_s": images_done / max(seconds, 1e-9)}, failures


def readable_image_ids(dataset: CocoDetection, count: int, failures: list[BadImage]) -> list[int]:
    """The ids of the first `count` images of `dataset` minus those that could not be read: the COCO metrics
    are computed over the images the detector saw."""
    failed = {bad.image_id for bad in failures}
    return [i for i in dataset.image_ids[:count] if i not in failed]


def evaluate(detector: Detector, dataset: CocoDetection, batch_size: int, workers: int, device: torch.device,
             max_images: int | None = None, progress: bool = True,
             max_bad_images: BadImageLimit = BadImageLimit(percent=1.0)) -> tuple[dict, list[dict], dict]:
    """Single-process evaluation: `(coco_stats, results, run_stats)` on the first `max_images` images.

    Unreadable images are skipped and counted (RuntimeError as soon as there are more than `max_bad_images`);
    the metrics are over the images that were read, whose ids are `run_stats["image_ids"]`.
    """
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    budget = BadImageBudget(max_bad_images, count, f"evaluation on {dataset.image_dir}", speak=progress)
    results, run_stats, failures = run_detection(detector, dataset, batch_size, workers, device, max_images,
                                                 progress=progress, bad_images=budget)
    image_ids = readable_image_ids(dataset, count, failures)
    return evaluate_coco(dataset.coco, results, image_ids), results, {**run_stats, "image_ids": image_ids}
