"""INT8 post-training quantization (`-mode export --precision int8`, `deploy.quantize`) on both engines.

A tiny trained model: D0 for 2 shape classes at 256 px (OpenVINO's smallest size for D0), fitted from its
fresh initialisation with Adam for 100 training-mode steps to three generated images of large shapes, then
its BN statistics set to those of these images (so eval mode computes what training fitted). Its confident
detections (score >= 0.5) on those images are decided by margins far larger than any rounding, so the
criterion holds on every CPU: each of them must be found by the INT8 model (same class, IoU >= 0.5), on
ONNX Runtime (`quantize_static`) and OpenVINO (NNCF), through the same Predictor as fp32. Calibrated on the
generated images of the dataset's train folder. A calibration that cannot work (flat grey images: every
activation range collapses) loses them, so the criterion can fail.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import main
from data.transforms import preprocess_for_eval
from deploy.sidecar import read_sidecar
from eval.predictor import Predictor
from model import AnchorGenerator, build_model
from train.assign import TargetAssigner
from train.loss import detection_loss
from utils.weights import save_weights

SIZE = 256
STEPS = 100  # ~30 s on 2 cores; the 9 objects then score 0.85-0.97, anything else <= 0.06


def _shapes_image(rng: np.random.Generator) -> tuple[Image.Image, list[list[float]], list[int]]:
    """A SIZE x SIZE photo-like background (smooth colour noise and grain) with 2-3 large filled shapes, ellipses
    (class 0) and rectangles (class 1) of 60-120 px, not overlapping: (image, xyxy boxes, classes). Large
    objects keep the criterion's IoU away from its threshold (a 3 px shift costs a 24 px box 0.2 IoU)."""
    coarse = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((SIZE, SIZE), Image.BICUBIC)
    image = Image.fromarray(np.clip(np.asarray(coarse, np.int16) + rng.integers(-12, 13, (SIZE, SIZE, 3)), 0,
                                    255).astype(np.uint8))
    draw, boxes, classes = ImageDraw.Draw(image), [], []
    for _ in range(50):
        if len(boxes) == 3:
            break
        w, h = rng.integers(60, 121, 2)
        x, y = rng.integers(0, SIZE - w), rng.integers(0, SIZE - h)
        box = [float(x), float(y), float(x + w), float(y + h)]
        if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
            continue
        kind = int(rng.integers(0, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if kind == 0 else draw.rectangle)([box[0], box[1], box[2] - 1, box[3] - 1], fill=colour)
        boxes.append(box)
        classes.append(kind)
    return image, boxes, classes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(weights, folder of the 3 images it was fitted to, folder of 8 other generated calibration images)."""
    folder = tmp_path_factory.mktemp("int8")
    rng = np.random.default_rng(0)
    fitted, calibration = folder / "fitted", folder / "calibration"
    fitted.mkdir()
    calibration.mkdir()
    gts = []
    for i in range(3):
        image, boxes, classes = _shapes_image(rng)
        image.save(fitted / f"{i}.png")
        gts.append((boxes, classes))
    for i in range(8):
        _shapes_image(rng)[0].save(calibration / f"{i}.png")
    torch.manual_seed(0)
    model = build_model("efficientdet-d0", num_classes=2).train()
    images = torch.stack([preprocess_for_eval(np.asarray(Image.open(fitted / f"{i}.png")), SIZE,
                                              model.config.mean_rgb, model.config.stddev_rgb)[0] for i in range(3)])
    boxes = torch.zeros(3, 3, 4)
    classes = torch.full((3, 3), -1)
    for i, (b, c) in enumerate(gts):
        boxes[i, :len(b)] = torch.tensor(b)[:, [1, 0, 3, 2]]  # yxyx
        classes[i, :len(c)] = torch.tensor(c)
    targets = TargetAssigner.from_generator(AnchorGenerator.from_config(model.config), (SIZE, SIZE),
                                            method="atss")(boxes, classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(STEPS):
        loss = detection_loss(*model(images), *targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:  # BN statistics of the fitted images, so that eval mode computes what training fitted
        bn.reset_running_stats()
        bn.momentum = None  # cumulative: one pass gives the batch's statistics
    with torch.no_grad():
        model(images)
    for bn in bns:
        bn.momentum = 0.01
    weights = folder / "tiny.pth"
    save_weights(weights, model.state_dict(), model_name="efficientdet-d0", num_classes=2,
                 class_names=["ellipse", "rectangle"], class_to_category=[1, 2], image_size=SIZE)
    return weights, fitted, calibration


def _export(weights: Path, fmt: str, calibration: Path, output: Path) -> dict:
    assert main.main(["-mode", "export", "--weights", str(weights), "--format", fmt, "--precision", "int8",
                      "--calibration-images", str(calibration), "--dynamic-batch", "--output", str(output)]) == 0
    return read_sidecar(output)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box `a` [4] with boxes `b` [K, 4], xyxy."""
    lo, hi = np.maximum(a[:2], b[:, :2]), np.minimum(a[2:], b[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = lambda x: np.prod(x[..., 2:] - x[..., :2], axis=-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _lost(reference: list[dict], found: list[dict]) -> list[tuple[int, int, float]]:
    """(image, label, score) of each reference detection of score >= 0.5 that `found` has no detection of the same
    class at IoU >= 0.5 for."""
    lost = []
    for i, (ref, got) in enumerate(zip(reference, found)):
        boxes, labels = np.asarray(got["boxes"], np.float64), np.asarray(got["labels"])
        for box, score, label in zip(np.asarray(ref["boxes"], np.float64), ref["scores"], ref["labels"]):
            same = labels == int(label)
            if score >= 0.5 and not (same.any() and _iou(box, boxes[same]).max() >= 0.5):
                lost.append((i, int(label), round(float(score), 3)))
    return lost


@pytest.fixture(scope="module")
def fp32(trained):
    weights, images, _ = trained
    files = sorted(str(p) for p in images.glob("*.png"))
    found = Predictor.from_weights(weights, device="cpu").predict(files, threshold=0.0)
    decided = sum(int((r["scores"] >= 0.5).sum()) for r in found)
    assert decided >= 3, f"the tiny model should be trained: {decided} detections of score >= 0.5"
    return files, found


@pytest.mark.parametrize("backend, fmt", [("onnxruntime", "onnx"), ("openvino", "openvino")])
def test_int8_export_finds_the_confident_fp32_detections(trained, fp32, tmp_path, backend, fmt):
    weights, _, calibration = trained
    files, reference = fp32
    sidecar = _export(weights, fmt, calibration, tmp_path / fmt)
    assert sidecar["precision"] == "int8" and sidecar["quantization"]["calibration_images"] == 8
    predictor = Predictor.from_weights(weights, backend=backend, exported=tmp_path / fmt, precision="int8")
    assert _lost(reference, predictor.predict(files, threshold=0.0)) == []
    if fmt == "onnx":  # the weights are stored as int8 (QDQ), not float
        import onnx
        model = onnx.load(str(tmp_path / fmt / "model.onnx"))
        int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
        assert len(int8) >= 100
    else:
        import openvino as ov
        ops = [op.get_type_name() for op in ov.Core().read_model(str(tmp_path / fmt / "model.xml")).get_ops()]
        assert ops.count("FakeQuantize") >= 100


def test_a_collapsed_calibration_fails_the_criterion(trained, fp32, tmp_path):
    """Calibrated on flat grey images, the activation ranges are those of a blank input: the INT8 model then
    loses confident detections, which the criterion above catches."""
    weights, _, _ = trained
    files, reference = fp32
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(4):
        Image.fromarray(np.full((SIZE, SIZE, 3), 120 + i, np.uint8)).save(grey / f"{i}.png")
    _export(weights, "onnx", grey, tmp_path / "onnx")
    predictor = Predictor.from_weights(weights, backend="onnxruntime", exported=tmp_path / "onnx", precision="int8")
    assert _lost(reference, predictor.predict(files, threshold=0.0))


def _error(argv: list[str], capsys) -> str:
    assert main.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("case, message", [
    ("missing", "error: --calibration-images {dir}: not a folder"),
    ("empty", "error: --calibration-images {dir}: no image files in this folder"),
    ("broken", "error: {dir}/0.jpg: cannot decode"),
    ("none", "error: --precision int8: needs --calibration-images DIR"),
])
def test_bad_calibration_is_one_line_and_writes_nothing(trained, tmp_path, capsys, case, message):
    weights = trained[0]
    folder = tmp_path / "calibration"
    if case != "missing":
        folder.mkdir()
    if case == "broken":
        (folder / "0.jpg").write_bytes(b"not a jpeg")
    flags = [] if case == "none" else ["--calibration-images", str(folder)]
    err = _error(["-mode", "export", "--weights", str(weights), "--format", "onnx", "--precision", "int8", *flags,
                  "--output", str(tmp_path / "out")], capsys)
    assert err.startswith(message.format(dir=folder)), err
    assert not (tmp_path / "out" / "model.json").exists() and not (tmp_path / "out" / "model.onnx").exists()


def test_int8_refusals_are_one_line(trained, tmp_path, capsys, monkeypatch):
    weights, images, calibration = trained
    base = ["--weights", str(weights)]
    # a size the engine refuses: OpenVINO's max-pool needs D0 inputs of >= 256 px
    err = _error(["-mode", "export", *base, "--format", "openvino", "--precision", "int8", "--image-size", "128",
                  "--calibration-images", str(calibration), "--output", str(tmp_path / "x")], capsys)
    assert err.startswith("error: --image-size: height 128, width 128 with --format openvino")
    # the quantization tool missing
    import deploy.export
    real = deploy.export.importlib.import_module

    def no_nncf(name, *args):
        if name == "nncf":
            raise ImportError("No module named 'nncf'")
        return real(name, *args)
    monkeypatch.setattr(deploy.export.importlib, "import_module", no_nncf)
    err = _error(["-mode", "export", *base, "--format", "openvino", "--precision", "int8", "--calibration-images",
                  str(calibration), "--output", str(tmp_path / "x")], capsys)
    assert err.startswith("error: --precision int8 --format openvino needs the 'nncf' package")
    monkeypatch.undo()
    assert not (tmp_path / "x").exists()
    # inference: int8 is an engine's; an fp32 export is not an INT8 one; an INT8 run needs a model to run
    infer = ["-mode", "infer", *base, "--images", str(images), "--output", str(tmp_path / "out")]
    err = _error([*infer, "--precision", "int8"], capsys)
    assert err.startswith("error: --precision int8: only used with --backend onnxruntime or openvino")
    err = _error([*infer, "--precision", "int8", "--backend", "onnxruntime"], capsys)
    assert err.startswith("error: --precision int8 with --backend onnxruntime: needs --exported DIR")
    assert main.main(["-mode", "export", *base, "--format", "onnx", "--output", str(tmp_path / "fp32")]) == 0
    capsys.readouterr()
    err = _error([*infer, "--precision", "int8", "--backend", "onnxruntime", "--exported", str(tmp_path / "fp32")],
                 capsys)
    assert err.startswith(f"error: --precision int8 with --backend onnxruntime: {tmp_path / 'fp32'} is a fp32 export")
    assert not (tmp_path / "out").exists()


def test_calibrating_on_the_fly_caches_the_int8_model(trained, tmp_path, capsys, monkeypatch):
    """`--precision int8 --calibration-images DIR` without --exported: quantized once into runs/export-cache/
    (the sidecar says int8 and how many images), reused by the next run."""
    weights, images, calibration = trained
    monkeypatch.chdir(tmp_path)
    argv = ["-mode", "infer", "--weights", str(weights), "--images", str(images), "--backend", "onnxruntime",
            "--precision", "int8", "--calibration-images", str(calibration), "--calibration-count", "4"]
    assert main.main([*argv, "--output", "a"]) == 0
    assert "exporting efficientdet-d0" in capsys.readouterr().out
    assert main.main([*argv, "--output", "b"]) == 0
    assert "exporting" not in capsys.readouterr().out
    (cached,) = (tmp_path / "runs" / "export-cache").iterdir()
    sidecar = read_sidecar(cached)
    assert sidecar["precision"] == "int8" and sidecar["quantization"]["calibration_images"] == 4
    assert json.loads((tmp_path / "a" / "detections.json").read_text()) == \
        json.loads((tmp_path / "b" / "detections.json").read_text())
    err = _error(argv[:8] + ["--exported", str(cached), "--output", "c"], capsys)  # the INT8 model run as fp32
    assert err.startswith(f"error: --exported {cached}: an INT8 export; run it with --precision int8")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("count, batch, batches", [(3, None, 3), (3, 8, 1), (10, 4, 3)])
def test_calibration_batches_fill_a_fixed_batch(tmp_path, count, batch, batches):
    """Calibration images are preprocessed as inference does and come in batches of the export's size (the last
    one filled up with the first images, however few there are)."""
    from deploy.quantize import CalibrationBatches, calibration_files
    for i in range(count):
        Image.fromarray(np.full((40, 60, 3), 10 * i, np.uint8)).save(tmp_path / f"{i}.png")
    files = calibration_files(tmp_path, 300)
    assert len(files) == count
    data = CalibrationBatches(files, (64, 64), 127.0, 128.0, batch)
    arrays = list(data)
    assert len(arrays) == len(data) == batches
    assert all(a.shape == (batch or 1, 3, 64, 64) and a.dtype == np.float32 for a in arrays)
    expected = preprocess_for_eval(np.full((40, 60, 3), 0, np.uint8), 64, 127.0, 128.0)[0].numpy()
    assert np.array_equal(arrays[0][0], expected)
