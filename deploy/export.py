"""Export of the plain `EfficientDet` (or `graph.DetectionGraph` with `with_nms`) to ONNX or OpenVINO IR.

ONNX: `torch.onnx.export` (its default exporter: `torch.export` then onnxscript), opset 18, one file
with the weights inside, input `images` [N, 3, H, W] float32 (N fixed or dynamic). OpenVINO: that ONNX
file through `openvino.convert_model`, saved with `openvino.save_model` as `model.xml` + `model.bin` in
float32 (no fp16 compression). The precision is how to compile it: the sidecar's `runtime_config`
(`INFERENCE_PRECISION_HINT`; OpenVINO's CPU default is bf16 where the CPU has AVX512-BF16 or AMX, so an fp32
export says f32 explicitly). INT8 (`deploy.quantize`): that ONNX file quantized by NNCF after calibration,
as OpenVINO IR or as a QDQ ONNX file. Every export folder gets a `model.json` sidecar
(`deploy.sidecar`; INT8 adds its `quantization` entry).
"""
from __future__ import annotations

import importlib
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model import EfficientDet
from model.anchors import feature_sizes
from model.efficientdet import validate_image_size
from model.layers import same_padding

from .sidecar import head_output_names, make_sidecar, write_sidecar

if TYPE_CHECKING:
    from .quantize import Int8Options

