"""`python main.py -mode export`: the model of --weights / --pretrained as ONNX or OpenVINO IR + JSON sidecar."""
from __future__ import annotations

import argparse
import time

from model.config import parse_image_size
from data.atomic import check_writable_dir
from utils.cli import add_model_args, add_weights_args, load_detector, number

from .export import EXPORT_PRECISIONS, FORMATS, export_model


def add_export_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_weights_args(parser, required=True)
    parser.add_argument("--format", choices=list(FORMATS), required=True,
                        help="onnx: one .onnx file (opset 18); openvino: model.xml + model.bin (OpenVINO IR)")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", type=number(int, 1), default=1, help="the fixed batch size of the input")
    batch.add_argument("--dynamic-batch", action="store_true", help="a dynamic batch axis instead of a fixed one")
    parser.add_argument("--precision", choices=sorted({p for ps in EXPORT_PRECISIONS.values() for p in ps}),
                        default="fp32", help="inference precision (bf16: OpenVINO only, a hint stored with the model)")
    parser.add_argument("--with-nms", action="store_true",
                        help="include box decoding and hard NMS (official image path: best class per anchor, "
                             "class-agnostic NMS at IoU 0.5, top 100): outputs boxes, scores, classes, num_valid")
    parser.add_argument("--output", required=True, help="folder for the model file(s) and model.json")


def run_export(args: argparse.Namespace):
    output = check_writable_dir(args.output)
    model, info = load_detector(args)
    image_hw = parse_image_size(info["image_size"])
    batch = None if args.dynamic_batch else args.batch_size
    start = time.perf_counter()
    sidecar = export_model(model, info, output, args.format, image_hw, batch, args.precision, args.with_nms)
    print(f"exported {info['model_name']} ({info['source']}) to {args.format} at height {image_hw[0]}, "
          f"width {image_hw[1]}, "
          f"batch {'dynamic' if batch is None else batch}, {args.precision}"
          f"{', with NMS' if args.with_nms else ''} in {time.perf_counter() - start:.0f} s: {output} ({sidecar.name})")
    return sidecar
