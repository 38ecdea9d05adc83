"""Post-training static INT8 quantization of the plain network with NNCF (`nncf.quantize`), for both engines.

* `--format openvino`: NNCF on the OpenVINO model converted from our ONNX export; the CPU plugin runs its
  FakeQuantize nodes as int8 kernels, what NNCF leaves alone at the compile hint (f32).
* `--format onnx`: NNCF's ONNX backend on the ONNX export: QuantizeLinear / DequantizeLinear pairs (QDQ) that
  ONNX Runtime runs as int8 kernels. ONNX Runtime's own `quantize_static` (QDQ, MinMax) was measured and not
  shipped: on the 12-epoch shapes D0 it costs 27 AP points where NNCF's ONNX model gains (docs/deploy.md).
* Options (`Int8Options`): `preset` "mixed" (NNCF's default: symmetric weights, asymmetric activations) or
  "performance" (symmetric both); bias correction "fast" (NNCF's default) or "full" (OpenVINO only: it fails
  on NNCF's ONNX backend for this network; on the shapes D0 and Lite0 it measured no better); `keep_float`
  (default: `default_keep_float`).

Calibration (`CalibrationBatches`): the images of a folder, preprocessed exactly as `-mode infer` does it
(`data.transforms.preprocess_for_eval`: the model's normalisation, aspect-preserving resize, zero padding),
`count` of them spread evenly over the sorted file list, in batches of the export's batch size (a fixed batch
is filled up by repeating the first images; a dynamic one takes batch 1). Use training images, never the
images the model is evaluated on.

`keep_float` names groups of layers to leave unquantized (NNCF's ignored scope), found by the module path
that the exporter records on each ONNX node: "class-out" / "box-out" (the heads' last separable conv), "se"
(squeeze-excite), "fusion" (the BiFPN nodes' weighted sums), "depthwise" (every depthwise conv).
"""
from __future__ import annotations

import ast
import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.formats import IMAGE_SUFFIXES, image_files

DEFAULT_CALIBRATION_COUNT = 300
PRESETS = ("mixed", "performance")
BIAS_CORRECTIONS = ("full", "fast")
KEEP_FLOAT = ("class-out", "box-out", "se", "fusion", "depthwise")
_SCOPE = {"class-out": r"class_net\.predict\.", "box-out": r"box_net\.predict\.", "se": r"\.se(\.|$)",
          "fusion": r"^fpn\.cells\.\d+\.nodes\.\d+$"}


def calibration_files(folder: str | Path, count: int, flag: str = "--calibration-images") -> list[Path]:
    """`count` image files of `folder` (recursively, sorted), evenly spread over the list; one-line errors for
    a missing or empty folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {folder}: not a folder; expected a folder of calibration images "
                                f"(training images, {', '.join(IMAGE_SUFFIXES)})")
    files = image_files(folder)
    if not files:
        raise ValueError(f"{flag} {folder}: no image files in this folder ({', '.join(IMAGE_SUFFIXES)})")
    if count < 1:
        raise ValueError(f"--calibration-count {count}: expected at least 1")
    picks = np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int)
    return [files[i] for i in picks]


class CalibrationBatches:
    """Float32 `[B, 3, H, W]` batches of the preprocessed `files` (B = batch_size, or 1 for a dynamic batch),
    read anew on each pass (the tools take several; a D7 set of 300 images would not fit in memory)."""

    def __init__(self, files: list[Path], image_hw: tuple[int, int], mean_rgb, stddev_rgb, batch_size: int | None):
        self.step = batch_size or 1
        pad = -len(files) % self.step  # the last fixed-size batch filled up with the first files, cyclically
        self.files = files + [files[i % len(files)] for i in range(pad)]
        self.image_hw, self.mean_rgb, self.stddev_rgb = image_hw, mean_rgb, stddev_rgb

    def __len__(self) -> int:
        return len(self.files) // self.step

    def __iter__(self):
        from data.image_io import read_rgb
        from data.transforms import preprocess_for_eval
        for i in range(0, len(self.files), self.step):
            yield np.stack([preprocess_for_eval(read_rgb(f, exif_transpose=True), self.image_hw, self.mean_rgb,
                                                self.stddev_rgb)[0].numpy() for f in self.files[i:i + self.step]])


@dataclass(frozen=True)
class Int8Options:
    """How `-mode export --precision int8` quantizes: calibration folder and count, layers kept in float,
    NNCF's preset and bias correction."""
    images: str | Path
    count: int = DEFAULT_CALIBRATION_COUNT
    keep_float: tuple[str, ...] | None = None  # None: the variant's default (`default_keep_float`)
    preset: str = "mixed"
    bias_correction: str = "fast"  # NNCF's default; "full" (OpenVINO only)

    def fast_bias_correction(self, fmt: str) -> bool:
        """NNCF's fast bias correction for an export to `fmt`, else its full one (a ValueError where it fails)."""
        method = self.bias_correction
        if method not in BIAS_CORRECTIONS:
            raise ValueError(f"--bias-correction {method}: expected one of {', '.join(BIAS_CORRECTIONS)}")
        if method == "full" and fmt == "onnx":
            raise ValueError("--bias-correction full with --format onnx: NNCF's full bias correction fails on the "
                             "ONNX backend for this network (ONNX Runtime: duplicate definition-site); use fast, or "
                             "--format openvino")
        return method == "fast"

    @functools.cached_property
    def files(self) -> list[Path]:
        """The calibration files, each decoded once; every option checked first. One-line errors (an unreadable
        file is an `ImageReadError` naming it), before any slow work."""
        from data.image_io import read_rgb
        unknown = [k for k in self.keep_float or () if k not in KEEP_FLOAT]
        if unknown:
            raise ValueError(f"--keep-float {unknown[0]}: expected any of {', '.join(KEEP_FLOAT)}")
        if self.preset not in PRESETS:
            raise ValueError(f"--quant-preset {self.preset}: expected one of {', '.join(PRESETS)}")
        files = calibration_files(self.images, self.count)
        for f in files:
            read_rgb(f)
        return files

    def kept(self, config) -> tuple[str, ...]:
        """The layer groups left in float for a model of `config`: as given, else the variant's default."""
        return default_keep_float(config) if self.keep_float is None else tuple(self.keep_float)

    def describe(self, fmt: str, num_files: int, config) -> dict:
        """The sidecar's `quantization` entry."""
        from importlib.metadata import version
        common = {"calibration_images": num_files, "calibration_folder": str(self.images),
                  "keep_float": list(self.kept(config))}
        backend = "OpenVINO" if fmt == "openvino" else "ONNX (QDQ)"
        return {"tool": f"nncf {version('nncf')} nncf.quantize, {backend} backend", "preset": self.preset,
                "bias_correction": "fast" if self.fast_bias_correction(fmt) else "full", **common}


