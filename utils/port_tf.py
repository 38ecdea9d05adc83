"""Port an official TF EfficientDet (or EfficientNet backbone) checkpoint to a PyTorch weight file.

    python -m utils.port_tf --model efficientdet-d0 --checkpoint efficientdet-d0/ \
        --output weights/efficientdet-d0.pth

Reads the checkpoint with numpy only (no TensorFlow). By default every variable is taken from its
`<name>/ExponentialMovingAverage` shadow, as official evaluation does (`inference.restore_ckpt`);
`--no-ema` takes the raw values. The port is all or nothing: a missing, unused or mis-shaped variable,
or a checkpoint of another variant, is an error and nothing is written.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from model import VARIANTS, build_model, get_config
from utils.tf_checkpoint import CheckpointError, TFCheckpointReader
from utils.tf_names import backbone_names, efficientdet_names
from utils.weights import save_weights

EMA_SUFFIX = "/ExponentialMovingAverage"
# Training state that is not part of the model: step counter and optimizer slots.
_NON_MODEL = re.compile(r"^(global_step|beta[12]_power)$|/(Momentum|RMSProp(_1)?|Adam(_1)?)$")
# Parts of an ImageNet EfficientNet that the detector has no use for (1x1 head conv, its BN, classifier).
_CLASSIFIER = re.compile(r"^efficientnet-(b|lite)\d/head/")


class PortError(ValueError):
    """The checkpoint does not fit the requested model; nothing was written."""


@dataclass
class PortResult:
    state_dict: dict[str, torch.Tensor]
    model_name: str
    num_classes: int | None  # None for a backbone-only port
    ema: bool  # True when the EMA shadows were used
    raw_fallback: list[str] = field(default_factory=list)  # variables without a shadow, taken raw

    def save(self, path, source: str) -> None:
        """Write the weight file (atomically), with what it is and where it came from."""
        save_weights(path, self.state_dict, model_name=self.model_name, num_classes=self.num_classes,
                     ema=self.ema, backbone_only=self.num_classes is None, source=source)


def describe_checkpoint(reader: TFCheckpointReader) -> dict:
    """The architecture a checkpoint was saved from, read off its variable names and shapes."""
    names = [n for n in reader.names() if not n.endswith(EMA_SUFFIX)]
    stems = [n.split("/")[0] for n in names if n.endswith("/stem/conv2d/kernel")]
    if len(stems) != 1:
        raise PortError(f"{reader.prefix}: not an EfficientDet/EfficientNet checkpoint "
                        f"(expected one '<backbone>/stem/conv2d/kernel' variable, found {len(stems)})")
    info: dict = {"backbone": stems[0]}
    if "class_net/class-predict/pointwise_kernel" not in names:
        return info
    levels = sorted({int(m.group(1)) for n in names if (m := re.match(r"class_net/class-0-bn-(\d+)/", n))})
    info.update(
        fpn_width=reader.shape("class_net/class-predict/pointwise_kernel")[2],
        fpn_cells=len({m.group(1) for n in names if (m := re.match(r"fpn_cells/cell_(\d+)/", n))}),
        head_repeats=len({n for n in names if re.fullmatch(r"class_net/class-\d+/pointwise_kernel", n)}),
        levels=(levels[0], levels[-1]) if levels else None,
        fusion="fastattn" if any(re.search(r"/WSM(_\d+)?$", n) for n in names) else "sum",
        class_outputs=reader.shape("class_net/class-predict/pointwise_kernel")[3],
    )
    return info


def _expected(name: str) -> dict:
    cfg = VARIANTS[name]
    return {"backbone": cfg.backbone_name, "fpn_width": cfg.fpn_num_filters, "fpn_cells": cfg.fpn_cell_repeats,
            "head_repeats": cfg.box_class_repeats, "levels": (cfg.min_level, cfg.max_level),
            "fusion": cfg.fpn_weight_method}


_FIELD_NAMES = {"backbone": "backbone", "fpn_width": "fpn width", "fpn_cells": "BiFPN cells",
                "head_repeats": "head repeats", "levels": "levels (min, max)", "fusion": "fusion"}


def check_variant(info: dict, model_name: str, prefix: str) -> None:
    """Raise a PortError naming the differences (and the likely variant) when `info` is not `model_name`."""
    fields = [k for k in _FIELD_NAMES if k in info]
    want = _expected(model_name)
    diffs = [f"checkpoint has {_FIELD_NAMES[k]} {info[k]}, {model_name} expects {want[k]}"
             for k in fields if info[k] != want[k]]
    if not diffs:
        return
    guesses = [n for n in VARIANTS if all(_expected(n)[k] == info[k] for k in fields)]
    hint = f": is this {' or '.join(guesses)}?" if guesses else ""
    raise PortError(f"{prefix}: " + "; ".join(diffs) + hint)


def tf_to_torch(tf_name: str, array: np.ndarray, dtype: np.dtype = np.float32) -> torch.Tensor:
    """TF layouts -> PyTorch: conv kernel HWIO -> OIHW, depthwise HWC1 -> C1HW, the rest unchanged; values in
    `dtype` (float32 for the model; `parity.training` keeps a float64 reference's float64)."""
    if tf_name.endswith("depthwise_kernel"):
        array = array.transpose(2, 3, 0, 1)
    elif tf_name.endswith("kernel"):
        array = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
    return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))


