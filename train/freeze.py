"""`--freeze backbone|backbone+fpn`: fine-tune the heads only, or the heads and the BiFPN.

A frozen part is frozen whole: its parameters get no gradient (so `build_optimizer`, which takes only
parameters that require one, leaves them out), and its BatchNorm layers stay in eval mode, normalising with
their running statistics and never updating them. The eval mode survives every later `model.train()`:
the frozen module's own `train` is replaced by one that always sets eval mode, and `nn.Module.train`
reaches children through their `train` method. (The official `var_freeze_expr` of `tf2/train_lib.py` only
leaves the matching variables out of the gradient; BN statistics there still follow the batches.)
"""
from __future__ import annotations

import types

from torch import nn

# --freeze value -> the model's submodules it freezes (EfficientDet attributes).
FREEZE_PARTS = {"backbone": ("backbone",), "backbone+fpn": ("backbone", "fpn")}


def check_freeze_start(args) -> None:
    """Refuse `--freeze` of a part that would keep its random initialisation (a new run that loads no trained
    weights for it); a one-line ValueError, before any work."""
    what = args.freeze
    if what is None or args.resume or args.pretrained or args.weights:
        return
    if what == "backbone" and args.backbone_weights:
        return
    sources = "--pretrained, --weights" + (" or --backbone-weights" if what == "backbone" else "")
    raise ValueError(f"--freeze {what}: the frozen part would keep its random initialisation; start from trained "
                     f"weights ({sources})")


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)


def freeze_(model: nn.Module, what: str | None) -> list[str]:
    """Freeze the parts `FREEZE_PARTS[what]` of `model` in place (nothing for None); returns their names."""
    if what is None:
        return []
    if what not in FREEZE_PARTS:
        raise ValueError(f"--freeze {what}: expected one of {', '.join(FREEZE_PARTS)}")
    for name in FREEZE_PARTS[what]:
        part = getattr(model, name)
        part.requires_grad_(False)
        part.train = types.MethodType(_stay_in_eval, part)  # also what deepcopy (the EMA) copies
        part.eval()
    return list(FREEZE_PARTS[what])
