"""Per-image cost of `--autoaugment` in the training data pipeline; prints two tables.

    python benchmarks/augment.py [--size 512] [--images 48] [--rounds 5] [--malloc reuse|system] [--clock cpu|wall]

Pipeline per image, as a DataLoader worker runs it (one thread): read and decode a JPEG
(`data.image_io.read_rgb`), then `TrainTransform(size, autoaugment=...)` (policy, normalise, flip, scale
jitter 0.1-2.0, resize, crop) with the item's seeded generator. Images: synthetic textured 4:3-ish JPEGs
of COCO-like sizes (sides 360-640 px) with 1-12 boxes each, written once to a temporary folder.

Clock: `cpu` (default) times the thread's CPU time (`time.thread_time`), what a DataLoader worker spends on
the image, unaffected by other processes taking turns on the cores; `wall` times elapsed time, the same on a
quiet machine.

Table 1: per setting, median and mean ms per image over images x rounds (settings interleaved image by
image), and the mean relative to no augmentation (the policies draw a random sub-policy per image, so the
mean is the throughput cost). Table 2: median ms of each op alone at level 10 on the same images.

Its tables live in docs/speed.md (AutoAugment in the data pipeline).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import autoaugment as aa  # noqa: E402
from data.image_io import read_rgb  # noqa: E402
from data.transforms import TrainTransform  # noqa: E402
from utils.allocator import reuse_freed_memory  # noqa: E402
from model.cpu import cpu_name  # noqa: E402


def make_images(folder: Path, count: int, seed: int = 0) -> list[tuple[Path, np.ndarray]]:
    """`count` JPEGs with smooth colour gradients, noise and rectangles; returns (path, boxes yxyx px)."""
    rng = np.random.default_rng(seed)
    items = []
    for index in range(count):
        height, width = (int(v) for v in rng.integers(360, 641, size=2))
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        base = np.stack([xx / width * 200, yy / height * 200, (xx + yy) / (width + height) * 255], axis=-1)
        image = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        # [K, (min, max), (y, x)] sorted along the pair -> rows ymin, xmin, ymax, xmax
        corners = np.sort(rng.uniform(0, 1, size=(int(rng.integers(1, 13)), 2, 2)), axis=1)
        boxes = corners.reshape(-1, 4) * [height, width, height, width]
        for y0, x0, y1, x1 in boxes.astype(int):
            image[y0:y1, x0:x1] = rng.integers(0, 256, 3)
        path = folder / f"{index:03d}.jpg"
        Image.fromarray(image).save(path, quality=90)
        items.append((path, boxes.astype(np.float32)))
    return items


CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def time_pipeline(items, transforms: dict, rounds: int, clock=time.thread_time) -> dict[str, list[float]]:
    """ms per image of read + transform, per setting; the settings take turns image by image (starting with a
    different one each image), so a load that drifts during the run weighs on all of them alike."""
    times = {name: [] for name in transforms}
    names = list(transforms)
    for epoch in range(rounds):
        for index, (path, boxes) in enumerate(items):
            for turn in range(len(names)):
                name = names[(index + turn) % len(names)]
                rng = np.random.default_rng([0, epoch, index])  # as CocoDetection seeds each item
                start = clock()
                transforms[name](read_rgb(path), boxes, np.ones(len(boxes), np.int64), rng)
                times[name].append((clock() - start) * 1e3)
    return times


def time_ops(items, level: float, clock=time.thread_time) -> dict[str, float]:
    """Median ms of each op alone at `level` (positive sign) on the decoded images."""
    images = [(read_rgb(path), boxes) for path, boxes in items]
    result = {}
    for name in sorted(aa.OPS):
        args = aa.level_to_arg(name, level)
        samples = []
        for index, (image, boxes) in enumerate(images):
            norm = boxes / np.array(image.shape[:2] * 2, dtype=np.float32)
            start = clock()
            aa.apply_op(name, image, norm, args, np.random.default_rng(index), prob=1.0)
            samples.append((clock() - start) * 1e3)
        result[name] = statistics.median(samples)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="training image size")
    parser.add_argument("--images", type=int, default=48, help="distinct synthetic images")
    parser.add_argument("--rounds", type=int, default=5, help="passes over the images per setting")
    parser.add_argument("--malloc", choices=["reuse", "system"], default="reuse",
                        help="reuse: keep freed memory as main.py does (utils/allocator.py); system: glibc defaults")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: the thread's CPU time (default; robust on a busy machine); wall: elapsed time")
    args = parser.parse_args()
    if args.malloc == "reuse":
        reuse_freed_memory()
    torch.set_num_threads(1)  # a DataLoader worker's setting

    print(f"CPU: {cpu_name()}")
    print(f"torch {torch.__version__}, numpy {np.__version__}, 1 thread, malloc {args.malloc}, size {args.size}, "
          f"{args.images} images x {args.rounds} rounds, {args.clock} clock")
    settings = {"off": None, **{name: name for name in aa.AUTOAUGMENT_CHOICES}}
    transforms = {label: TrainTransform(args.size, autoaugment=policy) for label, policy in settings.items()}
    with tempfile.TemporaryDirectory() as folder:
        items = make_images(Path(folder), args.images)
        clock = CLOCKS[args.clock]
        time_pipeline(items[:4], transforms, 1, clock)  # warm-up (imports, allocator)
        times = time_pipeline(items, transforms, args.rounds, clock)
        op_times = time_ops(items, 10.0, clock)

    base = statistics.fmean(times["off"])
    print("\n| --autoaugment | median ms/img | mean ms/img | mean vs off |")
    print("|---|---|---|---|")
    for label, samples in times.items():
        mean = statistics.fmean(samples)
        print(f"| {label} | {statistics.median(samples):.1f} | {mean:.1f} | {mean / base:.2f}x |")
    print("\n| op (level 10, alone) | median ms/img |")
    print("|---|---|")
    for name, ms in op_times.items():
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
