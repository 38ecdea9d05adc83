"""`eval.predictor.Predictor`: the same detections as `-mode infer` (whose code path it is), a list of mixed-size
images as the images one by one, every input kind alike, one-line errors for bad inputs, torch.hub
`predictor=True`. On the ported fixture weights (real BN statistics) and the fixture photo (451 x 300)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from conftest import ROOT
from eval.predictor import Predictor
from utils.weights import save_weights

WEIGHTS_DIR_ENV = "EFFICIENTDET_WEIGHTS_DIR"  # utils.pretrained's weights folder setting


def save_ported(ported, folder: Path) -> Path:
    """`folder/efficientdet-d0.pth` holding the ported fixture weights, as `python -m utils.port_tf` writes it
    (90 COCO classes, names from COCO)."""
    path = folder / "efficientdet-d0.pth"
    save_weights(path, ported.state_dict(), model_name="efficientdet-d0", num_classes=90)
    return path


@pytest.fixture(scope="module")
def weights(ported, tmp_path_factory) -> Path:
    return save_ported(ported, tmp_path_factory.mktemp("predictor"))


@pytest.fixture(scope="module")
def predictor(weights) -> Predictor:
    return Predictor.from_weights(weights, device="cpu")


@pytest.fixture(scope="module")
def photo(fixture_dir) -> Path:
    return fixture_dir / "image.png"


def as_json_fields(result: dict) -> list[dict]:
    """A `predict` result as the fields of detections.json entries (`bbox` [x, y, w, h], rounded as written)."""
    return [{"category_id": label, "class_name": name, "score": round(score, 5),
             "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]}
            for (x1, y1, x2, y2), score, label, name in zip(result["boxes"].tolist(), result["scores"].tolist(),
                                                            result["labels"].tolist(), result["names"])]


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b) == {"boxes", "scores", "labels", "names"}
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    assert torch.equal(a["labels"], b["labels"]) and a["names"] == b["names"]


# soft-NMS runs over ~all anchors of these weights: at 256 px, 4x fewer; TTA flip: two passes fused by WBF
@pytest.mark.parametrize("nms, size, tta", [("hard", 512, None), ("soft", 256, None), ("hard", 256, "flip")])
def test_predict_equals_infer_detections_json(predictor, weights, photo, tmp_path, nms, size, tta):
    """Every detection `-mode infer` writes, and no other: same category, name, score and box (xyxy here,
    `[x, y, w, h]` there), at threshold 0 (up to 100 detections)."""
    out = tmp_path / "out"
    assert main.main(["-mode", "infer", "--weights", str(weights), "--images", str(photo), "--output", str(out),
                      "--threshold", "0", "--nms", nms, "--image-size", str(size), "--device", "cpu",
                      *(["--tta", tta] if tta else [])]) == 0
    written = [{k: d[k] for k in ("category_id", "class_name", "score", "bbox")}
               for d in json.loads((out / "detections.json").read_text())]
    if (size, tta) != (512, None):
        predictor = Predictor.from_weights(weights, device="cpu", image_size=size, tta=tta)
    result = predictor.predict(photo, threshold=0, nms=nms)
    assert len(written) > 50 and as_json_fields(result) == written
    boxes = result["boxes"]
    assert boxes.dtype == torch.float32 and boxes.shape == (len(written), 4)
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()  # xyxy, not yxyx
    assert boxes[:, 2].max() <= 451 and boxes[:, 3].max() <= 300  # within the photo (451 wide, 300 high)
    assert result["scores"].tolist() == sorted(result["scores"].tolist(), reverse=True)
    assert result["labels"].dtype == torch.int64 and int(result["labels"].min()) >= 1  # COCO ids, 1..90
    assert written[2]["score"] > 0.021  # the best 3 pass threshold 0.02
    assert as_json_fields(predictor.predict(photo, threshold=0.02, nms=nms, max_detections=3)) == written[:3]


def test_a_list_of_mixed_sizes_equals_the_images_one_by_one(weights, predictor, photo):
    """Landscape, cropped and portrait images in one batch (each letterboxed on its own) vs one at a time. The
    fused network's kernels block the work differently at batch 3 than at 1, so scores differ by float
    rounding (measured 1.3e-6 to 2.4e-6): the same detections in the same order, within 1e-5 (scores) and
    1e-3 px (boxes)."""
    array = np.asarray(Image.open(photo).convert("RGB"))
    images = [array, np.ascontiguousarray(array[40:260, 60:400]), np.ascontiguousarray(array.transpose(1, 0, 2))]
    batched = Predictor.from_weights(weights, device="cpu", batch_size=3).predict(images, threshold=0.3)
    assert isinstance(batched, list) and len(batched) == len(images)
    for image, together in zip(images, batched):
        alone = predictor.predict(image, threshold=0.3)
        assert len(alone["scores"]) > 0 and alone["names"] == together["names"]
        assert torch.equal(alone["labels"], together["labels"])
        assert torch.allclose(alone["scores"], together["scores"], rtol=0, atol=1e-5)
        assert torch.allclose(alone["boxes"], together["boxes"], rtol=0, atol=1e-3)


def test_every_input_kind_gives_the_same_result(predictor, photo, tmp_path):
    """A path, a PIL image, an HxWx3 uint8 array, a CHW uint8 tensor and a CHW float tensor in [0, 1] (exactly
    the uint8 values / 255, which round back to them), one by one or as a tuple; a photo stored sideways with
    an EXIF orientation is detected upright, from its path and from the opened PIL image alike."""
    array = np.asarray(Image.open(photo).convert("RGB"))
    chw = torch.from_numpy(array.copy()).permute(2, 0, 1)
    expected = predictor.predict(array, threshold=0.3)
    assert len(expected["scores"]) > 0
    for kind in (photo, str(photo), Image.open(photo), chw, chw.float() / 255, chw.double() / 255):
        assert_same(predictor.predict(kind, threshold=0.3), expected)
    for result in predictor.predict((photo, chw), threshold=0.3):
        assert_same(result, expected)
    sideways = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(np.ascontiguousarray(np.rot90(array, 1))).save(sideways, quality=100, exif=exif)
    upright = np.asarray(Image.open(sideways).transpose(Image.Transpose.ROTATE_270))
    assert upright.shape == array.shape
    from_array = predictor.predict(upright, threshold=0.3)
    assert_same(predictor.predict(sideways, threshold=0.3), from_array)
    assert_same(predictor.predict(Image.open(sideways), threshold=0.3), from_array)


@pytest.mark.parametrize("inputs, kwargs, message", [
    (42, {}, "input: an int; expected a path, a PIL image, a uint8 numpy array [H, W, 3] (RGB), a tensor [3, H, W]"),
    (np.zeros((8, 8), np.uint8), {}, "input: a numpy array of dtype uint8 and shape [8, 8]; expected a uint8 numpy "
                                     "array [H, W, 3] (RGB)"),
    (np.zeros((8, 8, 3), np.float32), {}, "input: a numpy array of dtype float32 and shape [8, 8, 3]; expected"),
    (np.zeros((0, 8, 3), np.uint8), {}, "input: an empty image (0 x 8 pixels)"),
    (torch.zeros(8, 8, 3, dtype=torch.uint8), {}, "input: a tensor of dtype uint8 and shape [8, 8, 3]; expected a CHW "
                                                  "tensor [3, H, W]; an HWC tensor? use tensor.permute(2, 0, 1)"),
    (torch.zeros(2, 3, 8, 8), {}, "input: a tensor of dtype float32 and shape [2, 3, 8, 8]; expected a CHW tensor "
                                  "[3, H, W]; a batch? pass list(tensor)"),
    (torch.full((3, 8, 8), 255.0), {}, "input: a float tensor with values 255..255; expected values in [0, 1]"),
    (torch.full((3, 8, 8), float("nan")), {}, "input: a float tensor with values nan..nan; expected values in [0, 1]"),
    (torch.zeros(3, 8, 8, dtype=torch.int32), {}, "input: a tensor of dtype int32 and shape [3, 8, 8]; expected "
                                                  "uint8 (0..255) or a float dtype (0..1)"),
    ([np.zeros((8, 8, 3), np.uint8), None], {}, "inputs[1]: a NoneType; expected a path"),
    (["missing.png"], {}, "missing.png: missing (no such file)"),
    (np.zeros((8, 8, 3), np.uint8), {"threshold": 1.5}, "threshold 1.5: expected a number in [0, 1]"),
    (np.zeros((8, 8, 3), np.uint8), {"nms": "greedy"}, "nms 'greedy': expected one of 'hard', 'soft'"),
    (np.zeros((8, 8, 3), np.uint8), {"max_detections": 101}, "max_detections 101: expected an integer in [1, 100]"),
])
def test_bad_inputs_are_one_line_errors(predictor, inputs, kwargs, message):
    with pytest.raises((ValueError, TypeError)) as error:
        predictor.predict(inputs, **kwargs)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_bad_options_are_one_line_errors(weights):
    for options, message in (({"nms": "fast"}, "nms 'fast': expected one of 'hard', 'soft'"),
                             ({"batch_size": 0}, "batch_size 0: expected an integer >= 1"),
                             ({"backend": "tensorrt"}, "--backend tensorrt: expected one of torch, onnxruntime"),
                             ({"image_size": "512x"}, "image size '512x': expected an integer S")):
        with pytest.raises(ValueError) as error:
            Predictor.from_weights(weights, device="cpu", **options)
        assert str(error.value).startswith(message) and "\n" not in str(error.value), options


def _repo_weights_listing():
    folder = ROOT / "weights"
    return sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) if folder.is_dir() else None


def test_hub_predictor_true(weights, predictor, photo, tmp_path, monkeypatch):
    """`torch.hub.load(REPO, "efficientdet_d0", source="local", predictor=True, ...)`, with `pretrained=True`
    (the weights folder pointed at tmp_path: the repository's weights/ is neither read nor written) and with
    `weights=PATH`: a Predictor giving the same detections; its options pass through."""
    pretrained_file = tmp_path / "efficientdet-d0.pth"
    pretrained_file.write_bytes(weights.read_bytes())
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    before = _repo_weights_listing()
    expected = predictor.predict(photo, threshold=0.3)
    for source in ({"pretrained": True}, {"weights": str(weights)}):
        hub = torch.hub.load(str(ROOT), "efficientdet_d0", source="local", predictor=True, device="cpu",
                             nms="soft", **source)
        assert isinstance(hub, Predictor) and hub.image_size == (512, 512) and hub.nms == "soft"
        assert hub.class_names[0] == "person" and len(hub.class_names) == 90
        assert_same(hub.predict(photo, threshold=0.3, nms="hard"), expected)
    assert _repo_weights_listing() == before
    with pytest.raises(ValueError, match=re.escape("predictor=True needs weights=PATH or pretrained=True")):
        torch.hub.load(str(ROOT), "efficientdet_d0", source="local", predictor=True)
    with pytest.raises(TypeError, match="unexpected keyword"):
        torch.hub.load(str(ROOT), "efficientdet_d0", source="local", device="cpu")
