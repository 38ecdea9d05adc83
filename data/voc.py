"""Pascal VOC layout read into a COCO-format dict (`data.formats.CocoBuilder`), so `CocoDetection` takes it.

Layout (the VOC devkit's): `ROOT/Annotations/ID.xml`, `ROOT/JPEGImages/ID.jpg` (any image suffix is found by
its stem), `ROOT/ImageSets/Main/{split}.txt` listing the ids of a split, one per line (only the first word
of a line is read, so the devkit's per-class lists `ID  1` work too). An image-set file can be named
directly (`voc:ROOT/ImageSets/Main/test.txt`) to read that list instead of the split's.

Classes: `ROOT/classes.txt` (one name per line: the names and their order) if present, else the sorted names
of every `Annotations/*.xml` (for VOC itself, the 20 classes in the official `pascal_label_map_dict` order of
`create_pascal_tfrecord.py`); category ids 1..K.

Pixel convention: VOC coordinates are 1-based pixel indices, and `xmin..xmax` are the first and last pixel
columns of the object (the devkit counts a box's width as `xmax - xmin + 1`). In COCO's continuous frame that
is `[xmin - 1, xmax)`, so `bbox = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`: a round trip is
exact, and the devkit's `+1` areas equal these COCO areas. (The official `create_pascal_tfrecord.py` writes
`[xmin, ymin, xmax - xmin, ymax - ymin]`, one pixel right/down and one smaller.)

`difficult` objects: kept with `difficult: 1` and `iscrowd: 1`, so evaluation ignores them (a detection
on one is neither true nor false positive, as the devkit does) and training skips them (`CocoDetection`
skips crowd boxes); `keep_difficult=True` (`--train-difficult`) makes them ordinary boxes for training.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

from .formats import IMAGE_SUFFIXES, CocoBuilder, DatasetError, Notes, image_size

LAYOUT = "VOC layout: ROOT/Annotations/ID.xml, ROOT/JPEGImages/ID.jpg, ROOT/ImageSets/Main/{train,val}.txt"


@dataclass
class _Node:
    """An XML element with the line it starts on (ElementTree's C parser does not keep lines)."""
    tag: str
    line: int
    text: str = ""
    children: list = field(default_factory=list)

    def child(self, tag: str):
        return next((c for c in self.children if c.tag == tag), None)

    def value(self, tag: str, default: str | None = None) -> str | None:
        node = self.child(tag)
        return default if node is None else node.text.strip()


def parse_xml(path: Path) -> _Node:
    """The root element of an XML file; malformed XML is a DatasetError naming the file and line."""
    parser = expat.ParserCreate()
    stack = [_Node("", 0)]

    def start(tag, _attributes):
        node = _Node(tag, parser.CurrentLineNumber)
        stack[-1].children.append(node)
        stack.append(node)

    def characters(text):
        stack[-1].text += text

    parser.StartElementHandler, parser.EndElementHandler = start, lambda _tag: stack.pop()
    parser.CharacterDataHandler = characters
    try:
        with open(path, "rb") as f:
            parser.ParseFile(f)
    except expat.ExpatError as err:
        raise DatasetError(path, err.lineno, f"malformed XML ({expat.ErrorString(err.code)}, column "
                                             f"{err.offset + 1})") from None
    if not stack[0].children:
        raise DatasetError(path, None, "malformed XML (no element)")
    return stack[0].children[0]


def _number(node: _Node, tag: str, path: Path) -> float:
    text = node.value(tag)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise DatasetError(path, node.line, f"<{node.tag}> needs a number in <{tag}>, got {text!r}") from None


def _objects(annotation: _Node, path: Path) -> list[tuple[str, bool, tuple, int]]:
    """`(name, difficult, (xmin, ymin, xmax, ymax) VOC px, line of <bndbox>)` of every <object>."""
    objects = []
    for obj in (c for c in annotation.children if c.tag == "object"):
        name, box = obj.value("name"), obj.child("bndbox")
        if not name or box is None:
            raise DatasetError(path, obj.line, "<object> needs a <name> and a <bndbox>")
        difficult = obj.value("difficult", "0")
        if difficult not in ("0", "1"):
            raise DatasetError(path, obj.line, f"<difficult> must be 0 or 1, got {difficult!r}")
        xmin, ymin, xmax, ymax = (_number(box, tag, path) for tag in ("xmin", "ymin", "xmax", "ymax"))
        if xmax < xmin or ymax < ymin:
            raise DatasetError(path, box.line, f"box with xmax < xmin or ymax < ymin: {xmin:g} {ymin:g} "
                                               f"{xmax:g} {ymax:g}")
        objects.append((name, difficult == "1", (xmin, ymin, xmax, ymax), box.line))
    return objects


def _image_set(path: Path, split: str) -> tuple[Path, Path]:
    """`(root, image-set file)` of a VOC root (the split's list) or of an image-set file named directly."""
    if path.suffix == ".txt":
        if not (path.parent.name == "Main" and path.parent.parent.name == "ImageSets"):
            raise FileNotFoundError(f"voc:{path}: an image-set file lies in ROOT/ImageSets/Main/ ({LAYOUT})")
        root, image_set = path.parents[2], path
    else:
        root, image_set = path, path / "ImageSets" / "Main" / f"{split}.txt"
    if not (root / "Annotations").is_dir():
        raise FileNotFoundError(f"voc:{path}: no folder {root / 'Annotations'} ({LAYOUT})")
    if not image_set.is_file():
        raise FileNotFoundError(f"voc:{path}: no image set {image_set} listing the images of '{split}' ({LAYOUT})")
    return root, image_set


def read_names(path: Path) -> list[str]:
    """Class names of a `classes.txt`, one per line (blank lines ignored); a repeated name is an error."""
    names = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip() in names:
            raise DatasetError(path, number, f"class {line.strip()!r} is listed twice")
        if line.strip():
            names.append(line.strip())
    if not names:
        raise DatasetError(path, None, "no class names")
    return names


def _image_files(image_dir: Path) -> dict[str, str]:
    """Image stem -> file name in `image_dir`; a `.jpg` wins over other suffixes (the devkit reads
    `JPEGImages/ID.jpg`)."""
    files = {}
    names = os.listdir(image_dir) if image_dir.is_dir() else []
    for name in sorted(names, key=lambda n: n.lower().endswith(".jpg")):  # .jpg last: it overwrites the others
        if Path(name).suffix.lower() in IMAGE_SUFFIXES:
            files[Path(name).stem] = name
    return files


def read_voc(path, split: str, image_dir=None, keep_difficult: bool = False) -> tuple[dict, Path]:
    """`(COCO dict, image folder)` of `split` of the VOC dataset at `path` (a root or an image-set file).

    image_dir: the images' folder (default ROOT/JPEGImages). keep_difficult: train on difficult objects.
    """
    root, image_set = _image_set(Path(path), split)
    ids = [(line.split()[0], number) for number, line in
           enumerate(image_set.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    annotations = root / "Annotations"
    for image_id, number in ids:
        if not (annotations / f"{image_id}.xml").is_file():
            raise DatasetError(image_set, number, f"image {image_id} has no annotation file "
                                                  f"{annotations / f'{image_id}.xml'}")
    names_file = root / "classes.txt"
    stems = [i for i, _ in ids] if names_file.is_file() else sorted(p.stem for p in annotations.glob("*.xml"))
    parsed = {stem: parse_xml(annotations / f"{stem}.xml") for stem in stems}
    objects = {stem: _objects(node, annotations / f"{stem}.xml") for stem, node in parsed.items()}
    names = read_names(names_file) if names_file.is_file() else sorted(
        {o[0] for objs in objects.values() for o in objs})
    if not names:
        raise DatasetError(annotations, None, f"no object in any file, so no class names; list them in "
                                              f"{names_file}, one per line")
    class_index = {name: k for k, name in enumerate(names)}

    image_dir = Path(image_dir) if image_dir else root / "JPEGImages"
    files = _image_files(image_dir)
    notes = Notes(f"voc:{image_set}")
    builder = CocoBuilder("voc", image_set, names, notes)
    for image_id, _ in ids:
        xml = annotations / f"{image_id}.xml"
        file_name = files.get(image_id, f"{image_id}.jpg")
        size = parsed[image_id].child("size")
        height, width = ((int(_number(size, tag, xml)) for tag in ("height", "width")) if size is not None
                         else (0, 0))
        if height <= 0 or width <= 0:  # some tools leave <size> out or zero: read it from the file
            height, width = image_size(image_dir / file_name) or (0, 0)
        image = builder.add_image(file_name, height, width)
        if not height:
            notes.add("images without a <size> that cannot be opened (the run skips them as unreadable)", str(xml))
            continue
        for name, difficult, (xmin, ymin, xmax, ymax), line in objects[image_id]:
            if name not in class_index:
                raise DatasetError(xml, line, f"class {name!r} is not in {names_file}")
            builder.add_box(image, class_index[name], (xmin - 1, ymin - 1, xmax, ymax), f"{xml.name}:{line}",
                            difficult=difficult, iscrowd=difficult and not keep_difficult)
    return builder.finish(), image_dir
