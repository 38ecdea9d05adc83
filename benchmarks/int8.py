"""INT8 post-training quantization against fp32 and bf16, per engine and per quantization lever: COCO AP on a
trained model's whole val split and the network's speed, in one run.

    python benchmarks/int8.py --weights runs/bench-shapes/full/best.pth          # the 12-epoch shapes D0
    python benchmarks/int8.py --weights runs/lite0-shapes12/best.pth --configs ov-fp32 ov-int8

Every config is an export of the weights as `-mode export` makes it (dynamic batch; INT8 calibrated on
`--calibration-count` images of `--calibration-images`, training images, preprocessed as inference does):

* ov-fp32 / ov-bf16: OpenVINO IR compiled with `INFERENCE_PRECISION_HINT` f32 / bf16 (bf16 where the CPU has it);
* ov-int8: as `-mode export --precision int8` ships it (mixed preset, fast bias correction, the variant's
  default float groups: depthwise for Lite, none for D0-D7x); ov-int8-all: NNCF's own defaults, every group
  in int8; the others change one lever from ov-int8-all: ov-int8-full-bc full bias correction,
  ov-int8-performance the preset, ov-int8-keep-X the layer group X left in float (`--keep-float`: class-out +
  box-out as "heads-out", se, fusion, depthwise);
* ort-fp32 / ort-int8: ONNX Runtime, fp32 and NNCF's QDQ model as shipped (fast bias correction, the
  variant's default float groups); ort-int8-qdq-minmax: ONNX
  Runtime's own `quantize_static` on the fp32 export (QDQ, per-channel int8 weights, uint8 activations,
  MinMax calibration on the same images), measured here and not shipped.

AP: `eval.evaluator.evaluate` (the loop of `-mode eval`: official soft-NMS path unless `--nms hard`) over the
whole val split. Speed: the exported network alone as `Detector` calls it (no pre/post-processing), batch 1 and 8,
`--threads` intra-op threads, one batch size at a time, the configs timed round-robin (one call each per round,
so that a neighbour's load falls on all alike, each after a 0.1 s pause that lets the previous engine's threads
go idle), median of `--runs` rounds after a warm-up; "x best non-INT8" divides by the fastest fp32/bf16 config
of the same engine in this run.

Its tables live in docs/deploy.md (INT8).
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.speed_worker import SETTLE_S  # noqa: E402
from benchmarks.tta import trained_model_and_val  # noqa: E402
from deploy.backends import open_backend  # noqa: E402
from deploy.export import export_model  # noqa: E402
from deploy.quantize import DEFAULT_CALIBRATION_COUNT, CalibrationBatches, Int8Options  # noqa: E402
from eval.evaluator import Detector, evaluate  # noqa: E402
from model.cpu import describe, unsupported_precision  # noqa: E402

# config -> (engine, run precision, Int8Options fields beyond the calibration images, or None for a float export)
CONFIGS = {
    "ov-fp32": ("openvino", "fp32", None),
    "ov-bf16": ("openvino", "bf16", None),
    "ov-int8": ("openvino", "int8", {}),  # as shipped: fast bias correction, the variant's default float groups
    "ov-int8-all": ("openvino", "int8", {"keep_float": ()}),  # NNCF's defaults: every group in int8
    "ov-int8-full-bc": ("openvino", "int8", {"keep_float": (), "bias_correction": "full"}),
    "ov-int8-performance": ("openvino", "int8", {"keep_float": (), "preset": "performance"}),
    "ov-int8-keep-heads-out": ("openvino", "int8", {"keep_float": ("class-out", "box-out")}),
    "ov-int8-keep-se": ("openvino", "int8", {"keep_float": ("se",)}),
    "ov-int8-keep-fusion": ("openvino", "int8", {"keep_float": ("fusion",)}),
    "ov-int8-keep-depthwise": ("openvino", "int8", {"keep_float": ("depthwise",)}),
    "ort-fp32": ("onnxruntime", "fp32", None),
    "ort-int8": ("onnxruntime", "int8", {}),
    "ort-int8-qdq-minmax": ("onnxruntime", "int8", None),
}


def quantize_static_export(fp32_folder: Path, folder: Path, batches) -> None:
    """ONNX Runtime's `quantize_static` of the fp32 export in `fp32_folder` into `folder` (model.onnx and a
    sidecar saying int8)."""
    import json
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    folder.mkdir()
    prepared = folder / "prepared.onnx"
    quant_pre_process(str(fp32_folder / "model.onnx"), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(folder / "model.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax)
    prepared.unlink()
    sidecar = json.loads((fp32_folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**sidecar, "precision": "int8"}))
BATCHES = (1, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="runs/bench-shapes/full/best.pth", help="a .pth written by training")
    parser.add_argument("--data", default="shapes", help="'shapes' or a COCO-format dataset folder")
    parser.add_argument("--calibration-images", default="data/shapes/train2017")
    parser.add_argument("--calibration-count", type=int, default=DEFAULT_CALIBRATION_COUNT)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--nms", choices=["soft", "hard"], default="soft")
    parser.add_argument("--runs", type=int, default=7, help="timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-eval", action="store_true", help="speed only")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    weights = Path(args.weights)
    model, info, size, dataset = trained_model_and_val(args.weights, args.data)
    info, ann = {**info, "image_size": size}, dataset.ann_file
    configs = [c for c in CONFIGS if c in args.configs
               and (CONFIGS[c][1] != "bf16" or not unsupported_precision("bf16"))]
    if "ort-int8-qdq-minmax" in configs and "ort-fp32" not in configs:
        sys.exit("--configs ort-int8-qdq-minmax quantizes the ort-fp32 export: list ort-fp32 too")
    skipped = sorted(set(args.configs) - set(configs))
    rows, networks = {}, {}
    with tempfile.TemporaryDirectory(prefix="int8-bench-") as tmp:
        for name in configs:
            engine, precision, options = CONFIGS[name]
            folder = Path(tmp) / name
            int8 = Int8Options(args.calibration_images, args.calibration_count, **options) if options is not None \
                else None
            start = time.perf_counter()
            if name == "ort-int8-qdq-minmax":
                calibration = Int8Options(args.calibration_images, args.calibration_count)
                quantize_static_export(Path(tmp) / "ort-fp32", folder, CalibrationBatches(
                    calibration.files, size, model.config.mean_rgb, model.config.stddev_rgb, None))
            else:
                export_model(model, info, folder, "openvino" if engine == "openvino" else "onnx", size, None,
                             "int8" if int8 else "fp32", int8=int8)
            seconds = time.perf_counter() - start
            networks[name] = open_backend(engine, model, info, size, precision, exported=folder,
                                          threads=args.threads)
            stats = None
            if not args.no_eval:
                detector = Detector(model, size, "eval", args.nms, precision, network=networks[name])
                stats, _, _ = evaluate(detector, dataset, 8, 2, torch.device("cpu"), progress=False)
            rows[name] = {"export_s": seconds, "stats": stats}
            ap = f"AP {stats['AP']:.4f}, AP@0.5 {stats['AP50']:.4f}, " if stats else ""
            print(f"{name}: {ap}export {seconds:.0f} s", flush=True)

        inputs = {b: torch.from_numpy(np.random.default_rng(b).standard_normal((b, 3, *size), np.float32))
                  for b in BATCHES}
        times = {(name, b): [] for name in configs for b in BATCHES}
        # One batch size at a time: a dynamic-batch OpenVINO network called with alternating batch sizes pays
        # for the change on every call (Lite0 256 px, fp32 at batch 1: 88 img/s alternating, 139-146 steady).
        # A pause before each call: an engine's idle threads spin for a while after its call and would slow
        # the next config's (OpenVINO fp32 right after ONNX Runtime: 91 img/s; after a 0.1 s pause: 129).
        for b in BATCHES:
            for round_ in range(args.runs + 1):  # round 0: warm-up
                for name in configs:
                    time.sleep(SETTLE_S)
                    start = time.perf_counter()
                    networks[name](inputs[b])
                    if round_:
                        times[name, b].append(time.perf_counter() - start)

    img_s = {key: key[1] / statistics.median(t) for key, t in times.items()}
    best_float = {(engine, b): max((img_s[n, b] for n in configs if CONFIGS[n][0] == engine and
                                    CONFIGS[n][1] != "int8"), default=None)
                  for engine in ("openvino", "onnxruntime") for b in BATCHES}
    base = rows.get("ov-fp32", {}).get("stats")
    print(f"\n{describe()}, {datetime.date.today().isoformat()}, torch {torch.__version__}, {args.threads} threads")
    print(f"{weights} ({info['model_name']}, {size[0]}x{size[1]} HxW), {ann}: {len(dataset)} images, {args.nms} "
          f"NMS; calibration: {args.calibration_count} images of {args.calibration_images}; median of {args.runs}"
          + (f"; skipped (no bf16 on this CPU): {', '.join(skipped)}" if skipped else ""))
    print("| config | AP | AP@0.5 | AP - ov-fp32 | img/s, batch 1 | x best non-INT8 | img/s, batch 8 | "
          "x best non-INT8 | export s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in configs:
        stats, cells = rows[name]["stats"], []
        cells += [f"{stats['AP']:.3f}", f"{stats['AP50']:.3f}",
                  f"{stats['AP'] - base['AP']:+.3f}" if base else "-"] if stats else ["-"] * 3
        for b in BATCHES:
            best = best_float[CONFIGS[name][0], b]
            cells += [f"{img_s[name, b]:.1f}", f"{img_s[name, b] / best:.2f}x" if best else "-"]
        print(f"| {name} | " + " | ".join(cells) + f" | {rows[name]['export_s']:.0f} |")
    print("(this table belongs in docs/deploy.md, section INT8)")


if __name__ == "__main__":
    main()
