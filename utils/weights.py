"""Reading and writing the project's `.pth` weight files, atomically.

A weight file is a dict: `{"state_dict": {...}, "model_name": str, "num_classes": int, ...metadata}`;
training checkpoints add `"ema_state_dict"` (and optimizer state etc.).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from data.atomic import atomic_open


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """`torch.save` that never leaves a half-written file (see `data.atomic`)."""
    with atomic_open(path) as f:
        torch.save(obj, f)


def save_weights(path: str | os.PathLike, state_dict: dict, **metadata) -> None:
    atomic_torch_save({"state_dict": state_dict, **metadata}, path)


VALID_FILE = ("a valid weight file is a .pth written by `python -m utils.port_tf` or by training (last.pth, "
              "best.pth), or torch.save of a state dict: tensors, numbers, strings, lists and dicts only")


def _load_failure(path: Path, error: Exception) -> str:
    """Why `torch.load(path, weights_only=True)` failed, in our words: torch's own message suggests
    `weights_only=False`, i.e. running whatever code the file holds, which this project never does."""
    unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if unsupported:
        reason = f"it holds a pickled Python object ({unsupported.group(1)}), which is not loaded for safety"
    elif "weights_only" in str(error) or "WeightsUnpickler" in str(error):
        reason = "it holds pickled Python objects other than tensors and plain data, not loaded for safety"
    else:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        reason = f"not a PyTorch file ({type(error).__name__}{': ' + first[:200] if first else ''})"
    return f"{path}: cannot be loaded: {reason}; {VALID_FILE}"


def load_pth(path: str | os.PathLike, map_location="cpu"):
    """`torch.load(path, weights_only=True)` (never anything else), with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weight file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle/zip errors carry no file name; say which file and what it should be
        raise ValueError(_load_failure(path, e)) from None


def load_weights(path: str | os.PathLike) -> tuple[dict, dict]:
    """`(state_dict, metadata)` of a weight file: a ported `.pth`, a training checkpoint (its EMA weights,
    which evaluation uses, when it has them) or a bare state dict."""
    path = Path(path)
    obj = load_pth(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a dict of weights; {VALID_FILE}")
    for key in ("ema_state_dict", "state_dict"):
        if key in obj:
            meta = {k: v for k, v in obj.items() if not k.endswith("state_dict")}
            meta["weights"] = "ema" if key == "ema_state_dict" else meta.get("weights", "model")
            return obj[key], meta
    return obj, {}


def detector_from_weights(path: str | os.PathLike, model_name: str | None = None, flag: str = "--weights"):
    """Build the detector a weight file holds and load it: `(model, info)`.

    `info`: model_name, num_classes, image_size (None if the file does not say), class_names and
    class_to_category (COCO's for 90-class files without names; else None if unknown), source. `model_name`
    must match the file's when both are known; `flag` names the file's origin in errors.
    """
    from data.coco import COCO_CATEGORY_NAMES, COCO_NUM_CLASSES
    from model import VARIANTS, build_model

    state, meta = load_weights(path)
    stored = meta.get("model_name")
    if model_name and stored and model_name != stored:
        raise ValueError(f"{flag} {path}: holds {stored} weights, but {model_name} was asked for")
    name = model_name or stored or "efficientdet-d0"
    if meta.get("backbone_only"):
        raise ValueError(f"{flag} {path}: holds backbone weights only; a detector needs full weights")
    num_classes = (meta.get("num_classes")
                   or state["class_net.predict.conv_pw.bias"].numel() // VARIANTS[name].num_anchors)
    model = build_model(name, num_classes=num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{flag} {path}: does not fit {name} with {num_classes} classes: "
                         f"{str(e).splitlines()[0]}") from e
    names, categories = meta.get("class_names"), meta.get("class_to_category")
    if names is None and num_classes == COCO_NUM_CLASSES:  # official checkpoints: COCO's 90-id label space
        names = [COCO_CATEGORY_NAMES.get(c + 1, f"unused_{c + 1}") for c in range(COCO_NUM_CLASSES)]
        categories = list(range(1, COCO_NUM_CLASSES + 1))
    return model, {"model_name": name, "num_classes": num_classes, "image_size": meta.get("image_size"),
                   "class_names": names, "class_to_category": categories, "source": str(path)}
