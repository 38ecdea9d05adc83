"""Export (ONNX, OpenVINO IR, JSON sidecar) and the inference backends: the exported networks compute what
our plain model computes (ported TF fixture weights), `--with-nms` finds our infer path's detections, eval
through ONNX Runtime gives torch's COCO numbers, and bad requests fail with one clear line."""
import importlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

import main
from conftest import record_delta
from model_helpers import randomise_, tiny_shapes_run
from precision_helpers import UNIT_ROUNDOFF, assert_close_in_roundoff, decided_detections, relative_errors
from deploy.backends import OnnxRuntimeNetwork, OpenVinoNetwork, open_backend
from deploy.export import export_model, onnx_to_openvino
from deploy.sidecar import make_sidecar, read_sidecar
from model import AnchorGenerator, build_model
from model.postprocess import postprocess
from model.cpu import unsupported_precision
from utils.weights import detector_from_weights, save_weights

# Exported fp32 outputs vs our plain fp32 model, as norm-wise relative errors (class logits, box outputs) in
# units of float32's unit roundoff u = 2^-24. Measured on the D0 fixture photo (AMD EPYC): OpenVINO 5 u / 31 u
# (as our fused path: 5 u / 28 u), ONNX Runtime 31 u / 284 u (its CPU kernels round differently: max |delta|
# 1.2e-4 on logits of magnitude ~10). Bounds ~4x ONNX Runtime's; a lost bias or wrong fold is >= 1e5 u.
ENGINE_FP32_BOUND = (128.0, 1024.0)
FIXTURE_INFO = {"model_name": "efficientdet-d0", "num_classes": 90, "class_names": None,
                "class_to_category": None, "source": "tf_reference_d0"}


@pytest.fixture(scope="module")
def photos(input_nchw):
    """The fixture photo and its mirror image: a batch of two different 512 px inputs."""
    return torch.cat([input_nchw, input_nchw.flip(3)])


@pytest.fixture(scope="module")
def plain(ported, photos):
    with torch.no_grad():
        return ported(photos)


@pytest.fixture(scope="module")
def d0(ported, tmp_path_factory):
    """D0 with the ported fixture weights at 512 px: an ONNX export with batch 1, and the OpenVINO IR
    converted from it (as `--format openvino` does); `(folder, onnx sidecar, openvino sidecar)`."""
    folder = tmp_path_factory.mktemp("d0")
    export_model(ported, FIXTURE_INFO, folder / "onnx", "onnx", (512, 512), batch_size=1)
    (folder / "openvino").mkdir()
    onnx_to_openvino(folder / "onnx" / "model.onnx", folder / "openvino")
    ov_sidecar = make_sidecar(ported.config, FIXTURE_INFO, "openvino", "model.xml", (512, 512), 1, "fp32", False, 18)
    return folder, read_sidecar(folder / "onnx"), ov_sidecar


def _assert_fp32_engine_close(name: str, outputs, reference) -> None:
    u = UNIT_ROUNDOFF["fp32"]
    for head, error, bound in zip(("class logits", "box outputs"), relative_errors(outputs, reference),
                                  ENGINE_FP32_BOUND):
        record_delta(f"{name} vs plain, {head} (units of u)", torch.tensor(error / u), 0.0, bound)
        assert error <= bound * u, f"{name} {head}: {error:.2e} = {error / u:.0f} u"


def test_onnxruntime_fp32_equals_plain(d0, photos, plain):
    """Batch 1 export, batch 2 input: run image by image, each as the plain model computes it."""
    folder, sidecar, _ = d0
    _assert_fp32_engine_close("ONNX Runtime fp32, D0 fixture", OnnxRuntimeNetwork(folder / "onnx", sidecar)(photos),
                              plain)


def test_openvino_fp32_equals_plain(d0, photos, plain):
    folder, _, ov_sidecar = d0
    _assert_fp32_engine_close("OpenVINO fp32, D0 fixture", OpenVinoNetwork(folder / "openvino", ov_sidecar)(photos),
                              plain)


def _detections(outputs, image_hw=(512, 512)):
    anchors = AnchorGenerator.from_config(build_model("efficientdet-d0").config)(image_hw)
    return postprocess(*outputs, anchors, torch.ones(len(outputs[0][0])), image_hw, "infer", "hard")


