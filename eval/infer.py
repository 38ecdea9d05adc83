"""`python main.py -mode infer`: detect objects in image files, draw them, and write detections.json.

Images are decoded by `data.image_io.read_rgb` with their EXIF orientation applied: a photo is detected and
drawn upright, as viewers show it, and its boxes are in that orientation. Unreadable files are reported and
skipped; when none can be read the mode fails.
"""
from __future__ import annotations

import argparse
import colorsys
from collections import Counter
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from data.image_io import ImageReadError, read_rgb
from data.transforms import preprocess_for_eval
from deploy.backends import network_from_args
from eval.evaluator import Detector
from model.postprocess import Detections
from utils.atomic import atomic_open, check_writable_dir, write_json
from utils.cli import add_inference_args, add_model_args, add_weights_args, load_detector, number, resolve_device

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def add_infer_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_weights_args(parser, required=True)
    parser.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image files and/or folders")
    parser.add_argument("--output", default="out", help="folder for the drawn images and detections.json")
    parser.add_argument("--threshold", type=number(float, 0, 1), default=0.4, help="minimum score drawn and written")
    parser.add_argument("--nms", choices=["hard", "soft"], default="hard",
                        help="hard: IoU-0.5 NMS (official image CLI); soft: official gaussian soft-NMS")
    parser.add_argument("--batch-size", type=number(int, 1), default=1, help="images per forward pass")
    add_inference_args(parser)
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N'")


def list_images(paths: list[str]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted, recursively)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"--images {path}: no image files in this folder "
                                        f"({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"--images {path}: no such file or folder")
    return files


def class_colour(index: int) -> tuple[int, int, int]:
    """A bright colour per class, spread around the hue circle by the golden ratio."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def image_detections(dets: Detections, i: int, height: int, width: int, threshold: float, names: list[str],
                     categories: list[int | None]) -> list[dict]:
    """Detections of image `i` of a batch with score >= `threshold`, as detections.json entries (`bbox`
    `[x, y, w, h]` original px, rounded to 0.01). Boxes are clipped to the `height` x `width` photo (the
    official path clips to the padded network frame); those left without area are dropped."""
    found = []
    for j in range(int(dets.num_valid[i])):
        score = float(dets.scores[i, j])
        if score < threshold:
            continue
        ymin, ymax = (min(max(float(v), 0.0), height) for v in dets.boxes[i, j, 0::2])
        xmin, xmax = (min(max(float(v), 0.0), width) for v in dets.boxes[i, j, 1::2])
        x, y, w, h = round(xmin, 2), round(ymin, 2), round(xmax - xmin, 2), round(ymax - ymin, 2)
        if w <= 0 or h <= 0:
            continue
        c = int(dets.classes[i, j])
        found.append({"category_id": categories[c] or c + 1, "class": c, "class_name": names[c],
                      "score": round(score, 5), "bbox": [x, y, w, h]})
    return found


def draw_detections(image: Image.Image, detections: list[dict]) -> Image.Image:
    """A copy of `image` with each detection's box and "name score" label (boxes `[x, y, w, h]`)."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 300))
    font = ImageFont.load_default(size=max(12, round(max(out.size) / 45)))
    for det in detections:
        x, y, w, h = det["bbox"]
        colour = class_colour(det["class"])
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=width)
        label = f"{det['class_name']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x, y), label, font=font)
        top_y = y - (bottom - top) - 2 * width if y - (bottom - top) - 2 * width >= 0 else y
        draw.rectangle([x, top_y, x + (right - left) + 2 * width, top_y + (bottom - top) + 2 * width], fill=colour)
        text = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)  # readable on light and dark labels
        draw.text((x + width, top_y + width - (top - y)), label, fill=text, font=font)
    return out


def _output_names(files: list[Path]) -> list[str]:
    """Distinct output file names, even for inputs with the same stem in different folders."""
    seen: dict[str, int] = {}
    names = []
    for f in files:
        n = seen.get(f.stem, 0)
        seen[f.stem] = n + 1
        names.append(f"{f.stem}.png" if n == 0 else f"{f.stem}_{n}.png")
    return names


def run_infer(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    output = check_writable_dir(args.output)
    files = list_images(args.images)
    model, info = load_detector(args)
    names = info["class_names"] or [f"class_{c}" for c in range(info["num_classes"])]
    categories = info["class_to_category"] or list(range(1, info["num_classes"] + 1))
    detector = Detector(model.to(device).eval(), info["image_size"], "infer", args.nms, args.precision, args.compile,
                        network_from_args(args, model, info))
    out_names = _output_names(files)
    results, unreadable = [], Counter()
    for start in range(0, len(files), args.batch_size):
        batch, tensors, scales = [], [], []
        for k in range(start, min(start + args.batch_size, len(files))):
            try:
                array = read_rgb(files[k], exif_transpose=True)
            except ImageReadError as e:
                print(f"skipping {e}")
                unreadable[e.reason] += 1
                continue
            tensor, scale = preprocess_for_eval(array, info["image_size"], model.config.mean_rgb, model.config.stddev_rgb)
            batch.append((k, array))
            tensors.append(tensor)
            scales.append(scale)
        if not batch:
            continue
        dets = detector(torch.stack(tensors).to(device), torch.tensor(scales, device=device))
        for i, (k, array) in enumerate(batch):
            found = [{"file_name": str(files[k]), "image_id": k, **det} for det in
                     image_detections(dets, i, array.shape[0], array.shape[1], args.threshold, names, categories)]
            with atomic_open(output / out_names[k]) as f:
                draw_detections(Image.fromarray(array), found).save(f, format="PNG")
            print(f"{files[k]}: {len(found)} detections -> {output / out_names[k]}")
            results += found
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(unreadable.items(), key=lambda kv: (-kv[1], kv[0])))
    if sum(unreadable.values()) == len(files):
        raise ValueError(f"--images: none of the {len(files)} input file(s) could be read as an image ({skipped}); "
                         f"nothing written")
    write_json(results, output / "detections.json", indent=1)
    print(f"wrote {output / 'detections.json'}: {len(results)} detections in "
          f"{len(files) - sum(unreadable.values())} images" + (f"; unreadable, skipped: {skipped}" if skipped else ""))
    return results
