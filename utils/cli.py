"""Command-line pieces shared by the modes of main.py: model/weights/data/device flags and their resolution."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from data.bad_images import BadImageLimit
from data.convert import load_split
from data.formats import dataset_format
from model import VARIANTS, EfficientDet
from model.inference import PRECISIONS
from utils.image_size import HELP as IMAGE_SIZE_HELP
from utils.image_size import image_size_arg, resolve_image_size
from utils.pretrained import MIRROR_ENV, WEIGHTS_DIR_ENV, resolve_pretrained
from utils.weights import detector_from_weights

REPO = Path(__file__).resolve().parents[1]
SHAPES_ROOT = REPO / "data" / "shapes"
DEFAULT_MODEL = "efficientdet-d0"


def number(kind=float, low=None, high=None, low_open=False, high_open=False):
    """An argparse `type` for a finite `kind` (int or float) in [low, high] (an end is open with `low_open` /
    `high_open`, absent when None); anything else is a one-line usage error naming the flag."""
    where = (("(" if low_open or low is None else "[") + ("-inf" if low is None else f"{low}") + ", "
             + ("inf" if high is None else f"{high}") + (")" if high_open or high is None else "]"))
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} in {where}, got {text!r}") from None
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"expected {what} in {where}, got {text}")
        return value
    return parse


def max_bad_images(text: str) -> BadImageLimit:
    try:
        return BadImageLimit.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-model", choices=list(VARIANTS), default=None,
                        help=f"variant (default: the one stored in --weights, else {DEFAULT_MODEL})")
    parser.add_argument("--image-size", type=image_size_arg, default=None, metavar="S|WxH", help=IMAGE_SIZE_HELP)


def add_weights_args(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--pretrained", action="store_true",
                       help="official COCO weights: weights/<model>.pth, ported from weights/<model>/ if needed "
                            f"(weights/ of this repository, or ${WEIGHTS_DIR_ENV})")
    group.add_argument("--weights", metavar="FILE", help="a .pth written by the porter or by training (EMA weights)")
    parser.add_argument("--download", action="store_true",
                        help="with --pretrained: download and port the official checkpoint if it is missing "
                             f"(from ${MIRROR_ENV} if set)")


def add_data_args(parser: argparse.ArgumentParser, splits: tuple[str, ...]) -> None:
    parser.add_argument("--data", default="data/coco",
                        help="dataset folder: COCO (DIR/annotations/instances_{split}2017.json + DIR/{split}2017/), "
                             "Pascal VOC (DIR/Annotations/, JPEGImages/, ImageSets/Main/{split}.txt) or YOLO "
                             "(DIR/images/{split}/, labels/{split}/, data.yaml or classes.txt), detected from its "
                             "layout or named coco:DIR, voc:DIR, yolo:DIR; or 'shapes' for the embedded synthetic "
                             "dataset (docs/datasets.md)")
    for split in splits:
        parser.add_argument(f"--{split}-ann", default=None,
                            help=f"{split} annotations (overrides --data): a COCO json, a VOC or YOLO folder, or a VOC "
                                 f"image-set file DIR/ImageSets/Main/NAME.txt")
        parser.add_argument(f"--{split}-images", default=None, help=f"{split} image folder (overrides --data)")
    if "train" in splits:
        parser.add_argument("--train-difficult", action="store_true",
                            help="VOC: also train on objects marked difficult (default: left out of training, as "
                                 "evaluation ignores them)")
    parser.add_argument("--max-bad-images", type=max_bad_images, default=BadImageLimit(percent=1.0), metavar="N|P%",
                        help="stop as soon as more images than this could not be read (missing, cannot decode, "
                             "truncated) in an epoch or an evaluation: a number, or a percentage of its images")


def add_runtime_args(parser: argparse.ArgumentParser, batch_size: int) -> None:
    parser.add_argument("--batch-size", type=number(int, 1), default=batch_size,
                        help="images per batch (per process)")
    parser.add_argument("--workers", type=number(int, 0), default=2, help="DataLoader worker processes")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N'")


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    """How `-mode eval` and `-mode infer` run the network (`model.inference.prepare_for_inference`)."""
    parser.add_argument("--precision", choices=[*PRECISIONS, "int8"], default="fp32",
                        help="network precision (bf16: fast on CPUs with AMX/AVX512-BF16; fp16: GPUs; int8: an INT8 "
                             "export on --backend onnxruntime / openvino, from --exported or --calibration-images)")
    parser.add_argument("--calibration-images", metavar="DIR", default=None,
                        help="with --precision int8 and no --exported: quantize the weights once (cached in "
                             "runs/export-cache/) after calibrating on these images (training images, never the "
                             "evaluation set)")
    parser.add_argument("--calibration-count", type=number(int, 1), default=None, metavar="N",
                        help="calibration images used, spread over the folder (default 300)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network (falls back to eager with a warning if it fails)")
    parser.add_argument("--backend", choices=["torch", "onnxruntime", "openvino"], default="torch",
                        help="what runs the network: PyTorch, or an ONNX / OpenVINO export of the weights (made "
                             "once into runs/export-cache/, or --exported) on ONNX Runtime / OpenVINO (CPU)")
    parser.add_argument("--exported", metavar="DIR", default=None,
                        help="with --backend onnxruntime / openvino: a folder written by -mode export (plain network, "
                             "of the same weights' variant, classes and image size)")
    parser.add_argument("--tta", choices=["flip", "scales", "flip+scales"], default=None,
                        help="test-time augmentation, the passes fused by weighted boxes fusion as the official "
                             "tf2/wbf.py does (docs/tta.md): flip = the image and its mirror (2 passes); scales = "
                             "0.8x, 1x and 1.2x the input size (3 passes), the 0.8x and 1.2x sides rounded to the "
                             "nearest multiple of the variant's size divisor 2^max_level (128, D7x 256), one multiple "
                             "further if that is the input size (256 gives 128, 256, 384); flip+scales = 6 passes. "
                             "scales needs --backend torch")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def dataset_paths(args: argparse.Namespace, split: str) -> tuple[Path | dict, Path]:
    """(annotations, image folder) of `split` from --data / --{split}-ann / --{split}-images: what
    `CocoDetection` takes. The annotations are a COCO json path, or for a VOC or YOLO dataset its content as
    a COCO-format dict (`data.convert.load_split`; difficult VOC objects trained on with --train-difficult)."""
    if args.data == "shapes":
        from data.shapes import make_shapes_dataset
        data = str(make_shapes_dataset(SHAPES_ROOT))
    else:
        data = args.data
    ann, images = getattr(args, f"{split}_ann"), getattr(args, f"{split}_images")
    fmt, path = dataset_format(ann or data)
    keep_difficult = split == "train" and getattr(args, "train_difficult", False)
    if keep_difficult and fmt != "voc":  # elsewhere nothing is marked difficult (a converted json: iscrowd)
        raise ValueError(f"--train-difficult: only for a Pascal VOC folder (voc:DIR), not {fmt} data {path}")
    if fmt != "coco":
        return load_split(fmt, path, split, images, keep_difficult)
    root = dataset_format(data)[1]
    ann = path if ann else root / "annotations" / f"instances_{split}2017.json"
    images = images or root / f"{split}2017"
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
        path = resolve_pretrained(args.model or DEFAULT_MODEL, download_missing=args.download)
    else:
        path = Path(args.weights)
    model, info = detector_from_weights(path, args.model, "--weights")
    image_size = resolve_image_size(model.config, args.image_size, info["image_size"])
    return model, {**info, "image_size": image_size}
