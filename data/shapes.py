"""Synthetic COCO-format "shapes" dataset, so that a fresh clone trains and evaluates with no download.

`make_shapes_dataset(root)` writes (deterministically, once) `root/annotations/instances_{train,val}2017.json`
and `root/{train,val}2017/NNNNNN.jpg`: coloured circles, squares, triangles, stars and crosses (the class is
the shape; colour, size, stretch and rotation are random) on textured backgrounds (gradient + stripes or
blotches + pixel noise). 1-8 objects per image, 10 px to ~60 % of the short side, overlapping at most
`MAX_OCCLUSION` of any shape (a placement that would hide more is retried, then dropped), images with sides in
`image_size` (160-320 px by default). Each box (COCO `[x, y, w, h]`) is the exact pixel extent of its shape's
drawn mask: pixels `x .. x + w - 1`, `y .. y + h - 1`.

Generation writes into a hidden sibling folder and renames it to `root` when complete, so an interrupted run
never leaves a folder that looks complete; `root/shapes_dataset.json` records the parameters, and a complete
dataset with the same parameters is reused. CLI: `python -m data.shapes --root data/shapes`.

Variants (other datasets a user may bring, same generator): `num_classes` keeps the first K shape kinds and
`empty_fraction` makes that share of the images background only, e.g. the small dataset of
`benchmarks/train_small_dataset.py` (400 train images, 4 classes, 10 % without objects).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPE_NAMES = ("circle", "square", "triangle", "star", "cross")  # category id = index + 1
MAX_OCCLUSION = 0.5
MARKER = "shapes_dataset.json"
VERSION = 1
_SPLITS = {"train": 1, "val": 2}  # split code mixed into the per-image seed


def _unit_polygon(kind: str) -> np.ndarray:
    """Vertices `[V, 2]` (x, y) of a shape of radius ~1 centred on the origin."""
    if kind == "circle":
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([np.cos(angles), np.sin(angles)], 1)
    if kind == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) / np.sqrt(2)
    if kind == "triangle":
        angles = np.radians([-90, 30, 150])
        return np.stack([np.cos(angles), np.sin(angles)], 1)
    if kind == "star":
        angles = np.linspace(0, 2 * np.pi, 10, endpoint=False) - np.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    a = 0.33  # cross (plus sign), arm half-width
    return np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a],
                     [-1, -a], [-a, -a]])


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Float32 `[3, H, W]` (channel-first: fast numpy loops) texture: linear gradient between two colours,
    plus stripes or low-frequency blotches."""
    ys, xs = np.arange(height, dtype=np.float32)[:, None], np.arange(width, dtype=np.float32)[None, :]
    theta = rng.uniform(0, 2 * np.pi)
    t = xs * np.float32(np.cos(theta)) + ys * np.float32(np.sin(theta))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = rng.uniform(0, 255, (2, 3, 1, 1)).astype(np.float32)
    image = c0 + (c1 - c0) * t
    texture = rng.integers(3)
    if texture == 1:  # stripes
        phi, period = rng.uniform(0, np.pi), rng.uniform(6, 40)
        wave = np.sin((xs * np.float32(np.cos(phi)) + ys * np.float32(np.sin(phi))) * np.float32(2 * np.pi / period))
        image += (rng.uniform(10, 35) * rng.choice([-1, 1], (3, 1, 1))).astype(np.float32) * wave
    elif texture == 2:  # blotches: coarse random grid upsampled bilinearly
        coarse = rng.integers(0, 256, (rng.integers(3, 9), rng.integers(3, 9), 3), dtype=np.uint8)
        blotch = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR)).transpose(2, 0, 1)
        image += np.float32(rng.uniform(15, 40) / 128) * (blotch.astype(np.float32) - 128)
    return image


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour at least 80 (max over channels) away from the mean background `under` it."""
    for _ in range(20):
        colour = rng.uniform(0, 255, 3)
        if np.abs(colour - under).max() >= 80:
            return colour
    return np.where(under < 128, 230.0, 25.0)


def render_image(rng: np.random.Generator, height: int, width: int, num_classes: int = len(SHAPE_NAMES),
                 empty: bool = False) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """One image: `(uint8 [H, W, 3], objects, owner [H, W] int16)`; shapes of the first `num_classes` kinds
    of SHAPE_NAMES, none if `empty` (background only).

    objects: dicts with "category_id" (1-based), "bbox" `[x, y, w, h]` ints (tight extent of the full drawn
    shape), "area" (pixels of the full shape), "colour"; owner: index of the object visible at each pixel, -1
    for background.
    """
    image = _background(rng, height, width)
    owner = np.full((height, width), -1, dtype=np.int16)
    objects, full_area, visible = [], [], []
    for _ in range(0 if empty else rng.integers(1, 9)):
        kind = int(rng.integers(num_classes))
        short = min(height, width)
        radius = rng.uniform(5, 10) if rng.random() < 0.15 else np.exp(rng.uniform(np.log(10), np.log(0.3 * short)))
        stretch = np.exp(rng.uniform(-0.2, 0.2))
        angle = rng.uniform(0, 2 * np.pi)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = (_unit_polygon(SHAPE_NAMES[kind]) * [stretch, 1 / stretch]) @ rot.T * radius
        low, high = np.floor(points.min(0)) - 1, np.ceil(points.max(0)) + 2
        patch_w, patch_h = int(high[0] - low[0]), int(high[1] - low[1])
        if patch_w > width or patch_h > height:
            continue
        mask_image = Image.new("L", (patch_w, patch_h), 0)
        ImageDraw.Draw(mask_image).polygon([tuple(p) for p in points - low], fill=1)
        mask = np.asarray(mask_image, dtype=bool)
        for _attempt in range(10):  # placements that would hide > MAX_OCCLUSION of a shape are retried
            x0, y0 = int(rng.integers(0, width - patch_w + 1)), int(rng.integers(0, height - patch_h + 1))
            region = owner[y0:y0 + patch_h, x0:x0 + patch_w]
            hidden = np.bincount(region[mask & (region >= 0)], minlength=len(objects))
            if all(visible[k] - hidden[k] >= (1 - MAX_OCCLUSION) * full_area[k] for k in range(len(objects))):
                break
        else:
            continue
        patch = image[:, y0:y0 + patch_h, x0:x0 + patch_w]
        colour = _contrasting_colour(rng, patch[:, mask].mean(1))
        patch[:, mask] = colour[:, None]
        region[mask] = len(objects)
        visible = [v - h for v, h in zip(visible, hidden)] + [int(mask.sum())]
        full_area.append(int(mask.sum()))
        ys, xs = np.nonzero(mask)
        objects.append({"category_id": kind + 1, "area": int(mask.sum()), "colour": colour,
                        "bbox": [x0 + int(xs.min()), y0 + int(ys.min()),
                                 int(xs.max() - xs.min()) + 1, int(ys.max() - ys.min()) + 1]})
    image += rng.integers(-5, 6, image.shape, dtype=np.int8)  # pixel noise, std ~3.2
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return np.ascontiguousarray(pixels), objects, owner


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image `index` (0-based) of `split`: images are independent of each other."""
    return np.random.default_rng([seed, _SPLITS[split], index])


