"""YOLO (Ultralytics / darknet) layout read into a COCO-format dict (`data.formats.CocoBuilder`).

Layout: `ROOT/images/{split}/...` and `ROOT/labels/{split}/...`, one `NAME.txt` per image `NAME.jpg` (any
image suffix, subfolders allowed). As YOLO tools do, an image's label file is found by replacing the last
`images` folder of its path with `labels` and its suffix with `.txt`, so `--val-images ROOT/valid/images`
finds `ROOT/valid/labels`. An image without a label file is an image with no objects (YOLO tools treat it
so); it is counted and said once. Label files without an image are counted and ignored.

Class names: `ROOT/data.yaml` (key `names`, with `nc` checked against it when present) or else
`ROOT/classes.txt` (one name per line, darknet's `obj.names`). Class k is category k + 1.

Label lines: `class cx cy w h`, normalised by the image's width and height, or `class x1 y1 x2 y2 ...` (a
polygon of 3 or more points, as in YOLO segmentation labels: its bounding box is used). Pixel convention:
a normalised x is `x * W` in COCO's continuous frame (the image spans [0, W]; pixel i covers [i, i + 1)),
so the box is `[(cx - w/2) W, (cy - h/2) H, (cx + w/2) W, (cy + h/2) H]`, as Ultralytics' `xywhn2xyxy`
computes it. Image sizes are read from the files' headers (the stored pixel grid: EXIF orientation is not
applied, as for every dataset here).

`data.yaml` is read by a small subset parser (no YAML dependency): top-level `key: value` lines and
comments; `names` as a flow list (`names: [a, 'b c']`, may span lines), a block list (`- a`) or a block
mapping of ids 0..K-1 (`0: a`); scalars plain or quoted ('' and \\" escapes). Values are always strings,
so a class named `no` or `on` stays a name (YAML 1.1 would read a boolean). Other keys (`path`, `train`,
`val`, ...) are not used. Anything else in `names` is an error naming the line.
"""
from __future__ import annotations

from pathlib import Path

from .formats import CocoBuilder, DatasetError, Notes, image_files, image_size
from .voc import read_names

LAYOUT = ("YOLO layout: ROOT/images/{train,val}/NAME.jpg, ROOT/labels/{train,val}/NAME.txt, class names in "
          "ROOT/data.yaml or ROOT/classes.txt")


def _strip_comment(line: str) -> str:
    """`line` without its comment: '#' at the start or after a space, outside quotes (YAML's rule)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _scalar(text: str, path: Path, line: int) -> str:
    text = text.strip()
    if text[:1] in ("'", '"'):
        if len(text) < 2 or text[-1] != text[0]:
            raise DatasetError(path, line, f"unterminated quoted name {text}")
        inner = text[1:-1]
        return inner.replace("''", "'") if text[0] == "'" else inner.replace('\\"', '"').replace("\\\\", "\\")
    if not text or text[0] in "[]{}&*!|>%@`":
        raise DatasetError(path, line, f"unsupported YAML {text!r} (this reader takes plain or quoted names)")
    return text


def _flow_items(text: str, path: Path, line: int) -> list[str]:
    """Items of `[a, 'b, c', d]`: commas outside quotes separate them."""
    items, current, quote = [], "", None
    for char in text.strip()[1:-1]:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == ",":
            items.append(current)
            current = ""
            continue
        current += char
    items.append(current)
    if items[-1].strip() == "":  # a trailing comma
        items.pop()
    return [_scalar(item, path, line) for item in items]


def read_data_yaml(path: Path) -> list[str]:
    """Class names of an Ultralytics `data.yaml` (the subset described in the module doc)."""
    keys: dict[str, tuple[int, str, list]] = {}  # key -> (line, inline value, [(line, indented text)])
    last = None
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = _strip_comment(raw).rstrip()
        if not line.strip():
            continue
        if line[0].isspace() or line.startswith("- "):
            if last is None:
                raise DatasetError(path, number, "indented line before any key")
            keys[last][2].append((number, line.strip()))
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise DatasetError(path, number, f"expected 'key: value', got {line.strip()!r}")
        last = key.strip()
        keys[last] = (number, value.strip(), [])
    if "names" not in keys:
        raise DatasetError(path, None, "no 'names' key (the class names)")
    number, value, block = keys["names"]
    if value.startswith("["):
        text = " ".join([value] + [text for _, text in block])
        if not text.endswith("]"):
            raise DatasetError(path, number, "names: a flow list '[...]' must end with ']'")
        names = _flow_items(text, path, number)
    elif value:
        raise DatasetError(path, number, f"names: expected a list or a mapping of ids to names, got {value!r}")
    elif block and all(text.startswith("-") for _, text in block):
        names = [_scalar(text[1:], path, n) for n, text in block]
    else:
        mapping = {}
        for n, text in block:
            key, colon, name = text.partition(":")
            if not colon or not key.strip().isdigit():
                raise DatasetError(path, n, f"names: expected '- name' or 'ID: name' lines, got {text!r}")
            mapping[int(key)] = _scalar(name, path, n)
        if sorted(mapping) != list(range(len(mapping))):
            raise DatasetError(path, number, f"names: ids must be 0..K-1, got {sorted(mapping)}")
        names = [mapping[k] for k in range(len(mapping))]
    if not names:
        raise DatasetError(path, number, "names: no class names")
    if "nc" in keys and keys["nc"][1] != str(len(names)):
        raise DatasetError(path, keys["nc"][0], f"nc: {keys['nc'][1]} but names lists {len(names)} classes")
    return names


def class_names(root: Path) -> tuple[list[str], Path]:
    """`(names, file)` from `root/data.yaml`, else `root/classes.txt`."""
    for name, reader in (("data.yaml", read_data_yaml), ("classes.txt", read_names)):
        if (root / name).is_file():
            return reader(root / name), root / name
    raise FileNotFoundError(f"yolo:{root}: no data.yaml or classes.txt with the class names ({LAYOUT})")


def labels_folder(image_dir: Path) -> Path:
    """YOLO tools' rule: the last `images` folder of the path becomes `labels`."""
    parts = image_dir.parts
    if "images" not in parts:
        raise FileNotFoundError(f"{image_dir}: the labels of a YOLO image folder are found by replacing its last "
                                f"'images' folder with 'labels', and this path has none ({LAYOUT})")
    k = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:k], "labels", *parts[k + 1:])


