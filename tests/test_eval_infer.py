"""COCO evaluation correctness, and the eval / infer modes end to end on a tiny generated dataset."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

import main
from data.atomic import refuse_unwritable_output
from eval.coco_eval import STAT_NAMES, detections_to_coco, evaluate_coco
from eval.infer import class_colour
from model import build_model
from model.postprocess import Detections
from model_helpers import tiny_shapes_run
from data.atomic import check_writable_dir
from utils.weights import save_weights


def _gt() -> COCO:
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"},
                   {"id": 2, "width": 100, "height": 100, "file_name": "b.png"}],
        "categories": [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [50, 50, 40, 20], "area": 800, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 60, 60], "area": 3600, "iscrowd": 0}]}
    coco.createIndex()
    return coco


def _as_results(coco, shift=0.0):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
             "bbox": [a["bbox"][0] + shift * a["bbox"][2], a["bbox"][1], a["bbox"][2], a["bbox"][3]]}
            for a in coco.dataset["annotations"]]


def test_perfect_shifted_and_empty_detections():
    coco = _gt()
    perfect = evaluate_coco(coco, _as_results(coco))
    assert perfect["AP"] == pytest.approx(1.0) and perfect["AP50"] == pytest.approx(1.0)
    # Shifting each box by 1/4 of its width gives IoU (3/4) / (5/4) = 0.6: a hit at IoU 0.50, 0.55, 0.60 only.
    shifted = evaluate_coco(coco, _as_results(coco, shift=0.25))
    assert shifted["AP50"] == pytest.approx(1.0) and shifted["AP75"] == pytest.approx(0.0)
    assert shifted["AP"] == pytest.approx(0.3)
    assert evaluate_coco(coco, []) == {name: 0.0 for name in STAT_NAMES}


def test_detections_to_coco_converts_yxyx_and_category_ids():
    dets = Detections(boxes=torch.tensor([[[10.0, 20.0, 50.0, 80.0], [1, 2, 3, 4], [0, 0, 0, 0]]]),
                      scores=torch.tensor([[0.9, 0.5, 0.0]]), classes=torch.tensor([[1, 0, 0]]),
                      num_valid=torch.tensor([2]))
    results = detections_to_coco(dets, [42], [None, 7])
    assert results == [{"image_id": 42, "category_id": 7, "bbox": [20.0, 10.0, 60.0, 40.0], "score": 0.9}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 6-image shapes dataset and fresh D0 weights at 128 px for its classes."""
    folder = tmp_path_factory.mktemp("tiny")
    return (*tiny_shapes_run(folder, randomised=False), folder)


def test_eval_mode_writes_detections_and_metrics(tiny, capsys):
    root, weights, folder = tiny
    out = folder / "eval"
    assert main.main(["-mode", "eval", "--weights", str(weights), "--data", str(root), "--output", str(out),
                      "--workers", "0", "--max-images", "4", "--nms", "hard"]) == 0
    printed = capsys.readouterr().out
    assert "AP @[IoU=0.50:0.95 | area=all | maxDets=100]" in printed
    metrics = json.loads((out / "metrics_val.json").read_text())
    assert set(metrics["stats"]) == set(STAT_NAMES) and metrics["images"] == 4
    detections = json.loads((out / "detections_val.json").read_text())
    assert detections and {d["image_id"] for d in detections} <= {1, 2, 3, 4}
    assert {d["category_id"] for d in detections} <= {1, 2, 3, 4, 5}


@pytest.mark.parametrize("output", [None, "out/eval"])
def test_eval_mode_rejects_weights_of_another_label_space(tiny, tmp_path, capsys, monkeypatch, output):
    """Refused before any output folder exists: neither the default runs/eval-<model> nor a named one."""
    root, _, _ = tiny
    weights = tmp_path / "w90.pth"
    save_weights(weights, build_model("efficientdet-d0").state_dict(), model_name="efficientdet-d0", num_classes=90)
    monkeypatch.chdir(tmp_path)
    flags = ["--output", output] if output else []
    assert main.main(["-mode", "eval", "--weights", str(weights), "--data", str(root), "--workers", "0", *flags]) == 2
    assert capsys.readouterr().err.startswith(f"error: --weights {weights}: has 90 classes, but the dataset")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w90.pth"]


def test_eval_mode_with_missing_data_creates_no_folder(tiny, tmp_path, capsys, monkeypatch):
    _, weights, _ = tiny
    monkeypatch.chdir(tmp_path)
    assert main.main(["-mode", "eval", "--weights", str(weights), "--data", "nowhere", "--workers", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: ") and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["images", "weights"])
def test_infer_mode_refused_on_its_inputs_creates_no_folder(tiny, tmp_path, capsys, bad):
    """`-mode infer` checks --output first but makes it only once the images and the weights are good."""
    _, weights, _ = tiny
    images = tmp_path / "nowhere.png" if bad == "images" else tiny[0] / "val2017"
    weights = tmp_path / "missing.pth" if bad == "weights" else weights
    out = tmp_path / "out"
    assert main.main(["-mode", "infer", "--weights", str(weights), "--images", str(images), "--output", str(out),
                      "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not out.exists()


def _error(check, path) -> str | None:
    try:
        check(path)
    except OSError as e:
        return str(e)
    return None


@pytest.mark.parametrize("output", ["file", "file/out", "free/out"])
def test_the_output_check_before_the_inputs_says_what_creating_it_would(tmp_path, output):
    """`refuse_unwritable_output` runs before the inputs are read and creates nothing; it refuses exactly
    what `check_writable_dir` (run once they are good) refuses, with the same words."""
    (tmp_path / "file").write_text("a file, not a folder")
    early = _error(refuse_unwritable_output, tmp_path / output)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # nothing created
    late = _error(check_writable_dir, tmp_path / output)
    assert early == late and (late is None) == (output == "free/out")


def test_missing_pretrained_weights_say_how_to_get_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("utils.cli.REPO", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main.main(["-mode", "eval", "-model", "efficientdet-d4", "--pretrained", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "efficientdet-d4.tar.gz" in err
    assert not (tmp_path / "runs").exists()


def test_infer_mode_png_and_json_agree(tiny, tmp_path, capsys):
    root, weights, _ = tiny
    images = tmp_path / "in"
    images.mkdir()
    for name in ("000001.jpg", "000002.jpg"):
        (images / name).write_bytes((root / "val2017" / name).read_bytes())
    (images / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main.main(["-mode", "infer", "--weights", str(weights), "--images", str(images), "--output", str(out),
                      "--threshold", "0", "--batch-size", "2"]) == 0
    assert "skipping" in capsys.readouterr().out
    detections = json.loads((out / "detections.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["000001.png", "000002.png", "detections.json"]
    for name in ("000001", "000002"):
        original = Image.open(images / f"{name}.jpg")
        drawn = np.asarray(Image.open(out / f"{name}.png"))
        assert drawn.shape[:2] == (original.height, original.width)
        mine = [d for d in detections if d["file_name"].endswith(f"{name}.jpg")]
        assert 0 < len(mine) <= 100
        for d in mine:
            x, y, w, h = d["bbox"]
            assert -1e-3 <= x and -1e-3 <= y and x + w <= original.width + 1e-3 and y + h <= original.height + 1e-3
        # The last box drawn is on top: the middle of its bottom edge has its class colour.
        x, y, w, h = mine[-1]["bbox"]
        row, col = min(int(round(y + h)), original.height - 1), min(int(x + w / 2), original.width - 1)
        assert tuple(drawn[row, col]) == class_colour(mine[-1]["class"])