def test_openvino_bf16_is_close_and_keeps_the_decided_detections(d0, photos, plain):
    """The criteria of the torch bf16 paths (tests/test_precision.py), which hold however OpenVINO's CPU plugin
    picks its kernels: outputs within bf16's roundoff bounds, and every detection that fp32 decides by more
    than the measured score error is found."""
    reason = unsupported_precision("bf16")
    if reason:
        pytest.skip(reason)
    folder, _, ov_sidecar = d0
    reference = ([c[:1] for c in plain[0]], [b[:1] for b in plain[1]])
    bf16 = OpenVinoNetwork(folder / "openvino", ov_sidecar, "bf16")(photos[:1])
    assert_close_in_roundoff(bf16, reference, "bf16")
    anchors = AnchorGenerator.from_config(build_model("efficientdet-d0").config)((512, 512))
    decided, missed, delta = decided_detections(reference, bf16, anchors)
    assert delta <= 32 * UNIT_ROUNDOFF["bf16"] and missed == [], (delta, len(decided), missed)


def test_onnxruntime_refuses_bf16(d0):
    folder, sidecar, _ = d0
    with pytest.raises(ValueError, match="^--precision bf16 with --backend onnxruntime: .*use --backend openvino"):
        OnnxRuntimeNetwork(folder / "onnx", sidecar, "bf16")


def _assert_equal_detections(outputs, expected):
    """Exported `(boxes, scores, classes, num_valid)` vs our `Detections`: same count and classes in the same
    order, scores within float noise, boxes within 0.05 px."""
    boxes, scores, classes, num_valid = (np.asarray(o) for o in outputs)
    assert np.array_equal(num_valid, expected.num_valid.numpy()) and num_valid.min() > 0
    assert np.array_equal(classes, expected.classes.numpy())
    assert np.abs(scores - expected.scores.numpy()).max() <= 1e-4
    assert np.abs(boxes - expected.boxes.numpy()).max() <= 0.05


