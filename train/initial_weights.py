"""Where a training run's weights start: random (the official initialisation), the official COCO weights
(`--pretrained`), any of this project's checkpoints (`--weights`), or an EfficientNet backbone
(`--backbone-weights`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from model import EfficientDet
from utils.cli import check_download_flag
from utils.pretrained import resolve_pretrained
from utils.weights import load_weights


def load_initial_weights(model: EfficientDet, args: argparse.Namespace) -> str | None:
    """Load the weights the flags ask for into `model` in place; returns what was done, in one line (None
    for a random start).

    A checkpoint for another number of classes keeps everything but the class-prediction layer, which
    stays freshly prior-initialised; any other shape difference, or another variant's checkpoint, is a
    ValueError naming the file.
    """
    check_download_flag(args)
    model_name = model.config.name
    if args.backbone_weights:
        state, _ = load_weights(args.backbone_weights)
        heads = ("fpn.", "class_net.", "box_net.")
        model.backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()
                                        if not k.startswith(heads)})
        return f"backbone initialised from {args.backbone_weights}"
    if not (args.pretrained or args.weights):
        return None
    path = (resolve_pretrained(model_name, download_missing=args.download) if args.pretrained
            else Path(args.weights))
    state, meta = load_weights(path)
    if meta.get("model_name") not in (None, model_name):
        raise ValueError(f"--weights {path}: holds {meta['model_name']} weights, not {model_name}")
    own = model.state_dict()
    differ = [k for k in state if k in own and state[k].shape != own[k].shape]
    if differ and not all(k.startswith("class_net.predict.conv_pw") for k in differ):
        raise ValueError(f"--weights {path}: shapes differ from {model_name} at {', '.join(differ[:4])}")
    for k in differ:  # another number of classes: keep the fresh prior-initialised class predictor
        state[k] = own[k]
    model.load_state_dict(state)
    return f"initialised from {path}" + (f"; class-prediction layer re-initialised for "
                                         f"{model.config.num_classes} classes" if differ else "")