def onnx_scopes(onnx_path: Path) -> dict[str, list[str]]:
    """Node names of the ONNX file per `KEEP_FLOAT` group, from the exporter's `pkg.torch.onnx.name_scopes`
    metadata (the module path of the op that each node came from)."""
    import onnx
    groups = {name: [] for name in KEEP_FLOAT}
    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        module = scopes[-2] if len(scopes) >= 2 else ""  # the last entry is the aten op itself
        for name, pattern in _SCOPE.items():
            if re.search(pattern, module) and (name != "fusion" or node.op_type in ("Add", "Mul")):
                groups[name].append(node.name)
        if node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute):
            groups["depthwise"].append(node.name)
    return groups


def default_keep_float(config) -> tuple[str, ...]:
    """Layer groups kept in float by default, measured on the 12-epoch shapes models (docs/deploy.md): the
    depthwise convs of the ReLU6 (Lite) variants, whose INT8 costs Lite0 1.8 AP against 0.4 AP kept in float;
    none for D0-D7x (swish), where every INT8 configuration scored above fp32."""
    return ("depthwise",) if config.act_type == "relu6" else ()


def quantize(onnx_path: Path, fmt: str, batches: CalibrationBatches, options: Int8Options, config):
    """NNCF's INT8 model of the float ONNX file: an `openvino.Model` for "openvino" (quantized after
    `openvino.convert_model`), an `onnx.ModelProto` with QuantizeLinear / DequantizeLinear pairs for "onnx"."""
    # NNCF imports torch's C++-extension helper, which warns that this CPU build has no CUDA: noise here
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import nncf
    nncf.set_log_level(logging.WARNING)  # not a line per node left in float
    groups = onnx_scopes(onnx_path)
    # OpenVINO names an op after the ONNX node it came from, sometimes with a suffix ("/WithoutBiases")
    patterns = [re.escape(node) + r"(/.*)?" for k in options.kept(config) for node in groups[k]]
    ignored = nncf.IgnoredScope(patterns=patterns, validate=False) if patterns else None
    advanced = None
    if fmt == "openvino":
        import openvino as ov
        model, dataset = ov.convert_model(str(onnx_path)), nncf.Dataset(batches)
    else:
        import onnx
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters
        model, dataset = onnx.load(str(onnx_path)), nncf.Dataset(batches, lambda batch: {"images": batch})
        # ONNX Runtime's QLinearConv takes one zero point per input tensor; NNCF would otherwise give the
        # input of Lite's BiFPN depthwise convs (after ReLU6) one per channel, which ONNX Runtime refuses
        advanced = AdvancedQuantizationParameters(activations_quantization_params=QuantizationParameters(
            per_channel=False))
    return nncf.quantize(model, dataset, preset=nncf.QuantizationPreset(options.preset),
                         subset_size=len(batches), fast_bias_correction=options.fast_bias_correction(fmt),
                         ignored_scope=ignored, advanced_parameters=advanced)