def test_with_nms_detections_equal_our_infer_path(ported, photos, plain, tmp_path):
    """`-mode export --dynamic-batch --with-nms` of the fixture weights: a symbolic batch axis, the four NMS
    outputs and a sidecar saying so; ONNX Runtime (at batch 1 and 2) and OpenVINO run decoding +
    NonMaxSuppression to the detections of `postprocess(mode="infer", method="hard")` on the plain outputs."""
    import onnx
    import onnxruntime as ort
    import openvino as ov
    weights = tmp_path / "d0.pth"
    save_weights(weights, ported.state_dict(), **{k: v for k, v in FIXTURE_INFO.items() if k != "source"})
    assert main.main(["-mode", "export", "--weights", str(weights), "--format", "onnx", "--image-size", "512",
                      "--dynamic-batch", "--with-nms", "--output", str(tmp_path / "nms")]) == 0
    folder = tmp_path / "nms"
    graph = onnx.load(str(folder / "model.onnx")).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # dynamic
    assert [d.dim_value for d in dims[1:]] == [3, 512, 512]
    assert [o.name for o in graph.output] == ["boxes", "scores", "classes", "num_valid"]
    sidecar = read_sidecar(folder)
    assert sidecar["with_nms"] and sidecar["input"]["batch"] == "dynamic"
    assert [o["name"] for o in sidecar["outputs"]] == ["boxes", "scores", "classes", "num_valid"]
    expected = _detections(plain)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    _assert_equal_detections(session.run(None, {"images": photos.numpy()}), expected)
    first = _detections(([c[:1] for c in plain[0]], [b[:1] for b in plain[1]]))
    _assert_equal_detections(session.run(None, {"images": photos[:1].numpy()}), first)
    compiled = ov.Core().compile_model(str(folder / "model.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    results = compiled(photos.numpy())
    _assert_equal_detections([results[out] for out in compiled.outputs], expected)
    with pytest.raises(ValueError, match="exported --with-nms"):
        OnnxRuntimeNetwork(folder, sidecar)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 6-image shapes dataset and D0 weights for its classes at 128 px (randomised BN and biases)."""
    return tiny_shapes_run(tmp_path_factory.mktemp("tiny"), randomised=True)


def test_export_cli_openvino_d1_and_sidecar_round_trip(tmp_path, capsys):
    """D1 at 256 px through `-mode export --format openvino --batch-size 2`: the sidecar read back is the
    one made from the config and weights, with the config's preprocessing constants and anchors; OpenVINO
    outputs equal the plain model's."""
    torch.manual_seed(0)
    model = randomise_(build_model("efficientdet-d1", num_classes=3))
    weights = tmp_path / "d1.pth"
    save_weights(weights, model.state_dict(), model_name="efficientdet-d1", num_classes=3,
                 class_names=["ring", "star", "box"], class_to_category=[1, 5, 9])
    out = tmp_path / "d1"
    assert main.main(["-mode", "export", "--weights", str(weights), "--format", "openvino", "--image-size", "256",
                      "--batch-size", "2", "--output", str(out)]) == 0
    assert "exported efficientdet-d1" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["model.bin", "model.json", "model.xml"]
    sidecar = read_sidecar(out)
    _, info = detector_from_weights(weights)
    assert sidecar == json.loads(json.dumps(make_sidecar(model.config, info, "openvino", "model.xml", (256, 256), 2,
                                                         "fp32", False, 18)))
    assert sidecar["preprocessing"]["mean_rgb"] == pytest.approx(list(model.config.mean_rgb))
    assert sidecar["preprocessing"]["stddev_rgb"] == pytest.approx(list(model.config.stddev_rgb))
    assert sidecar["classes"] == [{"index": 0, "id": 1, "name": "ring"}, {"index": 1, "id": 5, "name": "star"},
                                  {"index": 2, "id": 9, "name": "box"}]
    a = sidecar["anchors"]
    rebuilt = AnchorGenerator(a["min_level"], a["max_level"], a["num_scales"], a["aspect_ratios"], a["anchor_scale"])
    assert torch.equal(rebuilt((256, 256)), AnchorGenerator.from_config(model.config)((256, 256)))
    images = torch.randn(3, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(images)
    assert [o["shape"] for o in sidecar["outputs"]] == [[2, *t.shape[1:]] for t in expected[0] + expected[1]]
    _assert_fp32_engine_close("OpenVINO IR fp32, D1 256 random", OpenVinoNetwork(out, sidecar)(images),
                              expected)  # 3 images: chunks of 2, last padded
    # -mode infer runs that folder (--exported) through our pre- and post-processing, as the torch backend does
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    found = {}
    for backend in ("torch", "openvino"):
        flags = ["--backend", backend] + (["--exported", str(out)] if backend != "torch" else [])
        assert main.main(["-mode", "infer", "--weights", str(weights), "--image-size", "256", "--threshold", "0",
                          "--images", str(tmp_path / "a.png"), "--output", str(tmp_path / backend), *flags]) == 0
        found[backend] = json.loads((tmp_path / backend / "detections.json").read_text())
    assert len(found["openvino"]) == len(found["torch"]) > 0
    best = [max(found[b], key=lambda d: d["score"]) for b in ("torch", "openvino")]
    assert best[0]["class_name"] == best[1]["class_name"] and abs(best[0]["score"] - best[1]["score"]) <= 1e-4
    assert np.abs(np.subtract(best[0]["bbox"], best[1]["bbox"])).max() <= 0.05


def test_mbconv_block_traces(tmp_path):
    """torch.jit.trace records with autograd on and checks its trace with autograd off: the block must run
    one op sequence in both (it used to fail: "Graphs differed across invocations")."""
    torch.manual_seed(0)
    block = randomise_(build_model("efficientdet-d0")).backbone.blocks[1]
    x = torch.randn(1, 16, 64, 48)
    traced = torch.jit.trace(block, x)  # check_trace=True by default
    with torch.no_grad():
        assert torch.allclose(traced(x), block(x), atol=1e-5)


def test_eval_through_onnxruntime_gives_torch_numbers(tiny, tmp_path, monkeypatch, capsys):
    """The same COCO numbers and detections; the export is made once into runs/export-cache/ and reused.

    Random weights score every box alike, so the dataset's own shapes would give AP ~0, where a swap of two
    near-equal scores moves the numbers. The ground truth is instead the torch backend's three best
    detections per image: a high AP that float noise cannot move."""
    root, weights = tiny
    monkeypatch.chdir(tmp_path)

    def evaluate(backend, ann):
        out = tmp_path / f"{backend}-{ann.stem}"
        assert main.main(["-mode", "eval", "--weights", str(weights), "--data", str(root), "--workers", "0",
                          "--output", str(out), "--backend", backend, "--val-ann", str(ann)]) == 0
        return [json.loads((out / f"{name}_val.json").read_text()) for name in ("metrics", "detections")]

    ann = root / "annotations" / "instances_val2017.json"
    _, found = evaluate("torch", ann)
    dataset = json.loads(ann.read_text())
    best = [d for i in {d["image_id"] for d in found}
            for d in sorted((d for d in found if d["image_id"] == i), key=lambda d: -d["score"])[:3]]
    dataset["annotations"] = [{"id": k + 1, "image_id": d["image_id"], "category_id": d["category_id"],
                               "bbox": d["bbox"], "area": d["bbox"][2] * d["bbox"][3], "iscrowd": 0}
                              for k, d in enumerate(best)]
    ann = tmp_path / "torch_top3.json"
    ann.write_text(json.dumps(dataset))
    (torch_metrics, torch_dets), (ort_metrics, ort_dets) = evaluate("torch", ann), evaluate("onnxruntime", ann)
    assert "exporting efficientdet-d0" in capsys.readouterr().out
    assert torch_metrics["stats"]["AP"] > 0.3 and len(ort_dets) == len(torch_dets)
    for name, value in torch_metrics["stats"].items():
        assert ort_metrics["stats"][name] == pytest.approx(value, abs=1e-3), name
    for i in {d["image_id"] for d in torch_dets}:  # each image's leaders (its ground truth) are the same
        leaders = [sorted((d for d in dets if d["image_id"] == i), key=lambda d: -d["score"])[:3]
                   for dets in (torch_dets, ort_dets)]
        for a, b in zip(*leaders):
            assert a["category_id"] == b["category_id"] and abs(a["score"] - b["score"]) <= 1e-4
            assert np.abs(np.subtract(a["bbox"], b["bbox"])).max() <= 0.05
    _, info = detector_from_weights(weights)
    assert open_backend("onnxruntime", None, {**info, "image_size": 128}, (128, 128)) is not None
    assert "exporting" not in capsys.readouterr().out  # the cached export is reused


@pytest.mark.parametrize("flags, message", [
    (["--format", "onnx", "--image-size", "640x64"],
     "error: --image-size: input height 64, width 640 is not supported by the official network"),
    (["--format", "openvino", "--image-size", "128"],
     "error: --image-size: height 128, width 128 with --format openvino: P6 is 2 px, too small for OpenVINO's"),
    (["--format", "onnx", "--precision", "bf16"], "error: --precision bf16 with --format onnx: ONNX Runtime has "
                                                  "no bf16 CPU kernels"),
])
def test_export_refusals_are_one_clear_line(tiny, tmp_path, capsys, flags, message):
    _, weights = tiny
    assert main.main(["-mode", "export", "--weights", str(weights), "--output", str(tmp_path / "x"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "x" / "model.json").exists()


def test_bad_format_is_a_usage_error(tiny, tmp_path, capsys):
    _, weights = tiny
    with pytest.raises(SystemExit) as exit_info:
        main.main(["-mode", "export", "--weights", str(weights), "--format", "tflite", "--output", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "argument --format: invalid choice: 'tflite'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, package", [
    (["-mode", "export", "--format", "openvino", "--output", "{tmp}/x"], "openvino"),
    (["-mode", "export", "--format", "onnx", "--output", "{tmp}/x"], "onnxscript"),
    (["-mode", "eval", "--backend", "onnxruntime", "--data", "{root}", "--workers", "0"], "onnxruntime"),
])
def test_missing_runtime_is_one_clear_line(tiny, tmp_path, capsys, monkeypatch, argv, package):
    root, weights = tiny
    real_import = importlib.import_module

    def fail(name, *args):
        if name == package:
            raise ImportError(f"No module named '{package}'")
        return real_import(name, *args)
    monkeypatch.setattr("deploy.export.importlib.import_module", fail)
    monkeypatch.chdir(tmp_path)
    argv = [a.format(tmp=tmp_path, root=root) for a in argv] + ["--weights", str(weights)]
    assert main.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --{'backend' if 'eval' in argv else 'format'} ") and err.count("\n") == 1
    assert f"needs the '{package}' package" in err and "pip install -r requirements.txt" in err
