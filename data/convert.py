"""VOC and YOLO datasets as COCO: `load_split` for the command line, and a converter to a COCO json.

`load_split(fmt, path, split)` reads one split into the COCO-format dict `CocoDetection` takes in place of a
json path (`data.voc`, `data.yolo`); `utils.cli.dataset_paths` calls it for `--data` / `--{split}-ann`.

    python -m data.convert SRC DST.json --to coco [--split val]

writes that dict as a COCO instances json (atomically: a failed run leaves no partial file). SRC is a VOC or
YOLO folder (detected, or `voc:PATH` / `yolo:PATH`) or a VOC image-set file. Its `file_name`s are relative to
the image folder it prints, to pass as `--{split}-images`. VOC `difficult` objects keep `difficult: 1` and
`iscrowd: 1` (ignored by evaluation, skipped by training, as when the folder is read directly), and the
json's `info` keeps `format: voc`, so `-mode eval` on it reports the VOC metric too.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data.atomic import write_json  # a leaf module (standard library only): the atomic write of every json

from .formats import dataset_format
from .voc import read_voc
from .yolo import read_yolo


def load_split(fmt: str, path, split: str, image_dir=None, keep_difficult: bool = False) -> tuple[dict, Path]:
    """`(COCO dict, image folder)` of `split` of a `fmt` ("voc" or "yolo") dataset at `path`; `image_dir`
    replaces the layout's image folder; `keep_difficult` (VOC) makes difficult objects ordinary boxes."""
    if fmt == "voc":
        return read_voc(path, split, image_dir, keep_difficult)
    if fmt == "yolo":
        return read_yolo(path, split, image_dir)
    raise ValueError(f"{path}: not a VOC or YOLO dataset (format {fmt!r}); name it voc:PATH or yolo:PATH")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="VOC or YOLO dataset folder (or voc:PATH / yolo:PATH, or a VOC image-set file)")
    parser.add_argument("dst", help="COCO json to write")
    parser.add_argument("--to", choices=["coco"], required=True, help="output format")
    parser.add_argument("--split", default="train",
                        help="split to convert: ImageSets/Main/SPLIT.txt (VOC), images/SPLIT (YOLO); default train")
    args = parser.parse_args(argv)
    try:
        fmt, path = dataset_format(args.src)
        data, images = load_split(fmt, path, args.split)
        write_json(data, args.dst)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    difficult = sum(a.get("difficult", 0) for a in data["annotations"])
    flag = "train" if args.split == "train" else "val"  # the split flags of main.py
    print(f"wrote {args.dst}: {len(data['images'])} images, {len(data['annotations'])} boxes"
          + (f" ({difficult} difficult)" if fmt == "voc" else "") + f", {len(data['categories'])} classes; "
          f"images in {images} (use --{flag}-ann {args.dst} --{flag}-images {images})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
