"""Test-time augmentation: the detector run on flipped and rescaled copies of each image, the passes fused by
weighted boxes fusion (`eval.wbf`), as the official TTA evaluation (`keras/eval.py --enable_tta`) does.

Official procedure, kept: every pass is the whole eval pipeline at its input size (the image resized from the
original with the eval preprocessing, network, post-processing to original pixels); a flipped pass mirrors
the *padded network input* (`tf.image.flip_left_right(images)`) and maps its boxes back with
`x -> image_scale * input_width - x` (left and right edges swapped); each image's rows of all passes are
concatenated, the pass run last first (the official loop prepends each new pass), and fused with
`num_models` = the number of passes.
Ours: the official sizes are the base size + 0 / 128 / 256 px; here they are 0.8x / 1x / 1.2x of the
network input size, each side rounded to a multiple of the variant's size divisor (`scaled_size`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import Dataset

from data.bad_images import BadImage
from data.coco import collate_detection
from data.transforms import preprocess_for_eval
from eval.wbf import fuse_detections
from model.postprocess import Detections

TTA_CHOICES = ("flip", "scales", "flip+scales")
SCALE_FACTORS = (0.8, 1.0, 1.2)


@dataclass(frozen=True)
class Pass:
    """One detector pass: network input size (H, W) and whether the input is mirrored left-right."""
    size: tuple[int, int]
    flip: bool


def scaled_size(base_hw: tuple[int, int], factor: float, divisor: int) -> tuple[int, int]:
    """`base_hw` itself for factor 1, else `factor` x `base_hw` with each side rounded to the nearest multiple
    of `divisor` (halves up, at least one multiple): exact 2x pyramids. A side that lands back on
    its base size is moved one multiple further (0.8x of 256 at divisor 128 is 128, 1.2x is 384), so every
    scale is a pass of its own."""
    def side(base: int) -> int:
        rounded = max(divisor, math.floor(base * factor / divisor + 0.5) * divisor)
        if rounded == base:
            rounded = max(divisor, base + (divisor if factor > 1 else -divisor))
        return rounded
    return tuple(base_hw) if factor == 1 else (side(base_hw[0]), side(base_hw[1]))


def tta_passes(name: str, base_hw: tuple[int, int], divisor: int) -> list[Pass]:
    """The passes of `--tta name`, in the official order (size by size, unflipped then flipped); a size that
    comes out twice (an input of one divisor cannot shrink) is run once."""
    if name not in TTA_CHOICES:
        raise ValueError(f"--tta {name}: expected one of {', '.join(TTA_CHOICES)}")
    factors = SCALE_FACTORS if "scales" in name else (1.0,)
    sizes = list(dict.fromkeys(scaled_size(base_hw, f, divisor) for f in factors))
    flips = (False, True) if "flip" in name else (False,)
    return [Pass(size, flip) for size in sizes for flip in flips]


def unflip(dets: Detections, width: int, scales: torch.Tensor) -> Detections:
    """Boxes of a mirrored pass back on the image: x -> scale * width - x per image (official
    `generate_detections(flip=True)`), yxyx `[N, D, 4]`, scales `[N]` original px per network px."""
    edge = (scales.to(dets.boxes) * width)[:, None]
    boxes = torch.stack([dets.boxes[..., 0], edge - dets.boxes[..., 3], dets.boxes[..., 2],
                         edge - dets.boxes[..., 1]], -1)
    return Detections(boxes, dets.scores, dets.classes, dets.num_valid)


class TestTimeAugmentation:
    """`__call__(detect, images, scales, originals) -> Detections`: the detections of `passes` fused by WBF
    (`from_name`: the passes of `--tta NAME`).

    detect: `(images [B, 3, H, W], scales [B]) -> Detections` at any valid size (`Detector._detect`).
    images `[N, 3, S_h, S_w]`, scales `[N]`: the eval preprocessing at the base size (used as they are for
    the passes at that size); originals: the N RGB uint8 `[H0, W0, 3]` images, needed for the other sizes.
    Flipped and unflipped copies of a size go through the network as one batch of 2N.
    Returns one row per fused box (more than 100 rows are possible: the official fusion keeps every cluster).
    """

    __test__ = False  # not a pytest class, despite its name

    def __init__(self, passes: list[Pass], base_hw: tuple[int, int], mean_rgb, stddev_rgb, name: str = "passes"):
        self.passes, self.base_hw, self.name = list(passes), tuple(base_hw), name
        self.normalization = {"mean_rgb": mean_rgb, "stddev_rgb": stddev_rgb}

    @classmethod
    def from_name(cls, name: str, base_hw: tuple[int, int], divisor: int, mean_rgb,
                  stddev_rgb) -> "TestTimeAugmentation":
        return cls(tta_passes(name, tuple(base_hw), divisor), base_hw, mean_rgb, stddev_rgb, name)

    @property
    def needs_originals(self) -> bool:
        return any(p.size != self.base_hw for p in self.passes)

    def __call__(self, detect: Callable, images: torch.Tensor, scales: torch.Tensor,
                 originals: list | None = None) -> Detections:
        if self.needs_originals and (originals is None or len(originals) != len(images)):
            raise ValueError(f"--tta {self.name}: the detector needs the {len(images)} original image(s) to resize "
                             f"them for each scale (got {'none' if originals is None else len(originals)})")
        results: dict[Pass, Detections] = {}
        for size in dict.fromkeys(p.size for p in self.passes):
            x, s = images, scales
            if size != self.base_hw:
                pre = [preprocess_for_eval(o, size, **self.normalization) for o in originals]
                x = torch.stack([t for t, _ in pre]).to(images.device)
                s = torch.tensor([v for _, v in pre], dtype=torch.float32, device=scales.device)
            flipped = Pass(size, True) in self.passes
            dets = detect(torch.cat([x, x.flip(-1)]) if flipped else x, torch.cat([s, s]) if flipped else s)
            n = len(x)
            results[Pass(size, False)] = _rows(dets, slice(0, n))
            if flipped:
                results[Pass(size, True)] = unflip(_rows(dets, slice(n, 2 * n)), size[1], s)
        if len(self.passes) == 1:  # nothing to fuse
            return results[self.passes[0]]
        ordered = [results[p] for p in reversed(self.passes)]  # the official concatenation: last pass first
        valid = torch.cat([torch.arange(d.scores.shape[1], device=d.scores.device) < d.num_valid[:, None]
                           for d in ordered], 1)
        return fuse_detections(torch.cat([d.boxes for d in ordered], 1), torch.cat([d.scores for d in ordered], 1),
                               torch.cat([d.classes for d in ordered], 1), valid, len(self.passes))


def _rows(dets: Detections, images: slice) -> Detections:
    return Detections(dets.boxes[images], dets.scores[images], dets.classes[images], dets.num_valid[images])


class WithOriginals(Dataset):
    """An evaluation dataset (`data.coco.CocoDetection`, train=False) whose items also carry the decoded
    image, for the scales of TTA: `(item, array [H0, W0, 3] uint8)`, or the item when it is a `BadImage`.
    The image is read a second time (`load_image`), far cheaper than the extra network passes."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return item if isinstance(item, BadImage) else (item, self.dataset.load_image(index))


def collate_with_originals(batch: list) -> tuple[torch.Tensor | None, dict]:
    """`collate_detection` of `WithOriginals` items, plus targets["originals"]: the arrays of the images kept."""
    images, targets = collate_detection([b if isinstance(b, BadImage) else b[0] for b in batch])
    targets["originals"] = [b[1] for b in batch if not isinstance(b, BadImage)]
    return images, targets
