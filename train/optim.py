"""Optimiser, L2 weight decay, gradient clipping and learning-rate schedule, as the official training code.

Official step (`det_model_fn._model_fn`, TF1 estimator path, which trained the released checkpoints):

    total_loss = det_loss + weight_decay * sum(tf.nn.l2_loss(v) for v matching '.*(kernel|weight):0$')
    grads = [tf.clip_by_norm(g, 10) for g in grads];  grads = tf.clip_by_global_norm(grads, 10)
    tf.train.MomentumOptimizer(lr(global_step), momentum=0.9).apply_gradients(grads)

`EfficientDetSGD.step` reproduces that order: the L2 gradient `wd * v` is added *before* clipping, so it is
clipped with the rest (torch's own `weight_decay` would add it after any clipping), then the momentum update,
which is TF1's: `accum = m * accum + g; v -= lr * accum` (= torch SGD, dampening 0, no Nesterov). The TF2
trainer's Keras SGD keeps `m = 0.9 m - lr g` instead: the same update for a constant rate.

Clipping is per TF variable: the BiFPN fusion weights of a node are one tensor here (`edge_weights`) but one
scalar variable each in TF (`WSM`, `WSM_1`, ...), so their gradients are clipped element by element.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


# Parameters that stack several TF scalar variables (BiFPN fast-fusion weights `WSM`, `WSM_1`, ...).
STACKED_SCALARS = ("edge_weights",)


def decay_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed) trainable parameters.

    Decayed: the weights of every `nn.Conv2d` / `nn.Linear` (TF `kernel`, `depthwise_kernel`,
    `pointwise_kernel`: the variables the official regex `.*(kernel|weight):0$` matches). Not decayed:
    BN gamma/beta, all biases, the BiFPN fusion weights `edge_weights` (TF `WSM`, `WSM_1`, ...).
    """
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) in decayed], [p for p in params if id(p) not in decayed]


def param_groups(model: nn.Module, weight_decay: float = 4e-5) -> list[dict]:
    """Groups for `EfficientDetSGD`: `{"params": conv/dense weights, "l2": weight_decay}`, the rest with
    `"l2": 0`, and (when the model has any) the stacked TF scalars of `STACKED_SCALARS` with `"l2": 0,
    "per_element": True`. `"l2"` is the official L2 coefficient (`hparams_config.weight_decay`)."""
    decayed, other = decay_parameters(model)
    stacked = {id(p) for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in STACKED_SCALARS}
    groups = [{"params": decayed, "l2": weight_decay},
              {"params": [p for p in other if id(p) not in stacked], "l2": 0.0}]
    if stacked:
        groups.append({"params": [p for p in other if id(p) in stacked], "l2": 0.0, "per_element": True})
    return groups


@torch.no_grad()
def clip_gradients_(parameters: Iterable[torch.Tensor], max_norm: float,
                    per_element: Iterable[torch.Tensor] = ()) -> torch.Tensor:
    """Official clipping, in place: each gradient to norm <= max_norm (`tf.clip_by_norm`), then all of them
    together to global norm <= max_norm (`tf.clip_by_global_norm`). Returns the global norm after clipping
    (what the official code logs as `gradient_norm`). The gradients of `per_element` parameters are clipped
    element by element (each element is its own TF variable, see `STACKED_SCALARS`).

    TF scales by `max_norm / max(norm, max_norm)`: a tensor (or the set) already within the bound is untouched.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    grads += [g for p in per_element if p.grad is not None for g in p.grad.view(-1).unbind()]  # in-place views
    if not grads:
        return torch.tensor(0.0)
    norms = torch.stack(torch._foreach_norm(grads))
    norms = norms.to(torch.promote_types(norms.dtype, torch.float32))  # float32, float64 for a float64 model
    torch._foreach_mul_(grads, list((max_norm / norms.clamp(min=max_norm)).unbind()))
    global_norm = torch.linalg.vector_norm(norms.clamp(max=max_norm))  # norms after the per-tensor clip
    scale = max_norm / global_norm.clamp(min=max_norm)
    torch._foreach_mul_(grads, scale)
    return global_norm * scale


class EfficientDetSGD(torch.optim.SGD):
    """SGD with momentum whose `step()` runs the official sequence: add L2 gradient, clip, momentum update.

    Takes param groups carrying `"l2"` (see `param_groups`). Works under `torch.amp.GradScaler`
    (`scaler.step(opt)` unscales before calling `step`). With DDP the gradients are already averaged when
    `step` runs; the official TPU code clipped each replica's gradient before its cross-replica sum.
    `last_grad_norm` holds the global gradient norm after clipping of the last step. `step` runs
    `add_l2_gradients_`, `clip_gradients_` and the SGD update, in this order.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, clip_norm: float | None = 10.0):
        super().__init__(params, lr=lr, momentum=momentum)
        self.clip_norm = clip_norm
        self.last_grad_norm: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("EfficientDetSGD.step does not take a closure (gradients are modified before the step)")
        self.add_l2_gradients_()
        if self.clip_norm:
            self.last_grad_norm = self.clip_gradients_()
        return super().step()

    @torch.no_grad()
    def add_l2_gradients_(self) -> None:
        """grad += l2 * v: the gradient of the official `reg_l2_loss` term (`reg_l2_loss`)."""
        for group in self.param_groups:
            if group.get("l2", 0.0):
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.add_(p, alpha=group["l2"])  # d/dv of l2 * sum(v^2) / 2

    def clip_gradients_(self) -> torch.Tensor:
        """The official two-stage clipping of every gradient at `clip_norm` (`clip_gradients_`)."""
        whole = [p for g in self.param_groups if not g.get("per_element") for p in g["params"]]
        split = [p for g in self.param_groups if g.get("per_element") for p in g["params"]]
        return clip_gradients_(whole, self.clip_norm, per_element=split)

    @torch.no_grad()
    def reg_l2_loss(self) -> torch.Tensor:
        """The official `reg_l2_loss` value, `sum over groups of l2 * sum(v^2) / 2` (the step adds its
        gradient; the value is only reported)."""
        dtype = next((torch.promote_types(p.dtype, torch.float32) for g in self.param_groups for p in g["params"]),
                     torch.float32)  # the model's: float32, float64 for a float64 model
        terms = [group["l2"] * sum(p.to(dtype).square().sum() for p in group["params"]) / 2
                 for group in self.param_groups if group.get("l2", 0.0)]
        return sum(terms, torch.tensor(0.0, dtype=dtype))


