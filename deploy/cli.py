"""`python main.py -mode export`: the model of --weights / --pretrained as ONNX or OpenVINO IR + JSON sidecar."""
from __future__ import annotations

import argparse
import time

from model.config import parse_image_size
from data.atomic import check_writable_dir, refuse_unwritable_output
from utils.cli import add_model_args, add_weights_args, load_detector, number

from .export import EXPORT_PRECISIONS, FORMATS, check_export, export_model
from .quantize import BIAS_CORRECTIONS, DEFAULT_CALIBRATION_COUNT, KEEP_FLOAT, PRESETS, Int8Options


def add_export_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_weights_args(parser, required=True)
    parser.add_argument("--format", choices=list(FORMATS), required=True,
                        help="onnx: one .onnx file (opset 18); openvino: model.xml + model.bin (OpenVINO IR)")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", type=number(int, 1), default=1, help="the fixed batch size of the input")
    batch.add_argument("--dynamic-batch", action="store_true", help="a dynamic batch axis instead of a fixed one")
    parser.add_argument("--precision", choices=sorted({p for ps in EXPORT_PRECISIONS.values() for p in ps}),
                        default="fp32", help="inference precision (bf16: OpenVINO only, a hint stored with the model; "
                                             "int8: post-training quantization, needs --calibration-images)")
    parser.add_argument("--calibration-images", metavar="DIR", default=None,
                        help="int8: folder of calibration images (training images, never the evaluation set), "
                             "preprocessed as inference does")
    parser.add_argument("--calibration-count", type=number(int, 1), default=DEFAULT_CALIBRATION_COUNT, metavar="N",
                        help="int8: calibration images used, spread over the folder")
    parser.add_argument("--keep-float", nargs="*", choices=KEEP_FLOAT, default=None, metavar="GROUP",
                        help=f"int8: layer groups left unquantized ({', '.join(KEEP_FLOAT)}); default: depthwise "
                             f"for the Lite variants, none for D0-D7x; the flag alone: none")
    parser.add_argument("--quant-preset", choices=PRESETS, default="mixed",
                        help="int8: NNCF's preset (mixed: asymmetric activations; performance: symmetric)")
    parser.add_argument("--bias-correction", choices=BIAS_CORRECTIONS, default="fast",
                        help="int8: NNCF's bias correction (full: --format openvino only)")
    parser.add_argument("--with-nms", action="store_true",
                        help="include box decoding and hard NMS (official image path: best class per anchor, "
                             "class-agnostic NMS at IoU 0.5, top 100): outputs boxes, scores, classes, num_valid")
    parser.add_argument("--output", required=True, help="folder for the model file(s) and model.json")


def run_export(args: argparse.Namespace):
    int8 = calibration = None
    if args.precision == "int8":
        if not args.calibration_images:
            raise ValueError("--precision int8: needs --calibration-images DIR (training images to calibrate on)")
        keep = None if args.keep_float is None else tuple(args.keep_float)
        int8 = Int8Options(args.calibration_images, args.calibration_count, keep, args.quant_preset,
                           args.bias_correction)
        calibration = int8.files  # a bad folder or image is refused before the weights are read
    elif args.calibration_images or args.keep_float is not None:
        raise ValueError(f"--{'calibration-images' if args.calibration_images else 'keep-float'}: only used with "
                         f"--precision int8")
    refuse_unwritable_output(args.output)
    model, info = load_detector(args)
    image_hw = parse_image_size(info["image_size"])
    check_export(model.config, args.format, image_hw, args.precision, args.with_nms)
    output = check_writable_dir(args.output)  # made only once the inputs are good
    batch = None if args.dynamic_batch else args.batch_size
    start = time.perf_counter()
    sidecar = export_model(model, info, output, args.format, image_hw, batch, args.precision, args.with_nms, int8)
    print(f"exported {info['model_name']} ({info['source']}) to {args.format} at height {image_hw[0]}, "
          f"width {image_hw[1]}, "
          f"batch {'dynamic' if batch is None else batch}, {args.precision}"
          f"{f' (calibrated on {len(calibration)} images)' if int8 else ''}"
          f"{', with NMS' if args.with_nms else ''} in {time.perf_counter() - start:.0f} s: {output} ({sidecar.name})")
    return sidecar
