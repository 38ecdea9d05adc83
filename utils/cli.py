"""Command-line pieces shared by the modes of main.py: model/weights/data/device flags and their resolution."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from data.coco import COCO_CATEGORY_NAMES, COCO_NUM_CLASSES
from model import VARIANTS, EfficientDet, build_model
from model.inference import PRECISIONS
from utils.image_size import HELP as IMAGE_SIZE_HELP
from utils.image_size import image_size_arg, resolve_image_size
from utils.pretrained import resolve_pretrained
from utils.weights import load_weights

REPO = Path(__file__).resolve().parents[1]
SHAPES_ROOT = REPO / "data" / "shapes"
DEFAULT_MODEL = "efficientdet-d0"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-model", choices=list(VARIANTS), default=None,
                        help=f"variant (default: the one stored in --weights, else {DEFAULT_MODEL})")
    parser.add_argument("--image-size", type=image_size_arg, default=None, metavar="S|WxH", help=IMAGE_SIZE_HELP)


def add_weights_args(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--pretrained", action="store_true",
                       help="official COCO weights: weights/<model>.pth, ported from weights/<model>/ if needed")
    group.add_argument("--weights", metavar="FILE", help="a .pth written by the porter or by training (EMA weights)")
    parser.add_argument("--download", action="store_true",
                        help="with --pretrained: download and port the official checkpoint if it is missing")


def add_data_args(parser: argparse.ArgumentParser, splits: tuple[str, ...]) -> None:
    parser.add_argument("--data", default="data/coco",
                        help="COCO-format dataset folder (DIR/annotations/instances_{split}2017.json + "
                             "DIR/{split}2017/), or 'shapes' for the embedded synthetic dataset")
    for split in splits:
        parser.add_argument(f"--{split}-ann", default=None, help=f"{split} annotation json (overrides --data)")
        parser.add_argument(f"--{split}-images", default=None, help=f"{split} image folder (overrides --data)")


def add_runtime_args(parser: argparse.ArgumentParser, batch_size: int) -> None:
    parser.add_argument("--batch-size", type=int, default=batch_size, help="images per batch (per process)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N'")


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    """How `-mode eval` and `-mode infer` run the network (`model.inference.prepare_for_inference`)."""
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="network precision (bf16: fast on CPUs with AMX/AVX512-BF16; fp16: GPUs)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network (falls back to eager with a warning if it fails)")
    parser.add_argument("--backend", choices=["torch", "onnxruntime", "openvino"], default="torch",
                        help="what runs the network: PyTorch, or an ONNX / OpenVINO export of the weights (made "
                             "once into runs/export-cache/, or --exported) on ONNX Runtime / OpenVINO (CPU)")
    parser.add_argument("--exported", metavar="DIR", default=None,
                        help="with --backend onnxruntime / openvino: a folder written by -mode export (plain network, "
                             "of the same weights' variant, classes and image size)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def dataset_paths(args: argparse.Namespace, split: str) -> tuple[Path, Path]:
    """(annotation json, image folder) of `split` from --data / --{split}-ann / --{split}-images."""
    if args.data == "shapes":
        from data.shapes import make_shapes_dataset
        root = make_shapes_dataset(SHAPES_ROOT)
    else:
        root = Path(args.data)
    ann = getattr(args, f"{split}_ann") or root / "annotations" / f"instances_{split}2017.json"
    images = getattr(args, f"{split}_images") or root / f"{split}2017"
    return Path(ann), Path(images)


def check_download_flag(args: argparse.Namespace) -> None:
    if args.download and not args.pretrained:
        raise ValueError("--download: only used with --pretrained")


def load_detector(args: argparse.Namespace) -> tuple[EfficientDet, dict]:
    """Build the model of `args` and load --pretrained / --weights into it.

    Returns the model and `info`: model_name, num_classes, image_size, class_names (None if unknown),
    class_to_category (None if unknown) and source (the weight file).
    """
    check_download_flag(args)
    if args.pretrained:
        path = resolve_pretrained(args.model or DEFAULT_MODEL, REPO / "weights", download_missing=args.download)
    else:
        path = Path(args.weights)
    state, meta = load_weights(path)
    stored = meta.get("model_name")
    if args.model and stored and args.model != stored:
        raise ValueError(f"--weights {path}: holds {stored} weights, but -model {args.model} was asked for")
    name = args.model or stored or DEFAULT_MODEL
    if meta.get("backbone_only"):
        raise ValueError(f"--weights {path}: holds backbone weights only; a detector needs full weights")
    num_classes = meta.get("num_classes") or state["class_net.predict.conv_pw.bias"].numel() // VARIANTS[name].num_anchors
    model = build_model(name, num_classes=num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"--weights {path}: does not fit {name} with {num_classes} classes: "
                         f"{str(e).splitlines()[0]}") from e
    image_size = resolve_image_size(model.config, args.image_size, meta.get("image_size"))
    names, categories = meta.get("class_names"), meta.get("class_to_category")
    if names is None and num_classes == COCO_NUM_CLASSES:  # official checkpoints: COCO's 90-id label space
        names = [COCO_CATEGORY_NAMES.get(c + 1, f"unused_{c + 1}") for c in range(COCO_NUM_CLASSES)]
        categories = list(range(1, COCO_NUM_CLASSES + 1))
    return model, {"model_name": name, "num_classes": num_classes, "image_size": image_size,
                   "class_names": names, "class_to_category": categories, "source": str(path)}
