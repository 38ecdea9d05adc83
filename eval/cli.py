"""`python main.py -mode eval`: COCO evaluation of official or trained weights on a COCO-format dataset."""
from __future__ import annotations

import argparse

from data.coco import CocoDetection
from eval.coco_eval import format_stats
from deploy.backends import network_from_args
from eval.evaluator import Detector, evaluate
from eval.voc_eval import evaluate_voc, format_voc, reports_voc_metric
from data.atomic import check_writable_dir, refuse_unwritable_output, write_json
from utils.cli import (add_data_args, add_inference_args, add_model_args, add_runtime_args, add_weights_args,
                       dataset_paths, load_detector, number, resolve_device)


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_weights_args(parser, required=True)
    add_data_args(parser, ("val",))
    add_runtime_args(parser, batch_size=8)
    parser.add_argument("--nms", choices=["soft", "hard"], default="soft",
                        help="soft: the official evaluation (per-class gaussian soft-NMS); hard: IoU-0.5 NMS")
    parser.add_argument("--max-images", type=number(int, 1), default=None, help="evaluate only the first K images")
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


def voc_metric(dataset: CocoDetection, results: list[dict], image_ids: list[int]) -> dict | None:
    """The VOC metric (`eval.voc_eval`) over the evaluated (readable) images of a VOC dataset, None for other
    datasets."""
    if not reports_voc_metric(dataset.coco):
        return None
    return evaluate_voc(dataset.coco, results, image_ids)


def run_eval(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    if args.output:  # else the folder is named after the model, known once the weights are read
        refuse_unwritable_output(args.output)
    model, info = load_detector(args)
    ann, images = dataset_paths(args, "val")
    dataset = CocoDetection(ann, images, train=False, image_size=info["image_size"], mean_rgb=model.config.mean_rgb,
                            stddev_rgb=model.config.stddev_rgb)
    check_label_space(info, dataset)
    output = check_writable_dir(args.output or f"runs/eval-{info['model_name']}")  # the inputs are good
    detector = Detector(model.to(device).eval(), info["image_size"], "eval", args.nms, args.precision, args.compile,
                        network_from_args(args, model, info), tta=args.tta)
    print(f"evaluating {info['model_name']} ({info['source']}) on {dataset.ann_file}: "
          f"{min(args.max_images or len(dataset), len(dataset))} images at {info['image_size']} px, {args.nms} NMS"
          + (f", test-time augmentation {args.tta}" if args.tta else ""))
    stats, results, run = evaluate(detector, dataset, args.batch_size, args.workers, device, args.max_images,
                                   max_bad_images=args.max_bad_images)
    voc = voc_metric(dataset, results, run.pop("image_ids"))  # the images both metrics are over
    write_json(results, output / "detections_val.json")
    write_json({"stats": stats, "model": info["model_name"], "weights": info["source"],
                "annotations": str(dataset.ann_file), "nms": args.nms, "tta": args.tta, "image_size": info["image_size"], **run,
                **({"voc": voc} if voc else {})}, output / "metrics_val.json", indent=1)
    print(format_stats(stats))
    if voc:
        print(format_voc(voc))
    skipped = (f"; {run['failed']} unreadable image(s) skipped, the metrics are over the {run['images']} read"
               if run["failed"] else "")
    print(f"{run['images']} images in {run['seconds']:.1f} s ({run['img_per_s']:.2f} img/s){skipped}; "
          f"wrote {output}/detections_val.json and metrics_val.json")
    return stats
