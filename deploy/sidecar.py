"""The JSON file written beside an exported model: everything needed to run it without this repository.

Keys (all values from the model's `EfficientDetConfig` and its weight file, nothing restated by hand):

* `format` ("efficientdet-export/1"), `model` (variant), `runtime` ("onnx" / "openvino"), `file` (the model
  file, relative to the sidecar), `precision`, `runtime_config` (properties to compile it with: OpenVINO's
  `INFERENCE_PRECISION_HINT`, since its CPU default is bf16 on CPUs with AVX512-BF16 / AMX; f32 for an INT8
  export: what is not quantized runs in float32), `with_nms`,
  `opset`, `exporter`.
* `input`: name, layout "NCHW", dtype, height, width, batch (an int, or "dynamic").
* `preprocessing`: RGB 0..255 -> `(x - mean_rgb) / stddev_rgb` per channel -> aspect-preserving bilinear
  resize (half-pixel centres) by `min(height / H0, width / W0)` to the top-left -> zero padding (after
  normalisation) bottom/right; `image_scale = 1 / resize scale` maps network px back to original px.
* `classes`: `[{"index": i, "id": category id, "name": ...}]` in output-channel order (id None if unknown).
* `anchors`: min/max level, num_scales, aspect_ratios (w / h), anchor_scale, count, order, box format.
* `outputs`: name, shape and meaning of each output, in order.
* `quantization` (INT8 exports only, `deploy.quantize.Int8Options.describe`): the tool and its version,
  how many calibration images from which folder, the layer groups kept in float and NNCF's preset and bias
  correction.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from model.config import EfficientDetConfig

FORMAT = "efficientdet-export/1"
SIDECAR = "model.json"
KEYS = ("format", "model", "runtime", "file", "precision", "runtime_config", "with_nms", "opset", "exporter", "input",
        "preprocessing", "classes", "anchors", "outputs")


def _per_channel(value) -> list[float]:
    return [float(v) for v in value] if isinstance(value, (tuple, list)) else [float(value)] * 3


def head_output_names(num_levels: int, min_level: int) -> list[str]:
    """Names of the plain model's outputs: class logits of every level, then box deltas of every level."""
    levels = range(min_level, min_level + num_levels)
    return [f"class_p{lv}" for lv in levels] + [f"box_p{lv}" for lv in levels]


def _outputs(config: EfficientDetConfig, image_hw: tuple[int, int], batch, with_nms: bool) -> list[dict]:
    from model.anchors import feature_sizes
    if with_nms:
        from deploy.graph import OUTPUT_NAMES
        shapes = ([batch, 100, 4], [batch, 100], [batch, 100], [batch])
        meaning = ("detections (ymin, xmin, ymax, xmax) in network-input px, clipped to the input; multiply by "
                   "image_scale for original px; rows after num_valid are zeros",
                   "sigmoid score, best first", "0-based class index into `classes`", "valid rows per image")
        return [{"name": n, "shape": s, "meaning": m} for n, s, m in zip(OUTPUT_NAMES, shapes, meaning)]
    sizes = feature_sizes(image_hw, config.min_level, config.max_level)
    a, c = config.num_anchors, config.num_classes
    names = head_output_names(config.num_levels, config.min_level)
    shapes = [[batch, a * c, h, w] for h, w in sizes] + [[batch, a * 4, h, w] for h, w in sizes]
    meaning = [f"class logits, channel anchor * {c} + class"] * len(sizes) + \
              ["box deltas (ty, tx, th, tw), channel anchor * 4 + k"] * len(sizes)
    return [{"name": n, "shape": s, "meaning": m} for n, s, m in zip(names, shapes, meaning)]


def make_sidecar(config: EfficientDetConfig, info: dict, runtime: str, file: str, image_hw: tuple[int, int],
                 batch_size: int | None, precision: str, with_nms: bool, opset: int) -> dict:
    """The sidecar of an export of a model with `config` and weight `info` (`utils.weights.detector_from_weights`).
    batch_size None: dynamic batch."""
    batch = "dynamic" if batch_size is None else int(batch_size)
    names = info.get("class_names") or [f"class_{i}" for i in range(config.num_classes)]
    ids = info.get("class_to_category") or [None] * config.num_classes
    return {
        "format": FORMAT, "model": config.name, "runtime": runtime, "file": file, "precision": precision,
        "runtime_config": ({"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16", "int8": "f32"}[precision]}
                           if runtime == "openvino" else {}),
        "with_nms": with_nms, "opset": opset, "exporter": f"torch {torch.__version__} torch.onnx.export (dynamo)",
        "input": {"name": "images", "layout": "NCHW", "dtype": "float32", "height": int(image_hw[0]),
                  "width": int(image_hw[1]), "batch": batch},
        "preprocessing": {
            "color": "RGB", "value_range": [0, 255], "mean_rgb": _per_channel(config.mean_rgb),
            "stddev_rgb": _per_channel(config.stddev_rgb),
            "steps": ["normalize: (x - mean_rgb) / stddev_rgb, float32",
                      "resize: bilinear, half-pixel centres, no antialiasing, by scale = min(height / H0, "
                      "width / W0) to (int(H0 * scale), int(W0 * scale))",
                      "place at the top-left, pad bottom/right with 0 (after normalisation)",
                      "image_scale = 1 / scale: original px = network px * image_scale"]},
        "classes": [{"index": i, "id": ids[i], "name": names[i]} for i in range(config.num_classes)],
        "anchors": {"min_level": config.min_level, "max_level": config.max_level, "num_scales": config.num_scales,
                    "aspect_ratios": list(config.aspect_ratios), "anchor_scale": config.anchor_scale,
                    "per_location": config.num_anchors,
                    "order": "level -> y -> x -> anchor (scale_idx * len(aspect_ratios) + ratio_idx)",
                    "box_format": "ymin, xmin, ymax, xmax (network-input px)",
                    "box_coder": "yc = ty * ha + yca, xc = tx * wa + xca, h = exp(th) * ha, w = exp(tw) * wa"},
        "outputs": _outputs(config, image_hw, batch, with_nms),
    }


def write_sidecar(sidecar: dict, folder: Path) -> Path:
    from data.atomic import write_json
    path = Path(folder) / SIDECAR
    write_json(sidecar, path, indent=1)
    return path


def read_sidecar(path: str | Path) -> dict:
    """The sidecar of an export folder (or the json itself), checked for the keys above; a ValueError naming
    the file otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / SIDECAR
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no export sidecar here (write one with `python main.py -mode export`)")
    try:
        sidecar = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in KEYS if k not in sidecar] if isinstance(sidecar, dict) else list(KEYS)
    if missing or sidecar.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} sidecar (missing {', '.join(missing) or 'nothing'}, "
                         f"format {sidecar.get('format') if isinstance(sidecar, dict) else None!r})")
    if not (path.parent / sidecar["file"]).is_file():
        raise FileNotFoundError(f"{path}: its model file {path.parent / sidecar['file']} is missing")
    return sidecar
