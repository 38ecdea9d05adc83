"""Pascal VOC and YOLO datasets (data/voc.py, data/yolo.py, data/convert.py): written here from a tiny generated
shapes dataset, they read, train, evaluate and convert to the same boxes as its COCO json; bad files are errors
naming the file and line, or counted warnings."""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import main
from data.coco import CocoDetection
from data.convert import main as convert_main
from data.formats import DatasetError, dataset_format
from data.shapes import SHAPE_NAMES, make_shapes_dataset
from data.voc import read_voc
from data.yolo import labels_folder, read_data_yaml, read_yolo
from utils.cli import dataset_paths

SPLITS = ("train", "val")


def _coco(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())


def write_voc(shapes: Path, dst: Path, difficult: frozenset = frozenset()) -> Path:
    """The shapes dataset as VOC: ids `{split}_{stem}`, 1-based inclusive boxes `xmin = x + 1, xmax = x + w`,
    and a classes.txt in the shapes' order. Annotation ids in `difficult` are marked difficult."""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (dst / folder).mkdir(parents=True, exist_ok=True)
    (dst / "classes.txt").write_text("\n".join(SHAPE_NAMES) + "\n")
    for split in SPLITS:
        data, ids = _coco(shapes, split), []
        for image in data["images"]:
            image_id = f"{split}_{Path(image['file_name']).stem}"
            ids.append(image_id)
            shutil.copy(shapes / f"{split}2017" / image["file_name"], dst / "JPEGImages" / f"{image_id}.jpg")
            objects = "".join(
                f"<object><name>{SHAPE_NAMES[a['category_id'] - 1]}</name><difficult>{int(a['id'] in difficult)}"
                f"</difficult><bndbox><xmin>{a['bbox'][0] + 1}</xmin><ymin>{a['bbox'][1] + 1}</ymin>"
                f"<xmax>{a['bbox'][0] + a['bbox'][2]}</xmax><ymax>{a['bbox'][1] + a['bbox'][3]}</ymax></bndbox>"
                f"</object>\n" for a in data["annotations"] if a["image_id"] == image["id"])
            (dst / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation>\n<filename>{image_id}.jpg</filename>\n<size><width>{image['width']}</width>"
                f"<height>{image['height']}</height><depth>3</depth></size>\n{objects}</annotation>\n")
        (dst / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return dst


def write_yolo(shapes: Path, dst: Path) -> Path:
    """The shapes dataset as YOLO: `class cx cy w h` normalised, at full precision; names in data.yaml."""
    dst.mkdir(parents=True)
    (dst / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n"
                                   + "".join(f"  {k}: {name}\n" for k, name in enumerate(SHAPE_NAMES)))
    for split in SPLITS:
        data = _coco(shapes, split)
        (dst / "images" / split).mkdir(parents=True)
        (dst / "labels" / split).mkdir(parents=True)
        for image in data["images"]:
            shutil.copy(shapes / f"{split}2017" / image["file_name"], dst / "images" / split / image["file_name"])
            w, h = image["width"], image["height"]
            lines = [f"{a['category_id'] - 1} {(a['bbox'][0] + a['bbox'][2] / 2) / w!r} "
                     f"{(a['bbox'][1] + a['bbox'][3] / 2) / h!r} {a['bbox'][2] / w!r} {a['bbox'][3] / h!r}"
                     for a in data["annotations"] if a["image_id"] == image["id"]]
            (dst / "labels" / split / f"{Path(image['file_name']).stem}.txt").write_text("\n".join(lines) + "\n")
    return dst


def write_coco_with_box_areas(shapes: Path, dst: Path) -> Path:
    """The shapes COCO json with `area` = box area, as VOC and YOLO have it (shapes' own is the mask's, which
    pycocotools uses for its small / medium / large split)."""
    (dst / "annotations").mkdir(parents=True)
    for split in SPLITS:
        data = _coco(shapes, split)
        for a in data["annotations"]:
            a["area"] = a["bbox"][2] * a["bbox"][3]
        (dst / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
        (dst / f"{split}2017").symlink_to(shapes / f"{split}2017")
    return dst


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The same 2 + 3 images as COCO, VOC and YOLO."""
    folder = tmp_path_factory.mktemp("formats")
    shapes = make_shapes_dataset(folder / "shapes", num_train=2, num_val=3, image_size=(64, 96), workers=1)
    return {"coco": write_coco_with_box_areas(shapes, folder / "coco"), "voc": write_voc(shapes, folder / "voc"),
            "yolo": write_yolo(shapes, folder / "yolo")}


def _args(data, **flags):
    return argparse.Namespace(data=str(data), train_ann=None, train_images=None, val_ann=None, val_images=None,
                              **flags)


@pytest.mark.parametrize("fmt", ["voc", "yolo"])
def test_folders_read_as_the_same_boxes_classes_and_images_as_the_coco_json(datasets, fmt):
    assert dataset_format(str(datasets[fmt]))[0] == fmt and dataset_format(str(datasets["coco"]))[0] == "coco"
    for split in SPLITS:
        coco = CocoDetection(*dataset_paths(_args(datasets["coco"]), split), train=False)
        other = CocoDetection(*dataset_paths(_args(f"{fmt}:{datasets[fmt]}"), split), train=False)
        assert other.class_names == coco.class_names == list(SHAPE_NAMES)
        assert other.class_to_category == coco.class_to_category
        assert len(other) == len(coco)
        for i in range(len(coco)):
            assert np.array_equal(other.load_image(i), coco.load_image(i))
            for ours, theirs in zip(other.annotations(i), coco.annotations(i)):
                assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)  # float32 boxes: exact


COMMON = ["--image-size", "128", "--workers", "0", "--device", "cpu"]


def test_a_voc_image_set_file_names_the_images_of_a_split(datasets):
    image_set = datasets["voc"] / "ImageSets" / "Main" / "val.txt"
    args = _args(datasets["voc"])
    args.train_ann = str(image_set)  # e.g. --train-ann VOC2007/ImageSets/Main/trainval.txt
    ann, images = dataset_paths(args, "train")
    assert [i["file_name"] for i in ann["images"]] == [f"val_00000{k}.jpg" for k in (1, 2, 3)]
    assert ann["info"]["source"] == str(image_set) and images == datasets["voc"] / "JPEGImages"


def _train(data: Path, output: Path) -> dict:
    """One step (2 images, batch 2) on `data`; the EMA weights it saves."""
    assert main.main(["-mode", "train", "--data", str(data), "--batch-size", "2", "--epochs", "1",
                      "--output", str(output), *COMMON]) == 0
    return torch.load(output / "last.pth", weights_only=True)["ema_state_dict"]


def _eval(weights: Path, data: Path, output: Path, capsys) -> tuple[list, dict, str]:
    assert main.main(["-mode", "eval", "--weights", str(weights), "--data", str(data), "--nms", "hard",
                      "--output", str(output), *COMMON]) == 0
    return (json.loads((output / "detections_val.json").read_text()),
            json.loads((output / "metrics_val.json").read_text()), capsys.readouterr().out)


def test_voc_and_yolo_folders_train_and_evaluate_as_the_coco_json(datasets, tmp_path, capsys):
    """A step on the VOC folder and one on the YOLO folder give the same weights (their targets equal the
    COCO json's: test above); those weights evaluated on VOC, YOLO and the COCO json give the same detections
    and COCO numbers; VOC also prints and saves the VOC metric."""
    state = _train(datasets["voc"], tmp_path / "voc")
    assert all(torch.equal(state[k], v) for k, v in _train(datasets["yolo"], tmp_path / "yolo").items())
    weights = tmp_path / "voc" / "last.pth"
    runs = {fmt: _eval(weights, root, tmp_path / f"eval-{fmt}", capsys) for fmt, root in datasets.items()}
    detections, metrics, _ = runs["coco"]
    assert detections, "a 1-step model still scores boxes (hard NMS, no threshold)"
    for fmt in ("voc", "yolo"):
        assert runs[fmt][0] == detections and runs[fmt][1]["stats"] == metrics["stats"]
    voc_metrics, printed = runs["voc"][1], runs["voc"][2]
    assert "voc" not in metrics and "voc" not in runs["yolo"][1]
    assert set(voc_metrics["voc"]["classes"]) == set(SHAPE_NAMES)
    assert "VOC AP@0.5" in printed and "11-point" in printed and "all-point" in printed
    assert voc_metrics["annotations"] == str(datasets["voc"] / "ImageSets" / "Main" / "val.txt")


def test_difficult_objects_are_ignored_in_evaluation_and_left_out_of_training_unless_asked(datasets, tmp_path):
    data = _coco(datasets["coco"], "train")
    first = data["annotations"][0]
    root = write_voc(datasets["coco"], tmp_path / "voc", difficult=frozenset({first["id"]}))
    ann, images = dataset_paths(_args(root), "train")
    marked = [a for a in ann["annotations"] if a["difficult"]]
    assert len(marked) == 1 and marked[0]["iscrowd"] == 1 and marked[0]["bbox"] == first["bbox"]
    image = [i for i, image_id in enumerate(CocoDetection(ann, images, train=True).image_ids)
             if image_id == marked[0]["image_id"]][0]
    count = sum(a["image_id"] == marked[0]["image_id"] for a in ann["annotations"])
    assert len(CocoDetection(ann, images, train=True).annotations(image)[0]) == count - 1
    kept, _ = dataset_paths(_args(root, train_difficult=True), "train")
    assert len(CocoDetection(kept, images, train=True).annotations(image)[0]) == count
    assert [a["iscrowd"] for a in kept["annotations"] if a["difficult"]] == [0]
    val, _ = dataset_paths(_args(root, train_difficult=True), "val")  # evaluation always ignores them
    assert all(a["iscrowd"] == a["difficult"] for a in val["annotations"])
    for fmt in ("coco", "yolo"):  # nothing is marked difficult there: the flag would be silently ignored
        with pytest.raises(ValueError, match=f"^--train-difficult: only for a Pascal VOC folder .*not {fmt} data"):
            dataset_paths(_args(datasets[fmt], train_difficult=True), "train")


def test_a_voc_image_set_file_outside_imagesets_main_is_a_layout_error(datasets, tmp_path):
    stray = tmp_path / "train.txt"
    stray.write_text("000001\n")
    with pytest.raises(FileNotFoundError, match=r"an image-set file lies in ROOT/ImageSets/Main/"):
        dataset_paths(_args(f"voc:{stray}"), "train")


def test_convert_writes_the_coco_json_of_a_voc_or_yolo_split(datasets, tmp_path, capsys):
    for fmt in ("voc", "yolo"):
        dst = tmp_path / f"{fmt}.json"
        assert convert_main([f"{fmt}:{datasets[fmt]}", str(dst), "--to", "coco", "--split", "val"]) == 0
        assert f"wrote {dst}: 3 images" in capsys.readouterr().out
        written = json.loads(dst.read_text())
        in_memory, images = dataset_paths(_args(datasets[fmt]), "val")
        assert written == in_memory and written["info"]["format"] == fmt
        from_json, from_folder = CocoDetection(dst, images, train=False), CocoDetection(in_memory, images, train=False)
        assert from_json.class_names == from_folder.class_names
        assert all(np.array_equal(a, b) for i in range(3)
                   for a, b in zip(from_json.annotations(i), from_folder.annotations(i)))
    assert convert_main([str(datasets["coco"]), str(tmp_path / "x.json"), "--to", "coco"]) == 2
    assert "not a VOC or YOLO dataset" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def _voc(tmp_path, objects, size="<size><width>40</width><height>30</height></size>", name="a"):
    root = tmp_path / "voc"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main" / "val.txt").write_text(f"{name}\n")
    (root / "Annotations" / f"{name}.xml").write_text(f"<annotation>\n{size}\n{objects}</annotation>\n")
    return root


def _object(name="dog", box=(1, 1, 10, 10), difficult=0):
    return (f"<object>\n<name>{name}</name><difficult>{difficult}</difficult>\n<bndbox>\n<xmin>{box[0]}</xmin>"
            f"<ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox>\n</object>\n")


def test_voc_errors_name_the_file_and_line(tmp_path):
    root = _voc(tmp_path, _object() + "<object><name>cat</name>\n")
    with pytest.raises(DatasetError, match=r"Annotations/a\.xml:9: malformed XML \(mismatched tag"):
        read_voc(root, "val")
    _voc(tmp_path, _object(box=(9, 1, 5, 10)))
    with pytest.raises(DatasetError, match=r"a\.xml:5: box with xmax < xmin"):
        read_voc(root, "val")
    _voc(tmp_path, _object().replace("<xmax>10</xmax>", "<xmax>ten</xmax>"))
    with pytest.raises(DatasetError, match=r"a\.xml:5: <bndbox> needs a number in <xmax>, got 'ten'"):
        read_voc(root, "val")
    (root / "ImageSets" / "Main" / "val.txt").write_text("a\n\nb\n")
    with pytest.raises(DatasetError, match=r"ImageSets/Main/val\.txt:3: image b has no annotation file .*b\.xml"):
        read_voc(root, "val")
    with pytest.raises(FileNotFoundError, match=r"no image set .*train\.txt"):
        read_voc(root, "train")


def test_voc_boxes_outside_the_image_are_clipped_and_counted_and_names_sorted(tmp_path):
    root = _voc(tmp_path, _object("dog", (0, 1, 10, 10)) + _object("cat", (30, 20, 45, 35))
                + _object("cat", (50, 1, 60, 10)))
    with pytest.warns(UserWarning) as caught:
        data, images = read_voc(root, "val")
    said = sorted(str(w.message) for w in caught)
    assert said == [f"voc:{root}/ImageSets/Main/val.txt: 1 boxes with no area inside their image, dropped (first: "
                    f"a.xml:15)", f"voc:{root}/ImageSets/Main/val.txt: 2 boxes outside their image, clipped to it "
                                  f"(first: a.xml:5, a.xml:10)"]
    assert [c["name"] for c in data["categories"]] == ["cat", "dog"]  # no classes.txt: sorted names
    assert [(a["category_id"], a["bbox"]) for a in data["annotations"]] == [(2, [0.0, 0.0, 10.0, 10.0]),
                                                                             (1, [29.0, 19.0, 11.0, 11.0])]
    assert images == root / "JPEGImages" and data["images"][0]["file_name"] == "a.jpg"


def _yolo(tmp_path, lines, names="names: [circle, square]\n"):
    from PIL import Image
    root = tmp_path / "yolo"
    for folder in ("images/val", "labels/val"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "data.yaml").write_text(names)
    for stem in ("a", "b"):
        Image.new("RGB", (40, 20)).save(root / "images" / "val" / f"{stem}.png")
    (root / "labels" / "val" / "a.txt").write_text(lines)
    return root


def test_yolo_errors_name_the_file_and_line(tmp_path):
    root = _yolo(tmp_path, "0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2\n")
    with pytest.raises(DatasetError, match=r"labels/val/a\.txt:2: 4 numbers; expected 5 \('class cx cy w h'"):
        read_yolo(root, "val")
    _yolo(tmp_path, "\n2 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DatasetError, match=r"a\.txt:2: class id 2 is not one of 0\.\.1 \(2 classes in .*data\.yaml\)"):
        read_yolo(root, "val")
    _yolo(tmp_path, "0 0.5 0.5 -0.2 0.2\n")
    with pytest.raises(DatasetError, match=r"a\.txt:1: negative width or height"):
        read_yolo(root, "val")
    _yolo(tmp_path, "", names="names:\n  0: circle\n  2: square\n")
    with pytest.raises(DatasetError, match=r"data\.yaml:1: names: ids must be 0\.\.K-1, got \[0, 2\]"):
        read_yolo(root, "val")


def test_yolo_boxes_convert_exactly_and_a_missing_label_file_is_an_empty_image(tmp_path):
    """40 x 20 image: `0 0.5 0.5 0.25 0.5` is x 15..25, y 5..15; `1 0.875 0.5 0.375 0.5` is x 27.5..42.5,
    clipped to 40 (counted); the polygon (.125, .125) (.375, .25) (.25, .875) has the box x 5..15, y 2.5..17.5;
    b.png has no label file: no objects, counted; c.txt has no image: ignored, counted."""
    root = _yolo(tmp_path, "0 0.5 0.5 0.25 0.5\n1 0.875 0.5 0.375 0.5\n1 0.125 0.125 0.375 0.25 0.25 0.875\n")
    (root / "labels" / "val" / "c.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.warns(UserWarning) as caught:
        data, images = read_yolo(root, "val")
    said = sorted(str(w.message).split(": ", 1)[1] for w in caught)
    assert said == ["1 boxes outside their image, clipped to it (first: a.txt:2)",
                    "1 images without a label file: images with no objects, as YOLO tools treat them (first: b.png)",
                    "1 label files without an image, ignored (first: c.txt)"]
    assert [a["bbox"] for a in data["annotations"]] == [[15.0, 5.0, 10.0, 10.0], [27.5, 5.0, 12.5, 10.0],
                                                         [5.0, 2.5, 10.0, 15.0]]
    assert [a["category_id"] for a in data["annotations"]] == [1, 2, 2]
    assert [i["file_name"] for i in data["images"]] == ["a.png", "b.png"] and images == root / "images" / "val"
    assert labels_folder(Path("/d/images/x/images/valid")) == Path("/d/images/x/labels/valid")


def test_data_yaml_subset(tmp_path):
    path = tmp_path / "data.yaml"
    for text, names in (("nc: 3\nnames: ['a b', \"c\", no]  # comment\n", ["a b", "c", "no"]),
                        ("names: [a,\n  b, 'it''s']\n", ["a", "b", "it's"]),
                        ("names:\n- x\n- 'y # not a comment'\n", ["x", "y # not a comment"]),
                        ("path: ../d  # root\nnames:\n  1: b\n  0: a\n", ["a", "b"])):
        path.write_text(text)
        assert read_data_yaml(path) == names
    for text, error in (("nc: 2\nnames: [a]\n", r"data\.yaml:1: nc: 2 but names lists 1 classes"),
                        ("names: {0: a}\n", r"data\.yaml:1: names: expected a list or a mapping"),
                        ("train: x\n", r"data\.yaml: no 'names' key")):
        path.write_text(text)
        with pytest.raises(DatasetError, match=error):
            read_data_yaml(path)


def test_a_bad_dataset_file_is_one_error_line_from_main(datasets, tmp_path, capsys):
    root = write_voc(datasets["coco"], tmp_path / "voc")
    xml = root / "Annotations" / "train_000002.xml"
    xml.write_text(xml.read_text().replace("</size>", ""))
    assert main.main(["-mode", "train", "--data", str(root), "--device", "cpu", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {xml}:") and "malformed XML" in err and err.count("\n") == 1


def test_trainval_on_a_voc_folder_validates_with_the_voc_metric_too(datasets, tmp_path, capsys):
    """A VOC val set gets the VOC metric beside COCO AP in trainval's validation: in metrics.jsonl, in the
    printed line and (as a curve) in curves.png; a COCO json does not."""
    for fmt in ("voc", "coco"):
        out = tmp_path / fmt
        assert main.main(["-mode", "trainval", "--data", str(datasets[fmt]), "--batch-size", "2", "--epochs", "1",
                          "--output", str(out), *COMMON]) == 0
        evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "eval"]
        printed = capsys.readouterr().out
        assert evals and (out / "curves.png").is_file()
        if fmt == "voc":
            assert all(0 <= r["voc_mAP"] <= 1 and 0 <= r["voc_mAP_07"] <= 1 for r in evals)
            assert "VOC mAP" in printed
        else:
            assert not any("voc_mAP" in r for r in evals) and "VOC mAP" not in printed