def _is_empty(seed: int, split: str, index: int, empty_fraction: float) -> bool:
    """Whether image `index` is background only (its own stream: the other images do not change)."""
    return empty_fraction > 0 and np.random.default_rng([seed, _SPLITS[split], index, 1]).random() < empty_fraction


def _write_images(folder: Path, split: str, indices: range, params: dict) -> list[tuple]:
    """Render and save images `indices` of `split`; returns `(image record, objects)` per image, in order."""
    records, (min_side, max_side), seed = [], params["image_size"], params["seed"]
    for index in indices:
        rng = image_rng(seed, split, index)
        height, width = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        empty = _is_empty(seed, split, index, params.get("empty_fraction", 0.0))
        pixels, objects, _ = render_image(rng, height, width, params.get("num_classes", len(SHAPE_NAMES)), empty)
        name = f"{index + 1:06d}.jpg"  # JPEG like COCO; 4:4:4 chroma keeps colour edges sharp
        Image.fromarray(pixels).save(folder / f"{split}2017" / name, quality=95, subsampling=0)
        records.append(({"id": index + 1, "file_name": name, "height": height, "width": width},
                        [{k: obj[k] for k in ("category_id", "bbox", "area")} for obj in objects]))
    return records


def _write_split(folder: Path, split: str, params: dict, workers: int) -> int:
    """Render `count` images into `folder/{split}2017/` and write their json; returns the number of boxes.
    The output does not depend on `workers` (every image has its own generator; records keep index order)."""
    (folder / f"{split}2017").mkdir(parents=True)
    count = params[f"num_{split}"]
    chunks = [range(start, min(start + 100, count)) for start in range(0, count, 100)]
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(min(workers, len(chunks))) as pool:
            parts = list(pool.map(_write_images, *zip(*[(folder, split, c, params) for c in chunks])))
    else:
        parts = [_write_images(folder, split, c, params) for c in chunks]
    images, annotations = [], []
    for image, objects in (record for part in parts for record in part):
        images.append(image)
        for obj in objects:  # annotation ids start at 1 (pycocotools treats id 0 as "unmatched")
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "iscrowd": 0, **obj})
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                  for i, name in enumerate(SHAPE_NAMES[:params.get("num_classes", len(SHAPE_NAMES))])]
    data = {"info": {"description": f"synthetic shapes ({split})", "version": VERSION}, "licenses": [],
            "images": images, "annotations": annotations, "categories": categories}
    (folder / "annotations").mkdir(exist_ok=True)
    (folder / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return len(annotations)


def _params(num_train: int, num_val: int, image_size, seed: int, num_classes: int = len(SHAPE_NAMES),
            empty_fraction: float = 0.0) -> dict:
    """The marker's parameters; the two variant keys only when they differ from the default dataset (whose
    marker, and so its cache, stays as it was)."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if not 1 <= num_classes <= len(SHAPE_NAMES):
        raise ValueError(f"num_classes: expected 1..{len(SHAPE_NAMES)}, got {num_classes}")
    if not 0 <= empty_fraction < 1:
        raise ValueError(f"empty_fraction: expected a fraction in [0, 1), got {empty_fraction}")
    params = {"version": VERSION, "num_train": int(num_train), "num_val": int(num_val),
              "image_size": [int(image_size[0]), int(image_size[1])], "seed": int(seed)}
    if num_classes != len(SHAPE_NAMES):
        params["num_classes"] = int(num_classes)
    if empty_fraction:
        params["empty_fraction"] = float(empty_fraction)
    return params


def is_complete(root, params: dict) -> bool:
    """True if `root` holds a finished dataset made with `params` (marker matches, all images present)."""
    root = Path(root)
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (marker.get("params") == params
            and all(len(list((root / f"{s}2017").glob("*.jpg"))) == params[f"num_{s}"] for s in _SPLITS))


def _remove_stale_partials(root: Path) -> None:
    """Delete partial folders left by generations whose process no longer exists (e.g. killed)."""
    for partial in root.parent.glob(f".{root.name}.partial-*"):
        try:
            os.kill(int(partial.name.split("-")[-2]), 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except (ValueError, PermissionError, IndexError):
            pass


def make_shapes_dataset(root="data/shapes", num_train: int = 2000, num_val: int = 200,
                        image_size=(160, 320), seed: int = 0, workers: int | None = None,
                        num_classes: int = len(SHAPE_NAMES), empty_fraction: float = 0.0) -> Path:
    """Write the dataset to `root` unless a complete one with the same parameters is there; returns `root`.

    image_size: `(min_side, max_side)`; each image's height and width are drawn uniformly from it.
    workers: processes rendering images (default: the CPU count); the result does not depend on it.
    num_classes: use the first K shape kinds (categories 1..K); empty_fraction: share of images with no shape.
    A `root` holding a shapes dataset with other parameters is replaced; a non-empty `root` that is not a
    shapes dataset (no `shapes_dataset.json`) is an error, never overwritten.
    """
    root = Path(root)
    params = _params(num_train, num_val, image_size, seed, num_classes, empty_fraction)
    if is_complete(root, params):
        return root
    if root.exists() and not (root / MARKER).is_file() and any(root.iterdir()):
        raise FileExistsError(f"root {root} exists but is not a complete shapes dataset (no {MARKER}); "
                              f"delete it or choose another root")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root)
    partial = root.parent / f".{root.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        workers = (os.cpu_count() or 1) if workers is None else workers
        counts = {s: _write_split(partial, s, params, workers) for s in _SPLITS}
        (partial / MARKER).write_text(json.dumps({"params": params, "num_boxes": counts}, indent=1))
        if root.exists():  # ours with other parameters (or empty): move aside, then swap in
            trash = root.parent / f".{root.name}.partial-{os.getpid()}-old{uuid.uuid4().hex[:8]}"
            root.rename(trash)
            shutil.rmtree(trash)
        try:
            partial.rename(root)
        except OSError:  # another process finished the same dataset first
            if not is_complete(root, params):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic COCO-format shapes dataset.")
    parser.add_argument("--root", default="data/shapes")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--min-side", type=int, default=160)
    parser.add_argument("--max-side", type=int, default=320)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-classes", type=int, default=len(SHAPE_NAMES), help="first K shape kinds")
    parser.add_argument("--empty-fraction", type=float, default=0.0, help="share of images without shapes")
    args = parser.parse_args(argv)
    sides = (args.min_side, args.max_side)
    params = _params(args.num_train, args.num_val, sides, args.seed, args.num_classes, args.empty_fraction)
    reused = is_complete(args.root, params)
    start = time.perf_counter()
    root = make_shapes_dataset(args.root, args.num_train, args.num_val, sides, args.seed,
                               num_classes=args.num_classes, empty_fraction=args.empty_fraction)
    marker = json.loads((root / MARKER).read_text())
    print(f"{'reused' if reused else 'wrote'} {root} in {time.perf_counter() - start:.1f} s "
          f"(classes: {', '.join(SHAPE_NAMES[:args.num_classes])})")
    for split in _SPLITS:
        print(f"  {split}: {params[f'num_{split}']} images, {marker['num_boxes'][split]} boxes -> "
              f"{root / 'annotations' / f'instances_{split}2017.json'}, {root / f'{split}2017'}/")


if __name__ == "__main__":
    main()
