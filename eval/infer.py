"""`python main.py -mode infer`: detect objects in image files or a video, draw them, and write detections.json.

Detection runs on `eval.predictor.Predictor` (the Python API's code path: preprocessing, network or backend,
post-processing, boxes clipped to the photo).

Images are decoded by `data.image_io.read_rgb` with their EXIF orientation applied: a photo is detected and
drawn upright, as viewers show it, and its boxes are in that orientation. Unreadable files are reported and
skipped; when none can be read the mode fails.

`--video FILE|CAMERA_INDEX` (`eval.video`) detects on every frame, in batches of `--batch-size`, and writes
the frames drawn as the images are into `OUTPUT/<name>.mp4` (the source's frame rate and size) and the same
detections.json entries, each with its `frame` index and `time_s`. A camera runs until Ctrl-C, which
finishes the current batch and closes both files.
"""
from __future__ import annotations

import argparse
import colorsys
import itertools
import signal
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from data.image_io import ImageReadError, read_rgb
from eval.predictor import Predictor, photo_detections
from eval.video import AnnotatedVideo, Frame, StopOnSignal, VideoSource, open_video
from model.postprocess import Detections
from data.atomic import atomic_open, check_writable_dir, refuse_unwritable_output, write_json
from utils.cli import add_inference_args, add_model_args, add_weights_args, number, resolve_device

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def add_infer_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_weights_args(parser, required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", metavar="PATH", help="image files and/or folders")
    source.add_argument("--video", metavar="FILE|CAMERA_INDEX",
                        help="a video file, or a camera index (0: /dev/video0); the annotated video goes to "
                             "OUTPUT/<name>.mp4; a camera runs until Ctrl-C")
    parser.add_argument("--output", default="out", help="folder for the drawn images or video and detections.json")
    parser.add_argument("--threshold", type=number(float, 0, 1), default=0.4, help="minimum score drawn and written")
    parser.add_argument("--nms", choices=["hard", "soft"], default="hard",
                        help="hard: IoU-0.5 NMS (official image CLI); soft: official gaussian soft-NMS")
    parser.add_argument("--batch-size", type=number(int, 1), default=1, help="images or frames per forward pass")
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
                     categories: list[int]) -> list[dict]:
    """Detections of image `i` of a batch with score >= `threshold`, as detections.json entries (`bbox`
    `[x, y, w, h]` original px, rounded to 0.01; `category_id` from `categories`, `class` the 0-based index).
    Boxes are clipped to the `height` x `width` photo and those left without area dropped
    (`eval.predictor.photo_detections`, what `Predictor.predict` returns)."""
    found = photo_detections(dets, i, height, width, threshold)
    return [{"category_id": categories[c], "class": c, "class_name": names[c], "score": round(score, 5),
             "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]}
            for (x1, y1, x2, y2), score, c in zip(found["boxes"].tolist(), found["scores"].tolist(),
                                                   found["classes"].tolist())]


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
    resolve_device(args.device)  # a bad --device before any work
    if args.video is not None:
        with open_video(args.video) as source:  # a bad video before the output folder is made
            return run_video(args, source)
    refuse_unwritable_output(args.output)  # checked first, made once the images and weights are good
    files = list_images(args.images)
    predictor = Predictor.from_args(args)
    output = check_writable_dir(args.output)
    out_names = _output_names(files)
    results, unreadable = [], Counter()
    # In a terminal only (disable=None), where the per-file lines scroll above it; `with`: an error mid-run
    # clears the bar first, so its message stands on a line of its own.
    with tqdm(total=len(files), desc="detect", unit="img", leave=False, dynamic_ncols=True, disable=None) as bar:
        for start in range(0, len(files), args.batch_size):
            batch = []
            for k in range(start, min(start + args.batch_size, len(files))):
                try:
                    batch.append((k, read_rgb(files[k], exif_transpose=True)))
                except ImageReadError as e:
                    bar.write(f"skipping {e}")
                    unreadable[e.reason] += 1
            if batch:
                dets = predictor.detections([array for _, array in batch])
            for i, (k, array) in enumerate(batch):
                found = [{"file_name": str(files[k]), "image_id": k, **det} for det in
                         image_detections(dets, i, *array.shape[:2], args.threshold, predictor.class_names,
                                          predictor.categories)]
                with atomic_open(output / out_names[k]) as f:
                    draw_detections(Image.fromarray(array), found).save(f, format="PNG")
                bar.write(f"{files[k]}: {len(found)} detections -> {output / out_names[k]}")
                results += found
            bar.update(min(args.batch_size, len(files) - start))
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(unreadable.items(), key=lambda kv: (-kv[1], kv[0])))
    if sum(unreadable.values()) == len(files):
        raise ValueError(f"--images: none of the {len(files)} input file(s) could be read as an image ({skipped}); "
                         f"nothing written")
    write_json(results, output / "detections.json", indent=1)
    print(f"wrote {output / 'detections.json'}: {len(results)} detections in "
          f"{len(files) - sum(unreadable.values())} images" + (f"; unreadable, skipped: {skipped}" if skipped else ""))
    return results


def _annotate_frames(predictor: Predictor, frames: list[Frame], source: VideoSource, video: AnnotatedVideo,
                     threshold: float) -> list[dict]:
    """Detect on a batch of frames, append them drawn to `video`; their detections.json entries."""
    dets = predictor.detections([frame.rgb for frame in frames])
    results = []
    for i, frame in enumerate(frames):
        found = [{"file_name": source.spec, "image_id": frame.index, "frame": frame.index,
                  "time_s": round(frame.time_s, 6), **det}
                 for det in image_detections(dets, i, *frame.rgb.shape[:2], threshold, predictor.class_names,
                                             predictor.categories)]
        video.write(np.asarray(draw_detections(Image.fromarray(frame.rgb), found)))
        results += found
    return results


def run_video(args: argparse.Namespace, source: VideoSource) -> list[dict]:
    """`--video`: every frame of `source` detected in batches of --batch-size, drawn into OUTPUT/<name>.mp4;
    detections.json written once the video is complete. A camera stops at Ctrl-C / SIGTERM after its batch."""
    path = Path(args.output) / f"{source.name}.mp4"
    if not source.is_camera and path.resolve() == Path(source.spec).resolve():
        raise ValueError(f"--video {source.spec}: the annotated video would overwrite it; choose another --output")
    refuse_unwritable_output(args.output)
    predictor = Predictor.from_args(args)
    output = check_writable_dir(args.output)  # made once the weights are good
    results = []
    video = AnnotatedVideo(path, source.fps, source.width, source.height)
    with StopOnSignal(source.is_camera) as stop, video, tqdm(total=source.frame_count, desc="video", unit="frame",
                                                             leave=False, dynamic_ncols=True, disable=None) as bar:
        frames = source.frames()
        while not stop.signum:  # a signal lets the batch being read (or detected) finish, then stops
            batch = list(itertools.islice(frames, args.batch_size))
            if not batch:
                break
            results += _annotate_frames(predictor, batch, source, video, args.threshold)
            bar.update(len(batch))
            bar.set_postfix(dets=len(results))
        if video.frames == 0:
            raise ValueError(f"--video {source.spec}: no frame could be read; nothing written")
    write_json(results, output / "detections.json", indent=1)
    stopped = f" (stopped by {signal.Signals(stop.signum).name})" if stop.signum else ""
    print(f"wrote {path}: {video.frames} frames, {source.width}x{source.height} at {float(source.fps):.4g} fps"
          f"{stopped}; {output / 'detections.json'}: {len(results)} detections")
    return results