OPSET = 18
FORMATS = {"onnx": "model.onnx", "openvino": "model.xml"}
EXPORT_PRECISIONS = {"onnx": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8")}
# --format -> the packages its export needs (INT8: and the quantization tool, `deploy.quantize`)
_RUNTIME_PACKAGES = {"onnx": ("onnx", "onnxscript"), "openvino": ("onnx", "onnxscript", "openvino")}
_INT8_PACKAGES = {"onnx": ("nncf", "onnxruntime"), "openvino": ("nncf",)}  # NNCF calibrates ONNX on ORT


def require(packages: tuple[str, ...], what: str) -> None:
    """A RuntimeError naming `what` and the missing package unless all of `packages` import."""
    for name in packages:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise RuntimeError(f"{what} needs the '{name}' package, which is not installed here ({e}); "
                               f"install the pinned versions with `pip install -r requirements.txt`") from None


def check_export(config, fmt: str, image_hw: tuple[int, int], precision: str, with_nms: bool = False) -> None:
    """Everything that can be refused before the (slow) export: format, precision, runtime packages, size."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if precision not in EXPORT_PRECISIONS[fmt]:
        raise ValueError(f"--precision {precision} with --format {fmt}: ONNX Runtime has no bf16 CPU kernels for "
                         f"this network; export --format openvino --precision bf16, or fp32")
    require(_RUNTIME_PACKAGES[fmt], f"--format {fmt}")
    if precision == "int8":
        require(_INT8_PACKAGES[fmt], f"--precision int8 --format {fmt}")
        if with_nms:
            raise ValueError("--precision int8 with --with-nms: quantization calibrates the plain network; export "
                             "it without --with-nms")
    validate_image_size(config, image_hw, "--image-size")
    if fmt == "openvino":
        # OpenVINO's MaxPool refuses a window larger than its padded input (PyTorch and ONNX Runtime let the
        # ceil-mode window hang over, as TF's SAME padding does): the 3x3/2 pools from P5 up need maps of >= 3 px.
        pooled = feature_sizes(image_hw, 0, config.max_level)[5:-1]
        small = [(5 + i, side) for i, hw in enumerate(pooled) for side in hw
                 if side + same_padding(3, 2, side)[0] < 3]
        if small:
            level, side = small[0]
            raise ValueError(f"--image-size: height {image_hw[0]}, width {image_hw[1]} with --format openvino: "
                             f"P{level} is {side} px, too small for OpenVINO's 3x3 max-pool; use a larger size (e.g. "
                             f"{2 * config.size_divisor}) or --format onnx")


def export_onnx(model: EfficientDet, path: Path, image_hw: tuple[int, int], batch_size: int | None,
                with_nms: bool) -> Path:
    """Write `model` (plain, or wrapped in `DetectionGraph` when `with_nms`) as ONNX to `path`.
    batch_size None: a dynamic batch axis."""
    from .graph import CUSTOM_TRANSLATIONS, OUTPUT_NAMES, DetectionGraph
    config = model.config
    module = (DetectionGraph(model, image_hw) if with_nms else model).eval()
    # torch.export specialises a dimension of size 1, so a dynamic batch is traced at 2
    images = torch.zeros(2 if batch_size is None else batch_size, 3, *image_hw)
    names = list(OUTPUT_NAMES) if with_nms else head_output_names(config.num_levels, config.min_level)
    dynamic = {"images": {0: torch.export.Dim("batch", min=1)}} if batch_size is None else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter chatter (deprecations of its own internals)
        torch.onnx.export(module, (images,), str(path), opset_version=OPSET, input_names=["images"],
                          output_names=names, dynamic_shapes=dynamic, dynamo=True, external_data=False,
                          custom_translation_table=CUSTOM_TRANSLATIONS if with_nms else None, verbose=False)
    return path


def save_openvino(ov_model, output: Path) -> Path:
    """`model.xml` + `model.bin` of an `openvino.Model` in `output`, weights as they are (no fp16 compression)."""
    import openvino as ov
    with tempfile.TemporaryDirectory(dir=output) as tmp:  # complete files only in `output`
        ov.save_model(ov_model, str(Path(tmp) / "model.xml"), compress_to_fp16=False)
        for name in ("model.xml", "model.bin"):
            (Path(tmp) / name).replace(Path(output) / name)
    return Path(output) / "model.xml"


def onnx_to_openvino(onnx_path: Path, output: Path) -> Path:
    """`model.xml` + `model.bin` in `output` from an ONNX file, weights in float32."""
    import openvino as ov
    return save_openvino(ov.convert_model(str(onnx_path)), output)


def export_model(model: EfficientDet, info: dict, output: Path, fmt: str, image_hw: tuple[int, int],
                 batch_size: int | None = 1, precision: str = "fp32", with_nms: bool = False,
                 int8: Int8Options | None = None) -> Path:
    """Export `model` (its weights from `info["source"]`) into the folder `output`; returns the sidecar path.

    info: as `utils.weights.detector_from_weights` returns it (class names and ids go into the sidecar).
    precision "int8" needs `int8` (`deploy.quantize.Int8Options`: calibration images and options); the
    calibration images are checked before the export starts.
    """
    from .quantize import CalibrationBatches, quantize
    model = model.float().eval()
    check_export(model.config, fmt, image_hw, precision, with_nms)
    if (precision == "int8") != (int8 is not None):
        raise ValueError("--precision int8 needs --calibration-images (and only int8 takes them)")
    if int8:
        int8.fast_bias_correction(fmt)  # an option the tool cannot run is refused before the export
    batches = (CalibrationBatches(int8.files, image_hw, model.config.mean_rgb, model.config.stddev_rgb, batch_size)
               if int8 else None)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output) as tmp:
        onnx_path = export_onnx(model, Path(tmp) / "model.onnx", image_hw, batch_size, with_nms)
        if fmt == "openvino" and int8:
            save_openvino(quantize(onnx_path, fmt, batches, int8, model.config), output)
        elif fmt == "openvino":
            onnx_to_openvino(onnx_path, output)
        else:
            if int8:
                import onnx
                onnx_path = Path(tmp) / "model.int8.onnx"
                onnx.save(quantize(onnx_path.with_name("model.onnx"), fmt, batches, int8, model.config), str(onnx_path))
            onnx_path.replace(output / FORMATS[fmt])  # same file system: no half model.onnx is ever visible
    sidecar = make_sidecar(model.config, info, fmt, FORMATS[fmt], image_hw, batch_size, precision, with_nms, OPSET)
    if int8:
        sidecar["quantization"] = int8.describe(fmt, len(set(batches.files)), model.config)
    return write_sidecar(sidecar, output)
