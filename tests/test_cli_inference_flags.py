"""Inference-side flags from the command line: `-mode infer|eval --precision bf16|fp16` and `--compile` reach
the network the detector runs; `-mode summary` reports the variant's parameters; `-mode export`'s flags reach
the exporter (the real `--dynamic-batch --with-nms` export of D0 is checked in tests/test_export.py).

`--compile` is checked without compiling (inductor takes minutes on a 2-core CPU): `torch.compile` is replaced
by a recorder that returns the module, so the test sees what would be compiled and that it runs."""
import json
import warnings

import pytest
import torch

import main
from eval.evaluator import Detector
from model import build_model
from model.cpu import describe, native_bf16, unsupported_precision
from model.inference import PRECISIONS, FusedEfficientDet, _CompileOrEager, prepare_for_inference
from model_helpers import tiny_shapes_run
from precision_helpers import UNIT_ROUNDOFF


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny inputs, one thread


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 6-image shapes dataset, D0 weights for it at 128 px (randomised BN and biases: varied scores), and a
    folder with one of its images."""
    folder = tmp_path_factory.mktemp("tiny")
    root, weights = tiny_shapes_run(folder, randomised=True)
    images = folder / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes((root / "val2017" / "000001.jpg").read_bytes())
    return root, weights, images


@pytest.fixture
def detectors(monkeypatch):
    """Every `Detector` built while the test runs (what -mode eval / infer run their images through)."""
    built = []
    real_init = Detector.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        built.append(self)
    monkeypatch.setattr(Detector, "__init__", init)
    return built


def _run(mode, tiny, output, *flags) -> int:
    root, weights, images = tiny
    if mode == "infer":
        argv = ["-mode", "infer", "--images", str(images), "--threshold", "0"]
    else:
        argv = ["-mode", "eval", "--data", str(root), "--workers", "0", "--max-images", "2", "--nms", "hard"]
    return main.main([*argv, "--weights", str(weights), "--output", str(output), "--device", "cpu", *flags])


def _result_file(mode, output):
    return output / ("detections.json" if mode == "infer" else "metrics_val.json")


# ---------------------------------------------------------------- --precision
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["infer", "eval"])
def test_precision_flag_reaches_the_network(tiny, tmp_path, detectors, mode, precision):
    reason = unsupported_precision(precision)
    if reason:
        pytest.skip(reason)
    assert _run(mode, tiny, tmp_path / "out", "--precision", precision) == 0
    assert len(detectors) == 1
    network = detectors[0].model
    assert isinstance(network, FusedEfficientDet) and network.dtype == PRECISIONS[precision]
    assert {b.dtype for b in network.buffers() if b.is_floating_point()} == {PRECISIONS[precision]}
    assert _result_file(mode, tmp_path / "out").is_file()


def test_infer_bf16_detections_are_fp32_ones_rounded(tiny, tmp_path):
    """The effect on what infer writes: scores changed by bf16 rounding, and by no more than that."""
    reason = unsupported_precision("bf16")
    if reason:
        pytest.skip(reason)
    found = {}
    for precision in ("fp32", "bf16"):
        assert _run("infer", tiny, tmp_path / precision, "--precision", precision) == 0
        found[precision] = json.loads((tmp_path / precision / "detections.json").read_text())
    # Robust to how a CPU's bf16 kernels round (tests/precision_helpers.py): the written scores differ (bf16
    # ran), and the best score moves by at most the largest score change, bounded by 32 bf16 roundoffs.
    assert found["bf16"] and [d["score"] for d in found["bf16"]] != [d["score"] for d in found["fp32"]]
    best = {p: max(d["score"] for d in dets) for p, dets in found.items()}
    assert abs(best["bf16"] - best["fp32"]) <= 32 * UNIT_ROUNDOFF["bf16"]


def test_precision_this_cpu_cannot_run_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    """fp16 on a CPU without oneDNN's fp16 kernels (this one, if `unsupported_precision` says so; else a CPU
    made to say so): the reason as the one error line, exit status 2, no detections written."""
    reason = unsupported_precision("fp16")
    if reason is None:
        reason = "precision fp16 is not supported on this CPU (simulated)"
        monkeypatch.setattr("model.inference.unsupported_precision",
                            lambda precision, device="cpu": None if precision == "fp32" else reason)
    assert _run("infer", tiny, tmp_path / "out", "--precision", "fp16") == 2
    assert capsys.readouterr().err == f"error: {reason}\n"
    assert not (tmp_path / "out" / "detections.json").exists()


@pytest.mark.parametrize("cap", [None, "avx512_core_vnni"])
def test_cpu_line_names_a_onednn_cap(monkeypatch, cap):
    """Benchmark tables name the CPU with `describe()`: under `ONEDNN_MAX_CPU_ISA` (oneDNN run as a lesser CPU
    would) the line must say so, since the hardware flags it prints no longer tell which kernels ran."""
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    line = describe()
    assert "AVX512-BF16 " in line and "\n" not in line
    assert line.endswith(", oneDNN capped at AVX512_CORE_VNNI") == (cap is not None)
    assert ("capped" in line) == (cap is not None)


@pytest.mark.parametrize("cap, flags, warned", [
    ("AVX512_CORE_VNNI", {"avx512f", "avx512_bf16"}, True),  # oneDNN run as a CPU without bf16 hardware would
    (None, {"avx512f"}, True),  # plain AVX512 (Xeons before Cooper Lake)
    (None, {"avx512f", "amx_bf16"}, False),
    (None, {"avx512f", "avx512_bf16"}, False),
    ("ALL", {"avx512f", "avx512_bf16"}, False),  # oneDNN's "no cap"
])
def test_bf16_without_bf16_hardware_is_a_one_line_warning(monkeypatch, cap, flags, warned):
    """bf16 where oneDNN has to emulate it runs slower than fp32 (0.62-0.78x measured, docs/cpu_kinds.md): the
    inference path (and the OpenVINO backend, through the same check) warns in one line naming the CPU or the
    cap; fp32 never warns. The CPU is a made-up x86 one, so that the test holds on any machine."""
    if unsupported_precision("bf16"):
        pytest.skip(unsupported_precision("bf16"))
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr("model.cpu._cpuinfo", lambda: {"model name": "Test CPU", "flags": " ".join(sorted(flags))})
    monkeypatch.setattr("model.cpu.platform.machine", lambda: "x86_64")
    model = build_model("efficientdet-d0", num_classes=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_for_inference(model, "fp32")
        prepare_for_inference(model, "bf16")
    found = [w for w in caught if str(w.message).startswith("precision bf16: ")]
    assert len(found) == (1 if warned else 0)
    if warned:
        message = str(found[0].message)
        assert message.startswith("precision bf16: oneDNN is capped at AVX512_CORE_VNNI (ONEDNN_MAX_CPU_ISA)"
                                  if cap else "precision bf16: this CPU (Test CPU) has no bf16 hardware")
        assert message.endswith("use fp32") and "\n" not in message
        assert found[0].filename == __file__  # reported at prepare_for_inference's caller


def test_bf16_is_not_judged_where_the_cpu_flags_cannot_be_read(monkeypatch):
    """No x86 flags in /proc/cpuinfo (another OS or architecture): no warning rather than a wrong one."""
    monkeypatch.setattr("model.cpu._cpuinfo", lambda: {})
    assert native_bf16()
    monkeypatch.setattr("model.cpu._cpuinfo", lambda: {"flags": "fp asimd bf16"})
    monkeypatch.setattr("model.cpu.platform.machine", lambda: "aarch64")
    assert native_bf16()


# ---------------------------------------------------------------- --compile
@pytest.mark.parametrize("mode", ["infer", "eval"])
def test_compile_flag_wraps_the_network_in_torch_compile(tiny, tmp_path, detectors, monkeypatch, mode):
    compiled, calls = [], []

    def fake_compile(module, **kwargs):
        compiled.append((module, kwargs))

        def run(images):
            calls.append(images.shape)
            return module(images)
        return run
    monkeypatch.setattr(torch, "compile", fake_compile)
    assert _run(mode, tiny, tmp_path / "out", "--compile") == 0
    network = detectors[0].model
    assert isinstance(network, _CompileOrEager) and isinstance(network.module, FusedEfficientDet)
    assert len(compiled) == 1 and compiled[0][0] is network.module
    assert compiled[0][1]["options"]["freezing"] is True
    assert calls and not network.failed  # the images went through the compiled callable
    assert _result_file(mode, tmp_path / "out").is_file()


def test_without_compile_flag_nothing_is_compiled(tiny, tmp_path, detectors, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: pytest.fail("torch.compile called"))
    assert _run("infer", tiny, tmp_path / "out") == 0
    assert isinstance(detectors[0].model, FusedEfficientDet)


# ---------------------------------------------------------------- -mode summary
@pytest.mark.parametrize("name", ["efficientdet-d0", "efficientdet-lite0"])
def test_summary_names_the_variant_and_counts_its_parameters(name, capsys):
    assert main.main(["-mode", "summary", "-model", name]) == 0
    header, row, *rest = capsys.readouterr().out.splitlines()
    assert not rest and header.split()[:3] == ["model", "image", "params"]
    cells = row.split()
    assert cells[0] == name
    assert int(cells[2].replace(",", "")) == sum(p.numel() for p in build_model(name).parameters())


# ---------------------------------------------------------------- -mode export
@pytest.mark.parametrize("flags, batch_size, with_nms", [
    ([], 1, False), (["--batch-size", "3"], 3, False), (["--dynamic-batch"], None, False),
    (["--with-nms"], 1, True), (["--dynamic-batch", "--with-nms"], None, True)])
def test_export_flags_reach_the_exporter(tiny, tmp_path, monkeypatch, flags, batch_size, with_nms):
    _, weights, _ = tiny
    seen = []

    def record(model, info, output, fmt, image_hw, batch, precision="fp32", nms=False, int8=None):
        seen.append((fmt, image_hw, batch, nms, int8))
        return output / "model.json"
    monkeypatch.setattr("deploy.cli.export_model", record)
    assert main.main(["-mode", "export", "--weights", str(weights), "--format", "onnx", "--output",
                      str(tmp_path / "x"), *flags]) == 0
    assert seen == [("onnx", (128, 128), batch_size, with_nms, None)]
