"""Building blocks of `parity.tf_parity`: one compared quantity = one check, plus the fixture-folder helpers.

A check is `{"max_abs": float, "rel": float, "tol": float, "ok": bool}`. A check may cover several tensors
(e.g. the class outputs of every level): `max_abs` is the largest |ours - reference| over all of them and
`rel` the largest per-tensor relative error, where each tensor is measured against its own magnitude:

* `"max"`:  max |Δ| / max |reference|            (network outputs, statistics, updated values)
* `"norm"`: ‖Δ‖₂ / ‖reference‖₂                  (gradients: relative to each tensor's norm)
* `"abs"`:  `tol` bounds `max_abs` itself; `rel` is reported as for `"max"`
* `"exact"`: ok only when equal (`tol` 0); `rel` is the fraction of differing entries
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from model import VARIANTS, build_model


class FixtureError(ValueError):
    """The folder is not a usable reference fixture (missing / malformed file, unknown variant)."""


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.double() if x.is_floating_point() else x
        return x.numpy()
    return np.asarray(x)


def compare(pairs: Iterable[tuple], tol: float, measure: str = "max") -> dict:
    """One check over `(ours, reference)` pairs (numpy or torch, same shapes); see the module docstring."""
    max_abs, rel = 0.0, 0.0
    for ours, ref in pairs:
        ours, ref = _numpy(ours), _numpy(ref)
        if ours.shape != ref.shape:
            raise ValueError(f"shape mismatch: ours {ours.shape}, reference {ref.shape}")
        if measure == "exact":
            differ = ours != ref
            max_abs = max(max_abs, float(np.abs(ours.astype(np.float64) - ref).max(initial=0.0)))
            rel = max(rel, float(differ.mean()) if differ.size else 0.0)
            continue
        delta = ours.astype(np.float64) - ref.astype(np.float64)
        max_abs = max(max_abs, float(np.abs(delta).max(initial=0.0)))
        if measure == "norm":
            scale = float(np.linalg.norm(ref.astype(np.float64)))
            part = float(np.linalg.norm(delta)) / scale if scale else float(np.linalg.norm(delta) > 0) * np.inf
        else:
            scale = float(np.abs(ref).max(initial=0.0))
            part = float(np.abs(delta).max(initial=0.0)) / scale if scale else float(np.abs(delta).max(initial=0.0))
        rel = max(rel, part)
    bounded = max_abs if measure in ("abs", "exact") else rel
    return {"max_abs": max_abs, "rel": rel, "tol": float(tol), "ok": bool(bounded <= tol)}


def scalar_check(ours: float, ref: float, tol: float) -> dict:
    """|ours - ref| and its ratio to |ref| for one number; `tol` bounds the ratio."""
    return compare([(np.float64(ours), np.float64(ref))], tol, "max")


def read_meta(folder: Path) -> dict:
    path = folder / "meta.json"
    if not path.is_file():
        raise FixtureError(f"{folder}: no meta.json (expected a reference fixture folder)")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FixtureError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_name"), str):
        raise FixtureError(f"{path}: expected an object with a 'model_name' string")
    return meta


def load_npz(folder: Path, name: str, keys: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """All arrays of `folder/name`; a clear FixtureError if the file or one of `keys` is missing."""
    path = folder / name
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise FixtureError(f"{path}: cannot be read as an .npz file ({e})") from None
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise FixtureError(f"{path}: missing key(s) {', '.join(missing[:5])}")
    return arrays


def variant_of(meta: dict) -> str:
    """meta.json's `model_name`, if this build has the variant."""
    name = meta["model_name"]
    if name not in VARIANTS:
        raise FixtureError(f"model_name {name!r} is not a variant of this build (known: {', '.join(VARIANTS)})")
    return name


def ported_model(checkpoint: Path, model_name: str, ema: bool) -> torch.nn.Module:
    """`model_name` with the weights of the TF checkpoint at `checkpoint` (EMA shadows or raw values)."""
    from utils.port_tf import PortError, load_tf_state_dict
    from utils.tf_checkpoint import CheckpointError

    try:
        state = load_tf_state_dict(checkpoint, model_name, ema=ema)
    except (CheckpointError, PortError, FileNotFoundError) as e:
        raise FixtureError(f"checkpoint {checkpoint}: {e}") from None
    model = build_model(model_name, num_classes=state["class_net.predict.conv_pw.bias"].numel()
                        // VARIANTS[model_name].num_anchors)
    model.load_state_dict(state)
    return model


def nhwc(t: torch.Tensor) -> np.ndarray:
    """Our `[N, C, H, W]` -> the fixtures' `[N, H, W, C]` (float64 numpy)."""
    return _numpy(t.detach().permute(0, 2, 3, 1))
