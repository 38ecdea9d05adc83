"""What the VOC and YOLO readers share: naming a dataset's format, and building the COCO-format dict.

A dataset is named on the command line as `coco:PATH`, `voc:PATH`, `yolo:PATH`, or a bare PATH whose
format is detected from its layout (`dataset_format`):

* VOC: a folder with `Annotations/` (and `JPEGImages/`, `ImageSets/Main/`), or an image-set file
  `.../ImageSets/Main/NAME.txt` (that list of images instead of the split's);
* YOLO: a folder with `images/` and `labels/`;
* COCO: anything else (a COCO root folder or an instances json), as before this module existed.

The readers (`data.voc`, `data.yolo`) produce the same COCO-format dict a COCO json holds, built by
`CocoBuilder`: boxes in COCO's continuous pixel frame (pixel i covers [i, i + 1), an image spans [0, W]),
clipped to their image. Problems that do not make the data ambiguous (a box outside its image, an image without
a YOLO label file, ...) are counted per kind and said once per read (`Notes`); problems that do (malformed
XML, a label line that is not 5 numbers, an unknown class) are a `DatasetError` naming the file and line.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

FORMATS = ("coco", "voc", "yolo")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def image_files(folder: Path) -> list[Path]:
    """The image files (by IMAGE_SUFFIXES) under `folder`, recursively, sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class DatasetError(ValueError):
    """A file of a dataset that cannot be read as its format says: `FILE:LINE: what is wrong`."""

    def __init__(self, path, line: int | None, message: str):
        super().__init__(f"{path}{'' if line is None else f':{line}'}: {message}")


def dataset_format(text: str) -> tuple[str, Path]:
    """`(format, path)` of a dataset named on the command line: an explicit `FORMAT:` prefix, else detected."""
    head, sep, rest = str(text).partition(":")
    if sep and head in FORMATS:
        return head, Path(rest)
    path = Path(text)
    if path.suffix == ".txt" and path.parent.name == "Main" and path.parent.parent.name == "ImageSets":
        return "voc", path
    # exact names: on a case-insensitive file system COCO's annotations/ would pass for Annotations/
    entries = set(os.listdir(path)) if path.is_dir() else set()
    if "Annotations" in entries:
        return "voc", path
    if {"images", "labels"} <= entries:
        return "yolo", path
    return "coco", path


def image_size(path: Path) -> tuple[int, int] | None:
    """`(height, width)` from the file's header (PIL reads no pixels), None if it cannot be opened."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, UnidentifiedImageError):
        return None
    return height, width


class Notes:
    """Counted warnings of one read: `add(kind, where)` per occurrence; `say()` warns once per kind with its
    count and the first places, e.g. `3 boxes outside their image, clipped (first: a.xml:12, b.xml:9, ...)`."""

    def __init__(self, source):
        self.source, self.kinds = source, {}

    def add(self, kind: str, where: str) -> None:
        self.kinds.setdefault(kind, []).append(where)

    def count(self, kind: str) -> int:
        return len(self.kinds.get(kind, ()))

    def say(self) -> None:
        for kind, places in self.kinds.items():
            first = ", ".join(places[:3]) + (", ..." if len(places) > 3 else "")
            warnings.warn(f"{self.source}: {len(places)} {kind} (first: {first})", stacklevel=3)


class CocoBuilder:
    """Accumulates images and boxes into a COCO instances dict (ids from 1: pycocotools treats 0 as unmatched).

    Categories are `names` with ids 1..K. `info` records the format and source, and `label_map: contiguous`:
    class k of the model is category k + 1 whatever the names are (`data.coco` would otherwise put a dataset
    whose names happen to be COCO's at COCO's ids into the 90-id space).
    """

    def __init__(self, fmt: str, source, names: list[str], notes: Notes):
        self.notes = notes
        self.data = {"info": {"description": f"{fmt} dataset {source}", "format": fmt, "source": str(source),
                              "label_map": "contiguous"},
                     "images": [], "annotations": [],
                     "categories": [{"id": k + 1, "name": name, "supercategory": "none"}
                                    for k, name in enumerate(names)]}

    def add_image(self, file_name: str, height: int, width: int) -> dict:
        image = {"id": len(self.data["images"]) + 1, "file_name": file_name, "height": int(height), "width": int(width)}
        self.data["images"].append(image)
        return image

    def add_box(self, image: dict, class_index: int, box: tuple[float, float, float, float], where: str,
                difficult: bool | None = None, iscrowd: bool = False) -> None:
        """Box `(x0, y0, x1, y1)` in continuous pixels, clipped to the image (counted); one with no area left
        is dropped (counted). `difficult` (VOC only) is stored as given; `iscrowd` makes COCO tools ignore it."""
        width, height = image["width"], image["height"]
        x0, y0, x1, y1 = box
        clipped = (min(max(x0, 0.0), width), min(max(y0, 0.0), height),
                   min(max(x1, 0.0), width), min(max(y1, 0.0), height))
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            self.notes.add("boxes with no area inside their image, dropped", where)
            return
        if clipped != tuple(box):
            self.notes.add("boxes outside their image, clipped to it", where)
        x0, y0, x1, y1 = clipped
        ann = {"id": len(self.data["annotations"]) + 1, "image_id": image["id"], "category_id": class_index + 1,
               "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": int(iscrowd)}
        if difficult is not None:
            ann["difficult"] = int(difficult)
        self.data["annotations"].append(ann)

    def finish(self) -> dict:
        self.notes.say()
        return self.data