def _box(values: list[float], width: int, height: int, path: Path, line: int) -> tuple[float, ...]:
    """Continuous-pixel `(x0, y0, x1, y1)` of a label line's numbers after the class."""
    if len(values) == 4:
        cx, cy, w, h = values
        if w < 0 or h < 0:
            raise DatasetError(path, line, f"negative width or height: {w:g} {h:g}")
        return (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height
    xs, ys = values[0::2], values[1::2]
    return min(xs) * width, min(ys) * height, max(xs) * width, max(ys) * height


def _read_labels(path: Path, image: dict, names: list[str], names_file: Path, builder: CocoBuilder) -> None:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if not (len(fields) == 5 or (len(fields) >= 7 and len(fields) % 2 == 1)):
            raise DatasetError(path, number, f"{len(fields)} numbers; expected 5 ('class cx cy w h', normalised "
                                             f"to the image) or a class and a polygon of 3 or more 'x y' points")
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise DatasetError(path, number, f"not numbers: {line.strip()!r}") from None
        if not (values[0].is_integer() and 0 <= values[0] < len(names)):
            raise DatasetError(path, number, f"class id {fields[0]} is not one of 0..{len(names) - 1} "
                                             f"({len(names)} classes in {names_file})")
        box = _box(values[1:], image["width"], image["height"], path, number)
        builder.add_box(image, int(values[0]), box, f"{path.name}:{number}")


def read_yolo(path, split: str, image_dir=None) -> tuple[dict, Path]:
    """`(COCO dict, image folder)` of `split` of the YOLO dataset at `path` (image_dir: default
    ROOT/images/{split}; its labels are found by YOLO tools' rule, `labels_folder`)."""
    root = Path(path)
    names, names_file = class_names(root)
    image_dir = Path(image_dir) if image_dir else root / "images" / split
    if not image_dir.is_dir():
        raise FileNotFoundError(f"yolo:{root}: no image folder {image_dir} for '{split}' ({LAYOUT})")
    label_dir = labels_folder(image_dir)
    notes = Notes(f"yolo:{label_dir}")
    builder = CocoBuilder("yolo", label_dir, names, notes)
    images = image_files(image_dir)
    for file in images:
        relative = file.relative_to(image_dir)
        size = image_size(file)
        image = builder.add_image(relative.as_posix(), *(size or (0, 0)))
        labels = label_dir / relative.with_suffix(".txt")
        if size is None:
            notes.add("images that cannot be opened (their labels are left out; the run skips them as "
                      "unreadable)", relative.as_posix())
        elif not labels.is_file():
            notes.add("images without a label file: images with no objects, as YOLO tools treat them",
                      relative.as_posix())
        else:
            _read_labels(labels, image, names, names_file, builder)
    stems = {file.relative_to(image_dir).with_suffix("").as_posix() for file in images}
    for labels in sorted(label_dir.rglob("*.txt")) if label_dir.is_dir() else ():
        if labels.relative_to(label_dir).with_suffix("").as_posix() not in stems:
            notes.add("label files without an image, ignored", labels.relative_to(label_dir).as_posix())
    return builder.finish(), image_dir