def _summarise(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def port_tf_checkpoint(checkpoint, model_name: str, ema: bool = True, backbone_only: bool = False) -> PortResult:
    """Port the checkpoint at `checkpoint` (folder or prefix) into `model_name`'s PyTorch layout.

    `backbone_only` ports `efficientnet-bN/...` (`efficientnet-liteN/...` for a Lite model) variables into
    the backbone alone (keys relative to `model.backbone`), e.g. from an official ImageNet EfficientNet
    (-Lite) checkpoint.
    """
    get_config(model_name)  # a clear error for an unknown name
    reader = TFCheckpointReader(checkpoint)
    info = describe_checkpoint(reader)
    if not backbone_only and "fpn_width" not in info:
        raise PortError(f"{reader.prefix}: has only backbone variables ({info['backbone']}); "
                        f"use --backbone-only to port it into the backbone of {model_name}")
    check_variant(info if not backbone_only else {"backbone": info["backbone"]}, model_name, reader.prefix)

    num_classes = None
    if not backbone_only:
        anchors = VARIANTS[model_name].num_anchors
        if info["class_outputs"] % anchors:
            raise PortError(f"{reader.prefix}: class-predict has {info['class_outputs']} outputs, "
                            f"not a multiple of {anchors} anchors")
        num_classes = info["class_outputs"] // anchors
    with torch.device("meta"):  # structure and shapes only, no allocation or initialisation
        model = build_model(model_name, num_classes=num_classes or 1)
    module = model.backbone if backbone_only else model
    names = backbone_names(model.backbone) if backbone_only else efficientdet_names(model)
    target = module.state_dict()

    has_shadows = any(n.endswith(EMA_SUFFIX) for n in reader.names())
    use_ema = ema and has_shadows
    state, missing, mismatched, used, raw_fallback = {}, [], [], set(), []
    for key, tf in names.items():
        tf_list = tf if isinstance(tf, list) else [tf]
        sources = []
        for n in tf_list:
            shadow = n + EMA_SUFFIX
            if use_ema and shadow in reader:
                sources.append(shadow)
            elif n in reader:
                sources.append(n)
                raw_fallback += [n] if use_ema else []
            else:
                missing.append(n)
            used.add(n)
        if len(sources) < len(tf_list):
            continue
        arrays = [reader.read(n) for n in sources]
        tensor = tf_to_torch(tf_list[0], np.stack(arrays) if isinstance(tf, list) else arrays[0])
        if tensor.shape != target[key].shape:
            mismatched.append(f"{tf} {tuple(arrays[0].shape)} -> {key} expects {tuple(target[key].shape)}")
            continue
        state[key] = tensor

    variables = {n.removesuffix(EMA_SUFFIX) for n in reader.names()}
    unused = [n for n in variables if n not in used and not _NON_MODEL.search(n)
              and not (backbone_only and (_CLASSIFIER.match(n) or not n.startswith(info["backbone"] + "/")))]
    problems = []
    if missing:
        problems.append(f"{len(missing)} variable(s) missing from the checkpoint: {_summarise(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_summarise(mismatched, 4)}")
    if unused:
        problems.append(f"{len(unused)} checkpoint variable(s) not used by {model_name}: {_summarise(unused)}")
    if problems:
        raise PortError(f"{reader.prefix}: cannot port into {model_name}: " + "; ".join(problems))
    for key in target:  # BN step counters have no TF counterpart
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0, dtype=torch.long)
    return PortResult(state, model_name, num_classes, use_ema, raw_fallback)


def load_tf_state_dict(checkpoint, model_name: str, ema: bool = True, backbone_only: bool = False) -> dict:
    """The PyTorch state dict of an official TF checkpoint (see `port_tf_checkpoint`)."""
    return port_tf_checkpoint(checkpoint, model_name, ema, backbone_only).state_dict


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.port_tf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=list(VARIANTS), help="variant to port into")
    parser.add_argument("--checkpoint", required=True,
                        help="TF checkpoint folder (holding a 'checkpoint' file) or prefix (e.g. .../model)")
    parser.add_argument("--output", required=True, help="PyTorch weight file to write (.pth)")
    parser.add_argument("--no-ema", action="store_true",
                        help="use the raw variables instead of their ExponentialMovingAverage shadows")
    parser.add_argument("--backbone-only", action="store_true",
                        help="port an ImageNet EfficientNet (efficientnet-bN/... or efficientnet-liteN/...) "
                             "checkpoint into the backbone only")
    args = parser.parse_args(argv)
    try:
        result = port_tf_checkpoint(args.checkpoint, args.model, ema=not args.no_ema,
                                    backbone_only=args.backbone_only)
    except (CheckpointError, PortError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.no_ema is False and not result.ema:
        print("note: the checkpoint has no ExponentialMovingAverage shadows; raw values were used")
    if result.raw_fallback:
        print(f"note: {len(result.raw_fallback)} variable(s) had no EMA shadow and were taken raw: "
              f"{_summarise(result.raw_fallback)}")
    result.save(args.output, source=str(args.checkpoint))
    n = sum(t.numel() for k, t in result.state_dict.items() if not k.endswith("num_batches_tracked"))
    what = "backbone of " if args.backbone_only else ""
    print(f"wrote {args.output}: {what}{args.model}, {len(result.state_dict)} tensors, {n:,} values, "
          f"{'EMA' if result.ema else 'raw'} weights" + (f", {result.num_classes} classes" if result.num_classes else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
