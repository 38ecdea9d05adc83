"""Exponential moving average of the weights and BN statistics, as the official TF1 training code.

`det_model_fn._model_fn`: `tf.train.ExponentialMovingAverage(decay=0.9998, num_updates=global_step)` applied
after every optimiser step to `utils.get_ema_vars()` = trainable variables + BN `moving_mean` /
`moving_variance`. TF computes `decay = min(decay, (1 + n) / (10 + n))` with n = global_step, read after the
optimiser step incremented it (the EMA op runs under a control dependency on the train op), so the k-th
update (k = 1, 2, ...) uses n = k; then `shadow -= (1 - decay) * (shadow - value)`. Shadows start as copies
of the initial values. Evaluation uses the shadows (`README`: EMA vs raw weights).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module itself behind DistributedDataParallel / DataParallel (`.module`) or torch.compile (`._orig_mod`)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


class ModelEMA:
    """EMA copy of a model: `module` is a deep copy in eval mode, without gradients, on the model's device.

    Call `update(model)` once after every optimiser step. Floating-point parameters and buffers (BN
    running_mean / running_var) are averaged; integer buffers (`num_batches_tracked`) are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998):
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.num_updates = 0  # official global_step: optimiser steps taken so far

    def decay_at(self, num_updates: int) -> float:
        """Official warm-up: `min(decay, (1 + n) / (10 + n))`; update k uses n = k."""
        return min(self.decay, (1.0 + num_updates) / (10.0 + num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadows towards `model` (plain, DDP-wrapped or compiled) after an optimiser step."""
        self.num_updates += 1
        decay = self.decay_at(self.num_updates)
        source = unwrap_model(model).state_dict()
        shadows, values = [], []
        for name, shadow in self.module.state_dict().items():
            value = source[name]
            if shadow.is_floating_point():
                shadows.append(shadow)
                values.append(value.to(dtype=shadow.dtype))
            else:
                shadow.copy_(value)
        torch._foreach_lerp_(shadows, values, 1.0 - decay)  # shadow += (1 - decay) * (value - shadow)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
        self.decay = float(state["decay"])
