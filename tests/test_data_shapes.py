"""Synthetic shapes dataset: `data/shapes.py` (deterministic, tight boxes, atomic and reusable)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data import shapes
from data.coco import CocoDetection
from data.shapes import MARKER, MAX_OCCLUSION, SHAPE_NAMES, image_rng, make_shapes_dataset, render_image

SMALL = {"num_train": 6, "num_val": 2, "image_size": (64, 96), "seed": 3, "workers": 1}


def _digest(root) -> str:
    """Hash of both jsons and of every image's decoded pixels."""
    h = hashlib.sha256()
    for split in ("train", "val"):
        h.update((root / "annotations" / f"instances_{split}2017.json").read_bytes())
        for path in sorted((root / f"{split}2017").iterdir()):
            h.update(path.name.encode() + np.asarray(Image.open(path)).tobytes())
    return h.hexdigest()


def test_generation_is_deterministic_and_loads_as_coco(tmp_path):
    a, b = make_shapes_dataset(tmp_path / "a", **SMALL), make_shapes_dataset(tmp_path / "b", **SMALL)
    assert _digest(a) == _digest(b)
    assert _digest(make_shapes_dataset(tmp_path / "c", **{**SMALL, "seed": 4})) != _digest(a)
    train = CocoDetection.from_root(a, "train", image_size=64)
    assert len(train) == 6 and train.class_names == list(SHAPE_NAMES) and train.class_to_category == [1, 2, 3, 4, 5]
    sizes = [(im["height"], im["width"]) for im in train.coco.dataset["images"]]
    assert all(64 <= s <= 96 for hw in sizes for s in hw) and len(set(sizes)) > 1
    assert sum(len(train.annotations(i)[0]) for i in range(6)) >= 6


def test_boxes_are_the_tight_extent_of_the_drawn_pixels(tmp_path):
    root = make_shapes_dataset(tmp_path / "s", **{**SMALL, "num_train": 8, "image_size": (96, 160)})
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    checked = 0
    for index, info in enumerate(data["images"]):
        rng = image_rng(SMALL["seed"], "train", index)  # re-render the image: same generator, same pixels
        height, width = (int(v) for v in rng.integers(96, 161, 2))
        pixels, objects, owner = render_image(rng, height, width)
        saved = np.asarray(Image.open(root / "train2017" / info["file_name"])).astype(int)
        assert (height, width) == (info["height"], info["width"]) and np.abs(saved - pixels).mean() < 4  # JPEG q95
        anns = [a for a in data["annotations"] if a["image_id"] == info["id"]]
        assert [a["bbox"] for a in anns] == [o["bbox"] for o in objects] and 1 <= len(anns) <= 8
        for k, (ann, obj) in enumerate(zip(anns, objects)):
            x, y, w, h = ann["bbox"]
            visible = owner == k
            ys, xs = np.nonzero(visible)
            assert x <= xs.min() and xs.max() < x + w and y <= ys.min() and ys.max() < y + h
            assert visible.sum() >= (1 - MAX_OCCLUSION) * ann["area"] - 1e-6
            assert np.abs(saved[visible] - obj["colour"]).mean() < 12  # the file shows the shape there
            if visible.sum() == ann["area"]:  # unoccluded: the box is exactly its pixels' extent
                assert [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] == ann["bbox"]
                checked += 1
    assert checked >= 10


def test_complete_dataset_is_reused_and_other_parameters_replace_it(tmp_path, monkeypatch):
    root = make_shapes_dataset(tmp_path / "s", **SMALL)
    digest = _digest(root)

    def fail(*args):
        raise AssertionError("regenerated a complete dataset")
    with monkeypatch.context() as m:
        m.setattr(shapes, "_write_split", fail)
        assert make_shapes_dataset(tmp_path / "s", **SMALL) == root
    assert _digest(root) == digest
    make_shapes_dataset(root, **{**SMALL, "seed": 5})  # ours, other parameters: replaced
    assert _digest(root) != digest
    make_shapes_dataset(root, **{**SMALL, "num_train": 4})
    assert len(list((root / "train2017").iterdir())) == 4
    (root / "train2017" / "000001.jpg").unlink()  # damaged after the fact: regenerated
    make_shapes_dataset(root, **{**SMALL, "num_train": 4})
    assert len(list((root / "train2017").iterdir())) == 4


def test_interrupted_generation_leaves_nothing_that_is_reused(tmp_path, monkeypatch):
    calls = []

    def render_then_crash(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render_image(*args)
    with monkeypatch.context() as m:
        m.setattr(shapes, "render_image", render_then_crash)
        with pytest.raises(KeyboardInterrupt):
            make_shapes_dataset(tmp_path / "s", **SMALL)
    assert list(tmp_path.iterdir()) == []  # no root, no partial folder
    # a partial folder left by a killed process (its pid no longer exists) is removed, never used
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".s.partial-{int(dead.stdout)}-deadbeef"
    (stale / "train2017").mkdir(parents=True)
    root = make_shapes_dataset(tmp_path / "s", **SMALL)
    assert not stale.exists() and (root / MARKER).is_file() and len(list((root / "train2017").iterdir())) == 6


def test_foreign_folder_is_never_overwritten(tmp_path):
    root = tmp_path / "s"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train2017.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"^root .*s exists but is not a complete shapes dataset"):
        make_shapes_dataset(root, **SMALL)
    assert (root / "annotations" / "instances_train2017.json").read_text() == "{}"


def test_cli_prints_what_it_wrote(tmp_path, capsys):
    args = ["--root", str(tmp_path / "s"), "--num-train", "3", "--num-val", "1", "--min-side", "64",
            "--max-side", "80"]
    shapes.main(args)
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {tmp_path / 's'}") and "train: 3 images" in out and "val: 1 images" in out
    shapes.main(args)
    assert capsys.readouterr().out.startswith(f"reused {tmp_path / 's'}")


def test_variant_classes_and_empty_images(tmp_path):
    """num_classes keeps the first K kinds (categories 1..K); empty_fraction gives background-only images;
    the default dataset's marker has no variant keys (so its cache is unchanged)."""
    root = make_shapes_dataset(tmp_path / "v", num_train=20, num_val=2, image_size=(64, 96), seed=3, workers=1,
                               num_classes=3, empty_fraction=0.4)
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    assert [c["id"] for c in data["categories"]] == [1, 2, 3]
    assert {a["category_id"] for a in data["annotations"]} <= {1, 2, 3}
    with_boxes = {a["image_id"] for a in data["annotations"]}
    assert 0 < len(data["images"]) - len(with_boxes) < 20
    params = json.loads((root / MARKER).read_text())["params"]
    assert params["num_classes"] == 3 and params["empty_fraction"] == 0.4
    default = json.loads((make_shapes_dataset(tmp_path / "d", **SMALL) / MARKER).read_text())["params"]
    assert "num_classes" not in default and "empty_fraction" not in default
    with pytest.raises(ValueError, match="num_classes"):
        make_shapes_dataset(tmp_path / "bad", num_classes=6)
