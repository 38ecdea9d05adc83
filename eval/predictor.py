"""`Predictor`: images in, boxes out, the way `-mode infer` detects them.

    predictor = Predictor.from_pretrained("efficientdet-d0")          # or Predictor.from_weights("best.pth")
    result = predictor.predict("photo.jpg", threshold=0.4)           # a dict; a list of inputs gives a list
    result["boxes"]   # float32 [K, 4] (xmin, ymin, xmax, ymax) in the photo's pixels (torchvision's layout)
    result["scores"]  # float32 [K], best first
    result["labels"]  # int64 [K]: the dataset's category ids (COCO's 1..90 for the official weights)
    result["names"]   # list of K class names

One code path with `-mode infer` (which runs on it): the official preprocessing (`preprocess_for_eval`:
aspect-preserving resize to the network size, zero padding), the network as `Detector` runs it (fused, or
an exported model on ONNX Runtime / OpenVINO), the official image post-processing (best class per anchor,
class-agnostic NMS, hard or soft), then boxes clipped to the photo. The project's `Detections` are
(ymin, xmin, ymax, xmax); the dicts returned here are (xmin, ymin, xmax, ymax).

Inputs (`as_rgb_arrays`): a path, a PIL image, a uint8 `[H, W, 3]` RGB numpy array, a `[3, H, W]` (CHW)
tensor of uint8 0..255 or of floats in [0, 1] (quantised to 8 bits, `round(x * 255)`, as the official
pipeline decodes 8-bit images), or a list or tuple of them of any sizes. Files and PIL images are turned
upright by their EXIF orientation (as `-mode infer` does), so a path and `Image.open(path)` give the same
boxes. Anything else is one ValueError / TypeError naming the input, what it is and what is expected.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from data.image_io import read_rgb, to_rgb8
from data.transforms import preprocess_for_eval
from deploy.backends import network_from_args
from eval.evaluator import Detector
from model.postprocess import MAX_DETECTIONS, Detections
from utils.cli import load_detector, resolve_device
from utils.image_size import resolve_image_size
from utils.pretrained import resolve_pretrained
from utils.weights import detector_from_weights

NMS_METHODS = ("hard", "soft")
EXPECTED = ("a path, a PIL image, a uint8 numpy array [H, W, 3] (RGB), a tensor [3, H, W] (uint8 0..255 or "
            "float 0..1), or a list of them")


def _describe(value) -> str:
    """What a bad input is, for error messages: its type and, for arrays and tensors, dtype and shape."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        kind = "numpy array" if isinstance(value, np.ndarray) else "tensor"
        return f"a {kind} of dtype {str(value.dtype).removeprefix('torch.')} and shape {list(value.shape)}"
    name = type(value).__qualname__ if type(value).__module__ == "builtins" else \
        f"{type(value).__module__}.{type(value).__qualname__}"
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def _tensor_to_rgb(tensor: torch.Tensor, name: str) -> np.ndarray:
    """A CHW tensor (uint8 0..255, or float 0..1) -> uint8 `[H, W, 3]`."""
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        hint = "; an HWC tensor? use tensor.permute(2, 0, 1)" if tensor.ndim == 3 and tensor.shape[2] == 3 else ""
        hint = "; a batch? pass list(tensor)" if tensor.ndim == 4 else hint
        raise ValueError(f"{name}: {_describe(tensor)}; expected a CHW tensor [3, H, W]{hint}")
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.uint8:
        return tensor.permute(1, 2, 0).contiguous().numpy()
    if not tensor.is_floating_point():
        raise ValueError(f"{name}: {_describe(tensor)}; expected uint8 (0..255) or a float dtype (0..1)")
    values = tensor.float()
    low, high = (float(values.min()), float(values.max())) if values.numel() else (0.0, 0.0)
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 1:
        raise ValueError(f"{name}: a float tensor with values {low:g}..{high:g}; expected values in [0, 1] "
                         f"(or a uint8 tensor 0..255)")
    return values.mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def _one_rgb(value, name: str) -> np.ndarray:
    """One input -> uint8 `[H, W, 3]` RGB (see the module docstring for the kinds)."""
    if isinstance(value, (str, os.PathLike)):
        array = read_rgb(value, exif_transpose=True)  # ImageReadError names the file and the reason
    elif isinstance(value, Image.Image):
        array = to_rgb8(ImageOps.exif_transpose(value), name)
    elif isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim != 3 or value.shape[2] != 3:
            raise ValueError(f"{name}: {_describe(value)}; expected a uint8 numpy array [H, W, 3] (RGB)")
        array = np.ascontiguousarray(value)
    elif isinstance(value, torch.Tensor):
        array = _tensor_to_rgb(value, name)
    else:
        raise TypeError(f"{name}: {_describe(value)}; expected {EXPECTED}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name}: an empty image ({array.shape[0]} x {array.shape[1]} pixels)")
    return array


