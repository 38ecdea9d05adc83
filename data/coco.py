"""COCO-format detection datasets (pycocotools) and their collate function.

Layout expected by `CocoDetection.from_root(DIR, split)`:
`DIR/annotations/instances_{split}2017.json` and `DIR/{split}2017/<file_name>` (split `train` or `val`).

Boxes: COCO `[x, y, w, h]` px in the json; (ymin, xmin, ymax, xmax) ("yxyx") float32 px everywhere here.
Classes: 0-based indices into the model's class outputs. A json whose categories all carry COCO's ids and
names uses the official 90-id label space, `class = category_id - 1` (official `hparams_config.num_classes=90`,
`anchors.py` subtracts 1 from the label); any other json gets a contiguous map over its sorted category ids.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from .bad_images import BadImage
from .image_io import ImageReadError, read_rgb
from .transforms import MEAN_RGB, STDDEV_RGB, TrainTransform, preprocess_for_eval

EXPECTED_LAYOUT = "expected layout: DIR/annotations/instances_{train,val}2017.json + DIR/{train,val}2017/"

# the 80 COCO categories with their ids in 1..90 (instances_*2017.json)
COCO_CATEGORY_NAMES: dict[int, str] = dict(enumerate([
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", None, "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", None, "backpack", "umbrella", None, None, "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", None, "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", None, "dining table", None, None, "toilet", None, "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", None,
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"], start=1))
COCO_CATEGORY_NAMES = {k: v for k, v in COCO_CATEGORY_NAMES.items() if v is not None}
COCO_NUM_CLASSES = 90


def _load_coco_json(ann_file: Path) -> dict:
    """Read and sanity-check a COCO instances json; any problem is a one-line ValueError naming the file."""
    try:
        data = json.loads(ann_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"ann_file {ann_file} is not COCO json (not valid JSON: {err})") from None
    return _check_coco(data, ann_file)


def _check_coco(data, ann_file: Path) -> dict:
    """`data` if it has the COCO instances structure, else a one-line ValueError naming `ann_file`."""
    if not isinstance(data, dict):
        raise ValueError(f"ann_file {ann_file} is not COCO json (top level is {type(data).__name__}, expected "
                         f"an object with 'images', 'annotations', 'categories')")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"ann_file {ann_file} is not COCO json (no '{key}' list; expected an instances "
                             f"file with 'images', 'annotations', 'categories')")
    try:
        for image in data["images"]:
            int(image["id"]), str(image["file_name"]), int(image["height"]), int(image["width"])
        for cat in data["categories"]:
            int(cat["id"]), str(cat["name"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"ann_file {ann_file} is not COCO json (an image lacks id/file_name/height/width or a "
                         f"category lacks id/name: {err!r})") from None
    return data


def _label_space(categories: list[dict], label_map: str | None, ann_file: Path
                 ) -> tuple[list[str], list[int | None], dict[int, int]]:
    """`(class_names, class_to_category, category_to_class)` for `label_map` None (auto) / 'coco90' /
    'contiguous'. In the 90-id space unused ids keep a placeholder name and map to category None."""
    names = {int(c["id"]): str(c["name"]) for c in categories}
    is_coco = all(COCO_CATEGORY_NAMES.get(cid, "").lower() == name.strip().lower() for cid, name in names.items())
    if label_map not in (None, "coco90", "contiguous"):
        raise ValueError(f"label_map: expected None (auto), 'coco90' or 'contiguous', got {label_map!r}")
    if label_map == "coco90" or (label_map is None and is_coco):
        bad = sorted(cid for cid in names if not 1 <= cid <= COCO_NUM_CLASSES)
        if bad:
            raise ValueError(f"label_map='coco90': {ann_file} has category ids {bad} outside 1..90")
        ids = list(range(1, COCO_NUM_CLASSES + 1))
        class_names = [names.get(i) or COCO_CATEGORY_NAMES.get(i) or f"unused_{i}" for i in ids]
        class_to_category = [i if i in names else None for i in ids]
    else:
        class_to_category = sorted(names)
        class_names = [names[i] for i in class_to_category]
    category_to_class = {cid: k for k, cid in enumerate(class_to_category) if cid is not None}
    return class_names, class_to_category, category_to_class


class CocoDetection(Dataset):
    """COCO-format detection dataset.

    Args:
        ann_file: COCO instances json, or its content as a dict (a VOC / YOLO dataset read by
            `data.convert.load_split`; `ann_file` is then its `info["source"]`, for messages).
        image_dir: folder holding the images named by the json's `file_name`.
        train: True -> augmented training items, False -> evaluation items (official eval preprocessing).
        image_size: network input size S (int or `(S_h, S_w)`).
        transform: training transform with `TrainTransform`'s call signature (default
            `TrainTransform(image_size)`, the official augmentation); not accepted with `train=False`.
        label_map: None = auto (the json's `info["label_map"]` if set, else COCO's ids and names -> 90-id
            space, else contiguous), 'coco90', 'contiguous'.
        max_instances: boxes kept per image, in annotation order (official `max_instances_per_image=100`).
        seed: base seed of the augmentation; item `i` of epoch `e` uses `np.random.default_rng([seed, e, i])`,
            so results do not depend on DataLoader workers or order.
        mean_rgb, stddev_rgb: the model's input normalisation (`config.mean_rgb` / `stddev_rgb`), used by the
            eval preprocessing and the default training transform.

    Items (`ds[i]`):
        train: `(image [3, S, S] float32, {"boxes": [K, 4] yxyx float32 network px, "classes": [K] int64,
            "image_id": int, "failures": [BadImage]})`. Crowd boxes are skipped (official
            `skip_crowd_during_training`). An image that cannot be read is skipped: the next index that
            decodes is returned and `failures` lists the images skipped for this item.
        eval: `(image [3, S, S] float32, {"image_id": int, "scale": float (original px per network px),
            "orig_size": (H, W)})`, or a `BadImage` if the image cannot be read (`collate_detection` drops and
            lists it). Evaluation reads ground truth from `self.coco` (pycocotools).
    Images are decoded by `data.image_io.read_rgb` (every PIL mode to 8-bit RGB, EXIF orientation not
    applied: annotations are in the stored pixel grid). Every annotated file must exist when the dataset is
    built (FileNotFoundError naming the first missing ones); a json width / height that differs from the
    decoded image is a warning, and the decoded size is used (boxes are in image pixels).
    Ground truth per image (`self.annotations(i)`): boxes clipped to the json's image size, zero-area boxes
    dropped, crowd boxes dropped in training, at most `max_instances`.

    The callers count failures (`data.bad_images.BadImageBudget`). `set_epoch(e)` must be called before
    iterating a DataLoader (workers copy the dataset when the iterator starts; not with persistent workers).
    """

    def __init__(self, ann_file, image_dir, *, train: bool, image_size=512, transform=None,
                 label_map: str | None = None, max_instances: int = 100, seed: int = 0,
                 mean_rgb=MEAN_RGB, stddev_rgb=STDDEV_RGB):
        in_memory = isinstance(ann_file, dict)
        source = ann_file.get("info", {}).get("source", "<annotations in memory>") if in_memory else ann_file
        self.ann_file, self.image_dir = Path(source), Path(image_dir)
        if not in_memory and not self.ann_file.is_file():
            raise FileNotFoundError(f"ann_file {self.ann_file} does not exist (expected a COCO instances json)"
                                    f"\n{EXPECTED_LAYOUT}")
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image_dir {self.image_dir} does not exist (expected the folder of images)"
                                    f"\n{EXPECTED_LAYOUT}")
        if transform is not None and not train:
            raise ValueError("transform: only used for training items; evaluation always uses the official "
                             "preprocessing (preprocess_for_eval)")
        self.train, self.image_size, self.max_instances, self.seed = train, image_size, int(max_instances), seed
        self.normalization = {"mean_rgb": mean_rgb, "stddev_rgb": stddev_rgb}
        self.transform = transform or (TrainTransform(image_size, **self.normalization) if train else None)
        self.epoch = 0

        data = _check_coco(ann_file, self.ann_file) if in_memory else _load_coco_json(self.ann_file)
        info = data.get("info") if isinstance(data.get("info"), dict) else {}
        self.class_names, self.class_to_category, self.category_to_class = _label_space(
            data["categories"], label_map or info.get("label_map"), self.ann_file)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        self.image_ids = [int(image["id"]) for image in data["images"]]
        self._gt = self._index_annotations(data)
        self._check_files_exist()

    @classmethod
    def from_root(cls, root, split: str, **kwargs) -> "CocoDetection":
        """`root/annotations/instances_{split}2017.json` + `root/{split}2017/`; `train` defaults to
        `split == 'train'`."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"root {root} does not exist (expected a COCO-format dataset folder)"
                                    f"\n{EXPECTED_LAYOUT}")
        kwargs.setdefault("train", split == "train")
        return cls(root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017", **kwargs)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.image_ids)

    def _index_annotations(self, data: dict) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """image id -> (boxes [K, 4] yxyx float32 px clipped to the image, classes [K] int64)."""
        sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in data["images"]}
        rows: dict[int, list] = {image_id: [] for image_id in sizes}
        for ann in data["annotations"]:
            ann_id, cat_id = ann.get("id"), ann.get("category_id")
            if cat_id not in self.category_to_class:
                raise ValueError(f"ann_file {self.ann_file}: annotation id {ann_id} has category_id {cat_id}, "
                                 f"which is not in the json's categories {sorted(self.category_to_class)}")
            image_id = ann.get("image_id")
            bbox = ann.get("bbox")
            if image_id not in rows or not isinstance(bbox, list) or len(bbox) != 4:
                raise ValueError(f"ann_file {self.ann_file}: annotation id {ann_id} needs an image_id from "
                                 f"'images' and a bbox [x, y, w, h], got image_id {image_id!r}, bbox {bbox!r}")
            if self.train and ann.get("iscrowd", 0):  # official skip_crowd_during_training
                continue
            height, width = sizes[image_id]
            x, y, w, h = (float(v) for v in bbox)
            box = (min(max(y, 0.0), height), min(max(x, 0.0), width),
                   min(max(y + h, 0.0), height), min(max(x + w, 0.0), width))
            if box[2] > box[0] and box[3] > box[1] and len(rows[image_id]) < self.max_instances:
                rows[image_id].append((box, self.category_to_class[cat_id]))
        return {image_id: (np.array([r[0] for r in row], dtype=np.float32).reshape(-1, 4),
                           np.array([r[1] for r in row], dtype=np.int64))
                for image_id, row in rows.items()}

    def _check_files_exist(self) -> None:
        """Every annotated file must be in `image_dir` (one directory listing per folder, not a stat per file)."""
        listings: dict[Path, set[str]] = {}
        missing = []
        for image_id in self.image_ids:
            path = self.image_dir / self.coco.imgs[image_id]["file_name"]
            if path.parent not in listings:
                listings[path.parent] = set(os.listdir(path.parent)) if path.parent.is_dir() else set()
            if path.name not in listings[path.parent]:
                missing.append(self.coco.imgs[image_id]["file_name"])
        if missing:
            raise FileNotFoundError(f"image_dir {self.image_dir}: {len(missing)} of the {len(self.image_ids)} images "
                                    f"of {self.ann_file} are missing: {', '.join(missing[:5])}"
                                    + (", ..." if len(missing) > 5 else ""))

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Ground truth of item `index`: boxes `[K, 4]` yxyx float32 original px, classes `[K]` int64."""
        return self._gt[self.image_ids[index]]

    def load_image(self, index: int) -> np.ndarray:
        """RGB uint8 `[H, W, 3]` of item `index`; raises `ImageReadError` on a file that cannot be read."""
        info = self.coco.imgs[self.image_ids[index]]
        path = self.image_dir / info["file_name"]
        array = read_rgb(path)
        if array.shape[:2] != (int(info["height"]), int(info["width"])):
            warnings.warn(f"{path}: decodes to height x width {array.shape[0]} x {array.shape[1]}, but "
                          f"{self.ann_file} says {info['height']} x {info['width']}; using the decoded size")
        return array

    def _try_load(self, index: int) -> np.ndarray | BadImage:
        try:
            return self.load_image(index)
        except ImageReadError as err:
            image_id = self.image_ids[index]
            return BadImage(image_id, self.coco.imgs[image_id]["file_name"], err.reason, err.detail)

    def __getitem__(self, index: int):
        array = self._try_load(index)
        if not self.train:
            if isinstance(array, BadImage):
                return array
            image, scale = preprocess_for_eval(array, self.image_size, **self.normalization)
            return image, {"image_id": self.image_ids[index], "scale": scale, "orig_size": array.shape[:2]}
        rng = np.random.default_rng([self.seed, self.epoch, index])
        failures, loaded = [], index
        while isinstance(array, BadImage):  # training: resample the next index, so batches keep their size
            failures.append(array)
            if len(failures) == len(self):
                raise RuntimeError(f"image_dir {self.image_dir}: no image of {self.ann_file} could be read "
                                   f"({array.file_name}: {array.reason}, ...)")
            loaded = (index + len(failures)) % len(self)
            array = self._try_load(loaded)
        boxes, classes = self.annotations(loaded)
        image, boxes, classes = self.transform(array, boxes, classes, rng)
        return image, {"boxes": boxes, "classes": classes, "image_id": self.image_ids[loaded], "failures": failures}


def collate_detection(batch: list) -> tuple[torch.Tensor | None, dict]:
    """Batch `CocoDetection` items (`BadImage` items, i.e. eval images that could not be read, are dropped).

    Returns `(images [B, 3, S, S], targets)`, images None when every item failed, with `targets`:
        always: "image_ids" `[B]` int64, "failures" list of `BadImage` (the unreadable images behind this
            batch), "num_failed" their number;
        train items: "gt_boxes" `[B, M, 4]` yxyx network px and "gt_classes" `[B, M]` int64, M = most boxes
            in the batch (may be 0), padded with -1 (the official `pad_to_fixed_size` value);
        eval items: "scales" list of float (original px per network px), "orig_sizes" list of (H, W).
    """
    items = [item for item in batch if not isinstance(item, BadImage)]
    failures = [item for item in batch if isinstance(item, BadImage)]
    failures += [bad for _, t in items for bad in t.get("failures", ())]
    targets = [t for _, t in items]
    out = {"image_ids": torch.tensor([t["image_id"] for t in targets], dtype=torch.int64),
           "failures": failures, "num_failed": len(failures)}
    if not items:
        return None, out
    images = torch.stack([image for image, _ in items])
    if "boxes" in targets[0]:
        m = max(len(t["boxes"]) for t in targets)
        out["gt_boxes"] = torch.full((len(items), m, 4), -1.0, dtype=torch.float32)
        out["gt_classes"] = torch.full((len(items), m), -1, dtype=torch.int64)
        for b, t in enumerate(targets):
            out["gt_boxes"][b, :len(t["boxes"])] = t["boxes"]
            out["gt_classes"][b, :len(t["classes"])] = t["classes"]
    else:
        out["scales"] = [t["scale"] for t in targets]
        out["orig_sizes"] = [tuple(t["orig_size"]) for t in targets]
    return images, out
