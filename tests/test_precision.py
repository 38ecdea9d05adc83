"""bf16 and fp16 against fp32 on the ported fixture weights (real BN statistics, the fixture photo), fused and
unfused, by criteria that hold however a CPU's kernels round (tests/precision_helpers.py): finite outputs
within a bound in units of the precision's unit roundoff, and every detection that fp32 decides by more
than the measured error is found. Non-finite outputs are an error in infer and eval, never an empty result.

The fp16 paths also run with ATen's generic kernels (the fused module's `F.conv2d` path, as on a GPU, and
autocast without oneDNN), so every CPU checks the fp16 arithmetic, not only those with oneDNN fp16 kernels.
"""
import copy
import json
import re
import subprocess
import sys

import pytest
import torch

import main
from conftest import ROOT, record_delta
from model import AnchorGenerator, flatten_outputs, fuse, inference
from model.cpu import unsupported_precision
from model.inference import FusedEfficientDet, check_finite, prepare_for_inference
from model_helpers import tiny_shapes_run
from precision_helpers import UNIT_ROUNDOFF, assert_close_in_roundoff, decided_detections
from utils.weights import load_weights, save_weights

DELTA_BOUND = 32  # the max |score change| Δ, in units of u (measured: bf16 12 u, fp16 9 u; a defect can raise it)


def _generic_fused(model, dtype):
    fused = FusedEfficientDet(model, dtype)

    def run(images):
        onednn = fuse._onednn
        fuse._onednn = lambda x: False
        try:
            return fused(images)
        finally:
            fuse._onednn = onednn
    return run


def _generic_unfused(model, dtype):
    def run(images):
        with torch.backends.mkldnn.flags(enabled=False), torch.autocast("cpu", dtype), torch.no_grad():
            return model(images)
    return run


# name -> (precision, build(model) -> callable, precision oneDNN must support or None for every CPU)
PATHS = {
    "bf16 fused": ("bf16", lambda m: prepare_for_inference(m, "bf16"), "bf16"),
    "bf16 unfused": ("bf16", lambda m: prepare_for_inference(m, "bf16", fuse=False), "bf16"),
    "fp16 fused": ("fp16", lambda m: prepare_for_inference(m, "fp16"), "fp16"),
    "fp16 unfused": ("fp16", lambda m: prepare_for_inference(m, "fp16", fuse=False), "fp16"),
    "fp16 fused, generic kernels": ("fp16", lambda m: _generic_fused(m, torch.float16), None),
    "fp16 unfused, generic kernels": ("fp16", lambda m: _generic_unfused(m, torch.float16), None),
}


def _skip_unless_supported(precision: str | None) -> None:
    reason = precision and unsupported_precision(precision)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def plain_outputs(ported, input_nchw):
    with torch.no_grad():
        return ported(input_nchw)


@pytest.fixture(scope="module")
def anchors(ported):
    return AnchorGenerator.from_config(ported.config)((512, 512))


@pytest.fixture(scope="module", params=list(PATHS))
def low(request, ported, input_nchw):
    """`(name, precision, outputs)` of one reduced-precision path on the fixture photo."""
    precision, build, needs = PATHS[request.param]
    _skip_unless_supported(needs)
    with torch.no_grad():
        return request.param, precision, build(ported)(input_nchw)


def test_outputs_are_finite_and_within_roundoff(low, plain_outputs):
    name, precision, outputs = low
    cls_err, box_err = assert_close_in_roundoff(outputs, plain_outputs, precision)
    u = UNIT_ROUNDOFF[precision]
    record_delta(f"{name} vs fp32, class logits (units of u)", torch.tensor(cls_err / u), 0.0, 4)
    record_delta(f"{name} vs fp32, box outputs (units of u)", torch.tensor(box_err / u), 0.0, 32)


def test_fp32_decided_detections_are_found(low, plain_outputs, anchors):
    name, precision, outputs = low
    assert all(bool(torch.isfinite(t).all()) for t in outputs[0] + outputs[1])
    decided, missed, delta = decided_detections(plain_outputs, outputs, anchors)
    u = UNIT_ROUNDOFF[precision]
    assert delta <= DELTA_BOUND * u, f"{name}: scores moved by up to {delta:.3g} = {delta / u:.1f} u"
    record_delta(f"{name}: max |score change| (units of u)", torch.tensor(delta / u), 0.0, DELTA_BOUND)
    assert missed == [], f"{name}: {len(missed)} of the {len(decided)} detections fp32 decides are lost"