def build_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 4e-5,
                    clip_norm: float | None = 10.0) -> EfficientDetSGD:
    """The official optimiser for `model`; `lr` is the (already batch-scaled) base learning rate."""
    return EfficientDetSGD(param_groups(model, weight_decay), lr=lr, momentum=momentum, clip_norm=clip_norm)


def run_warmup_epochs(warmup_epochs: float, epochs: float) -> float:
    """The warm-up a run of `epochs` uses: at most a tenth of the run. The official cosine runs on `step` over
    `total - warmup` steps, so a warm-up that is a large share of a short run would send the rate to 0
    mid-run and back up."""
    return min(warmup_epochs, epochs / 10)


class CosineLrSchedule:
    """Official `cosine_lr_schedule` (`det_model_fn.py`, = `tf2/train_lib.py` `CosineLrSchedule`), per step:

        step <  warmup_steps:  warmup_init + step / warmup_steps * (base_lr - warmup_init)
        step >= warmup_steps:  0.5 * base_lr * (1 + cos(pi * step / (total_steps - warmup_steps)))

    The cosine uses `step`, not `step - warmup_steps` (as official): the rate drops at the end of the warm-up,
    reaches 0 at `total_steps - warmup_steps` and rises a little after it.

    Args:
        base_lr: official `learning_rate * global_batch / 64` (0.08 at batch 64).
        warmup_steps, total_steps: `int(epochs * steps_per_epoch)` as official; see `from_epochs`.
        warmup_init: first rate; default `base_lr / 10` (official `lr_warmup_init` 0.008, scaled by batch / 64
            like the base rate in the TF1 code `adjusted_lr_warmup_init`).
    """

    def __init__(self, base_lr: float, warmup_steps: int, total_steps: int, warmup_init: float | None = None):
        if total_steps <= warmup_steps:
            raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
        self.base_lr, self.warmup_steps, self.total_steps = base_lr, warmup_steps, total_steps
        self.warmup_init = base_lr / 10 if warmup_init is None else warmup_init

    @classmethod
    def from_epochs(cls, base_lr: float, steps_per_epoch: float, num_epochs: float, warmup_epochs: float = 1.0,
                    warmup_init: float | None = None) -> "CosineLrSchedule":
        """Official `update_learning_rate_schedule_parameters`: steps = int(epochs * steps_per_epoch), where
        steps_per_epoch = num_examples_per_epoch / global_batch may be fractional."""
        return cls(base_lr, int(warmup_epochs * steps_per_epoch), int(num_epochs * steps_per_epoch), warmup_init)

    def lr_at(self, step: int) -> float:
        """Learning rate of the update made at global step `step` (0 = the first update)."""
        if step < self.warmup_steps:
            return self.warmup_init + step / self.warmup_steps * (self.base_lr - self.warmup_init)
        return 0.5 * self.base_lr * (1 + math.cos(math.pi * step / (self.total_steps - self.warmup_steps)))

    def __call__(self, step: int) -> float:
        """`LambdaLR` factor: `lr_at(step) / base_lr` (the optimiser's lr must be `base_lr`)."""
        return self.lr_at(step) / self.base_lr

    def scheduler(self, optimizer: torch.optim.Optimizer, last_epoch: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
        """`LambdaLR` stepping per optimiser step: call `scheduler.step()` after each `optimizer.step()`."""
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", self.base_lr)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self, last_epoch=last_epoch)
