"""`python main.py -mode eval`: COCO evaluation of official or trained weights on a COCO-format dataset."""
from __future__ import annotations

import argparse
from pathlib import Path

from data.coco import CocoDetection
from eval.coco_eval import format_stats
from deploy.backends import network_from_args
from eval.evaluator import Detector, evaluate
from utils.atomic import write_json
from utils.cli import (add_data_args, add_inference_args, add_model_args, add_runtime_args, add_weights_args,
                       dataset_paths, load_detector, resolve_device)


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_weights_args(parser, required=True)
    add_data_args(parser, ("val",))
    add_runtime_args(parser, batch_size=8)
    parser.add_argument("--nms", choices=["soft", "hard"], default="soft",
                        help="soft: the official evaluation (per-class gaussian soft-NMS); hard: IoU-0.5 NMS")
    parser.add_argument("--max-images", type=int, default=None, help="evaluate only the first K images")
    add_inference_args(parser)
    parser.add_argument("--output", default=None,
                        help="folder for detections_val.json and metrics_val.json (default runs/eval-<model>)")


def check_label_space(info: dict, dataset: CocoDetection) -> None:
    """The weights' classes must be the dataset's classes, in the same order."""
    if info["num_classes"] != dataset.num_classes:
        raise ValueError(f"--weights {info['source']}: has {info['num_classes']} classes, but the dataset "
                         f"{dataset.ann_file} has {dataset.num_classes}")
    if info["class_names"] is not None and list(info["class_names"]) != list(dataset.class_names):
        raise ValueError(f"--weights {info['source']}: its class names {info['class_names'][:5]}... differ "
                         f"from those of {dataset.ann_file} {dataset.class_names[:5]}...")


def run_eval(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    model, info = load_detector(args)
    ann, images = dataset_paths(args, "val")
    dataset = CocoDetection(ann, images, train=False, image_size=info["image_size"])
    check_label_space(info, dataset)
    detector = Detector(model.to(device).eval(), info["image_size"], "eval", args.nms, args.precision, args.compile,
                        network_from_args(args, model, info))
    print(f"evaluating {info['model_name']} ({info['source']}) on {ann}: "
          f"{min(args.max_images or len(dataset), len(dataset))} images at {info['image_size']} px, {args.nms} NMS")
    stats, results, run = evaluate(detector, dataset, args.batch_size, args.workers, device, args.max_images)
    output = Path(args.output or f"runs/eval-{info['model_name']}")
    write_json(results, output / "detections_val.json")
    write_json({"stats": stats, "model": info["model_name"], "weights": info["source"], "annotations": str(ann),
                "nms": args.nms, "image_size": info["image_size"], **run}, output / "metrics_val.json", indent=1)
    print(format_stats(stats))
    print(f"{run['images']} images ({run['failed']} unreadable) in {run['seconds']:.1f} s "
          f"({run['img_per_s']:.2f} img/s); wrote {output}/detections_val.json and metrics_val.json")
    return stats