def as_rgb_arrays(inputs) -> tuple[list[np.ndarray], bool]:
    """`(uint8 [H, W, 3] RGB arrays, single)`: `single` is True when `inputs` was one image, not a list."""
    if isinstance(inputs, (list, tuple)):
        return [_one_rgb(value, f"inputs[{i}]") for i, value in enumerate(inputs)], False
    return [_one_rgb(inputs, "input")], True


def photo_detections(dets: Detections, i: int, height: int, width: int, threshold: float,
                     max_detections: int = MAX_DETECTIONS) -> dict[str, torch.Tensor]:
    """Image `i` of a batch of `Detections` as drawn and written: score >= `threshold`, boxes clipped to the
    `height` x `width` photo (the official path clips to the padded network frame), boxes left without area
    at detections.json's 0.01 px dropped, at most `max_detections`, best first.

    Returns `boxes` float32 `[K, 4]` (xmin, ymin, xmax, ymax) original px, `scores` float32 `[K]`,
    `classes` int64 `[K]` (0-based indices into the class outputs). Clipping and the area test run on Python
    floats, as detections.json's rounding does (`eval.infer.image_detections`); clipping float32 values to
    integer bounds is exact, so the float32 tensors hold exactly the values that are rounded and written.
    """
    count = int(dets.num_valid[i])
    rows = zip(dets.boxes[i, :count].tolist(), dets.scores[i, :count].tolist(), dets.classes[i, :count].tolist())
    boxes, scores, classes = [], [], []
    for (ymin, xmin, ymax, xmax), score, c in rows:
        if len(scores) == max_detections:
            break
        if score < threshold:
            continue
        ymin, ymax = (min(max(v, 0.0), height) for v in (ymin, ymax))
        xmin, xmax = (min(max(v, 0.0), width) for v in (xmin, xmax))
        if round(xmax - xmin, 2) <= 0 or round(ymax - ymin, 2) <= 0:
            continue
        boxes.append((xmin, ymin, xmax, ymax))
        scores.append(score)
        classes.append(c)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "classes": torch.tensor(classes, dtype=torch.int64)}


