"""Reading and writing the project's `.pth` weight files, atomically.

A weight file is a dict: `{"state_dict": {...}, "model_name": str, "num_classes": int, ...metadata}`;
training checkpoints add `"ema_state_dict"` (and optimizer state etc.).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from utils.atomic import atomic_open


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """`torch.save` that never leaves a half-written file (see `utils.atomic`)."""
    with atomic_open(path) as f:
        torch.save(obj, f)


def save_weights(path: str | os.PathLike, state_dict: dict, **metadata) -> None:
    atomic_torch_save({"state_dict": state_dict, **metadata}, path)


def load_weights(path: str | os.PathLike) -> tuple[dict, dict]:
    """`(state_dict, metadata)` of a weight file: a ported `.pth`, a training checkpoint (its EMA weights,
    which evaluation uses, when it has them) or a bare state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weight file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors carry no file name; say which file and what it should be
        raise ValueError(f"{path}: not a readable PyTorch weight file ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of weights, found {type(obj).__name__}")
    for key in ("ema_state_dict", "state_dict"):
        if key in obj:
            meta = {k: v for k, v in obj.items() if not k.endswith("state_dict")}
            meta["weights"] = "ema" if key == "ema_state_dict" else meta.get("weights", "model")
            return obj[key], meta
    return obj, {}