def test_criteria_catch_real_defects(ported, input_nchw, plain_outputs, monkeypatch):
    """Each check fails on a real defect: the squeeze-excite mean as a plain fp16 sum (overflows at 512 px:
    every output NaN), and one BiFPN node that ignores its learned fusion weights (a bf16 path that dropped
    its fp32 scales), which moves the outputs by ~6 u / 60 u and the scores by ~85 u of bf16."""
    with monkeypatch.context() as patch:
        patch.setattr(inference, "spatial_mean", lambda flat: flat.sum(1).mul_(1.0 / flat.shape[1]))
        with torch.no_grad():
            overflowed = _generic_fused(ported, torch.float16)(input_nchw)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_in_roundoff(overflowed, plain_outputs, "fp16")
    with pytest.raises(RuntimeError, match="not finite"):
        check_finite(*overflowed, "fp16")

    defect = copy.deepcopy(ported)
    with torch.no_grad():
        defect.fpn.cells[0].nodes[4].edge_weights.fill_(1.0)
    precision = "bf16" if unsupported_precision("bf16") is None else "fp16"
    build = PATHS[f"{precision} fused" if precision == "bf16" else "fp16 fused, generic kernels"][1]
    with torch.no_grad():
        outputs = build(defect)(input_nchw)
    with pytest.raises(AssertionError, match="class logits|box outputs"):
        assert_close_in_roundoff(outputs, plain_outputs, precision)


def test_non_finite_outputs_are_an_error_in_infer_and_eval(tmp_path, capsys):
    """A network whose outputs hold NaN stops `-mode infer` and `-mode eval` with one line, not 0 detections."""
    root, weights = tiny_shapes_run(tmp_path, randomised=True)
    state, meta = load_weights(weights)
    state = {k: (v.fill_(float("nan")) if k.endswith("class_net.predict.conv_pw.bias") else v)
             for k, v in state.items()}
    broken = tmp_path / "nan.pth"
    save_weights(broken, state, **{k: meta[k] for k in ("model_name", "num_classes", "class_names",
                                                        "class_to_category")})
    image = sorted((root / "val2017").iterdir())[0]
    for argv in (["-mode", "infer", "--images", str(image), "--output", str(tmp_path / "infer")],
                 ["-mode", "eval", "--data", str(root), "--workers", "0", "--output", str(tmp_path / "eval")]):
        assert main.main([*argv, "--weights", str(broken), "--device", "cpu"]) == 2
        errors = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if "error" in line]
        assert len(errors) == 1  # besides the progress bar's redraws
        assert errors[0].startswith("error: the network's outputs are not finite (NaN or inf) at precision fp32")
    assert not (tmp_path / "infer" / "detections.json").exists()


@pytest.mark.parametrize("kernels", ["oneDNN", "generic"])
def test_fp16_infer_on_the_fixture_finds_fp32_detections(ported, input_nchw, plain_outputs, anchors, fixture_dir,
                                                         tmp_path, monkeypatch, kernels):
    """`-mode infer --precision fp16` on the fixture photo (it once wrote 0 detections: the squeeze-excite sum
    overflowed): fp32's decided detections are found, same class, IoU >= 0.5, score within Δ. With "generic",
    the fused network runs ATen's fp16 kernels on any CPU, in-process."""
    if kernels == "oneDNN":
        _skip_unless_supported("fp16")
        build = PATHS["fp16 fused"][1]
    else:
        monkeypatch.setattr(inference, "unsupported_precision", lambda precision, device: None)
        monkeypatch.setattr(fuse, "_onednn", lambda x: False)
        build = lambda m: FusedEfficientDet(m, torch.float16)  # noqa: E731 - _onednn is patched for the test
    weights = tmp_path / "d0.pth"
    subprocess.run([sys.executable, "-m", "utils.port_tf", "--model", "efficientdet-d0", "--checkpoint",
                    str(fixture_dir), "--output", str(weights)], cwd=ROOT, check=True, capture_output=True)
    found = {}
    for precision in ("fp32", "fp16"):
        out = tmp_path / precision
        assert main.main(["-mode", "infer", "--weights", str(weights), "--images", str(fixture_dir / "image.png"),
                          "--nms", "hard", "--threshold", "0", "--precision", precision, "--output", str(out),
                          "--device", "cpu"]) == 0
        found[precision] = json.loads((out / "detections.json").read_text())
    assert len(found["fp16"]) > 0 and len(found["fp32"]) > 0
    with torch.no_grad():
        fp16_outputs = build(ported)(input_nchw)
    decided, _, delta = decided_detections(plain_outputs, fp16_outputs, anchors)
    probs = torch.sigmoid(flatten_outputs(*plain_outputs)[0][0].double())  # [A, C]
    for a in decided:
        score, cls = (float(v) for v in probs[a].max(0))
        mine = [d for d in found["fp32"] if d["class"] == int(cls) and abs(d["score"] - score) <= 1e-4]
        if not mine:  # no area inside the photo: dropped by -mode infer in both precisions
            continue
        assert any(d["class"] == mine[0]["class"] and _iou(d["bbox"], mine[0]["bbox"]) >= 0.5
                   and abs(d["score"] - mine[0]["score"]) <= delta + 1e-4 for d in found["fp16"]), mine[0]


def _iou(a, b) -> float:
    """IoU of two COCO `[x, y, w, h]` boxes."""
    w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)