class Predictor:
    """A detector ready to run: weights, network (torch, fused; or an export on another engine), classes.

    Build it with `from_pretrained` / `from_weights` (options below), then call `predict`.

    Options: device "auto" (cuda if available) | "cpu" | "cuda[:N]"; precision "fp32" | "bf16" | "fp16" |
    "int8" (with backend "onnxruntime" / "openvino": an INT8 export, from `exported` or quantized once after
    calibrating on the training images of the folder `calibration_images`, `calibration_count` of them,
    default 300); backend "torch" | "onnxruntime" | "openvino" (CPU; the weights are exported once into
    runs/export-cache/, or `exported` names a folder written by `-mode export`); image_size S or (H, W) or
    "WxH" (default: the one stored with the weights, else the variant's); nms "hard" | "soft" (the default of
    `predict`); compile (torch.compile the network); batch_size (images per forward pass in `predict`);
    tta None | "flip" | "scales" | "flip+scales" (test-time augmentation fused by WBF, `eval.tta`). A bad
    value is one error naming the keyword.
    """

    def __init__(self, model, info: dict, device: str = "auto", precision: str = "fp32", backend: str = "torch",
                 exported: str | os.PathLike | None = None, nms: str = "hard", compile: bool = False,
                 batch_size: int = 1, tta: str | None = None, calibration_images: str | os.PathLike | None = None,
                 calibration_count: int | None = None):
        _check_choice("nms", nms, NMS_METHODS)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size {batch_size!r}: expected an integer >= 1")
        self.device = resolve_device(device)
        self.model_name, self.image_size = info["model_name"], info["image_size"]
        num_classes = info["num_classes"]
        self.class_names = list(info["class_names"] or [f"class_{c}" for c in range(num_classes)])
        self.categories = [cat or c + 1 for c, cat in enumerate(info["class_to_category"] or [None] * num_classes)]
        self.config, self.nms, self.batch_size, self.precision, self.tta = model.config, nms, batch_size, precision, tta
        flags = argparse.Namespace(backend=backend, exported=exported, precision=precision, compile=compile,
                                   device=device, calibration_images=calibration_images,
                                   calibration_count=calibration_count)
        network = network_from_args(flags, model, info)
        self.model = model.to(self.device).eval()
        self._detectors = {nms: Detector(self.model, self.image_size, "infer", nms, precision, compile, network, tta)}

    @classmethod
    def from_weights(cls, path: str | os.PathLike, model_name: str | None = None, image_size=None, **options):
        """A weight file of this project (`python -m utils.port_tf`, or training's best.pth / last.pth: EMA
        weights), with its variant, classes and image size; `model_name` must match the file's if given."""
        model, info = detector_from_weights(path, model_name, "weights")
        size = resolve_image_size(model.config, image_size, info["image_size"], flag="image_size")
        return cls(model, {**info, "image_size": size}, **options)

    @classmethod
    def from_pretrained(cls, model_name: str = "efficientdet-d0", download: bool = False, image_size=None,
                        **options):
        """The official COCO weights of `model_name`, found, ported or (`download=True`) fetched as
        `--pretrained` does (`utils.pretrained`: weights/ of the repository, or $EFFICIENTDET_WEIGHTS_DIR)."""
        return cls.from_weights(resolve_pretrained(model_name, download_missing=download), model_name,
                                image_size, **options)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Predictor":
        """The predictor of `-mode infer`'s flags (model, weights, image size, inference flags, nms, batch)."""
        model, info = load_detector(args)
        return cls(model, info, device=args.device, precision=args.precision, backend=args.backend,
                   exported=args.exported, nms=args.nms, compile=args.compile, batch_size=args.batch_size,
                   tta=args.tta, calibration_images=args.calibration_images,
                   calibration_count=args.calibration_count)

    def _detector(self, nms: str) -> Detector:
        """The Detector of NMS method `nms`; all share the one prepared network."""
        if nms not in self._detectors:
            _check_choice("nms", nms, NMS_METHODS)
            network = next(iter(self._detectors.values())).model
            self._detectors[nms] = Detector(self.model, self.image_size, "infer", nms, self.precision,
                                            network=network, tta=self.tta)
        return self._detectors[nms]

    def detections(self, images: list[np.ndarray], nms: str | None = None) -> Detections:
        """One batch of uint8 `[H, W, 3]` RGB arrays (any sizes) -> `Detections` (yxyx, original px, up to
        100 per image, unthresholded): official preprocessing, network, official image post-processing (and
        the TTA's other passes, which resize the arrays themselves)."""
        processed = [preprocess_for_eval(a, self.image_size, self.config.mean_rgb, self.config.stddev_rgb)
                     for a in images]
        tensors, scales = zip(*processed)
        return self._detector(nms or self.nms)(torch.stack(tensors).to(self.device),
                                               torch.tensor(scales, device=self.device), list(images))

    def predict(self, inputs, threshold: float = 0.4, nms: str | None = None,
                max_detections: int = MAX_DETECTIONS):
        """Detect objects in `inputs` (one image, or a list / tuple of images; kinds in the module docstring).

        threshold: minimum score in [0, 1]; nms: "hard" (IoU 0.5) or "soft" (official gaussian), default
        the predictor's; max_detections: 1..100 (the official post-processing keeps at most 100).
        Returns for each image a dict: `boxes` float32 `[K, 4]` (xmin, ymin, xmax, ymax) in its pixels,
        `scores` float32 `[K]` best first, `labels` int64 `[K]` (category ids), `names` (K class names);
        one dict for one image, a list of dicts for a list.
        """
        if not (isinstance(threshold, (int, float)) and 0 <= threshold <= 1):
            raise ValueError(f"threshold {threshold!r}: expected a number in [0, 1]")
        if not (isinstance(max_detections, int) and 1 <= max_detections <= MAX_DETECTIONS):
            raise ValueError(f"max_detections {max_detections!r}: expected an integer in [1, {MAX_DETECTIONS}] "
                             f"(the official post-processing keeps at most {MAX_DETECTIONS})")
        if nms is not None:
            _check_choice("nms", nms, NMS_METHODS)
        images, single = as_rgb_arrays(inputs)
        results = []
        with tqdm(total=len(images), desc="detect", unit="img", leave=False, dynamic_ncols=True,
                  disable=len(images) <= self.batch_size) as bar:
            for start in range(0, len(images), self.batch_size):
                batch = images[start:start + self.batch_size]
                dets = self.detections(batch, nms)
                for i, array in enumerate(batch):
                    found = photo_detections(dets, i, array.shape[0], array.shape[1], threshold, max_detections)
                    classes = found["classes"].tolist()
                    results.append({"boxes": found["boxes"], "scores": found["scores"],
                                    "labels": torch.tensor([self.categories[c] for c in classes], dtype=torch.int64),
                                    "names": [self.class_names[c] for c in classes]})
                bar.update(len(batch))
        return results[0] if single else results

    def __repr__(self) -> str:
        tta = f", tta {self.tta}" if self.tta else ""
        return (f"Predictor({self.model_name}, {len(self.class_names)} classes, image size "
                f"{self.image_size[0]}x{self.image_size[1]}, {self.device}, {self.precision}, nms {self.nms}{tta})")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r}: expected one of {', '.join(map(repr, choices))}")
