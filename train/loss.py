"""Detection loss, as the official `det_model_fn.detection_loss` (also `tf2/train_lib.py` `FocalLoss`, `BoxLoss`).

    normaliser = positives in the batch + 1
    cls_loss   = sum over all anchors and classes of focal(logit, one-hot) / normaliser   (anchors IGNORE = -2 skipped)
    box_loss   = sum of Huber(delta) over box-target entries != 0 / (4 * normaliser)
    loss       = cls_loss + box_loss_weight * box_loss

Everything is computed in float32 for float32 / bf16 / fp16 (autocast) outputs, and in float64 for a float64
model (`loss_dtype`; the parity's exact step, `parity.training`). The focal loss is one autograd
node that keeps only the logits for backward (the gradient is recomputed), instead of the half-dozen
`[B, A, C]` temporaries a composition of elementwise ops would hold on to (D0: B x 49,104 x 90 each).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model import flatten_outputs

from .assign import IGNORE


def loss_dtype(outputs: torch.Tensor) -> torch.dtype:
    """The dtype the loss of `outputs` is computed in: at least float32 (float64 stays float64)."""
    return torch.promote_types(outputs.dtype, torch.float32)


def _signed_logits(logits: torch.Tensor, positive_index: torch.Tensor) -> torch.Tensor:
    """z = logit for y = 0, -logit for y = 1 (entries `positive_index` of the flattened tensor).

    With z, the official terms become: 1 - p_t = sigmoid(z), and the cross-entropy with the smoothed label
    y' = y (1 - s) + s / 2 is softplus(z) - (s / 2) z.
    """
    z = logits.clone()
    flat = z.view(-1)
    flat[positive_index] = -flat[positive_index]
    return z


def _power(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """`x ** gamma` for x in [0, 1]. The official gamma 1.5 as `x * sqrt(x)` (within an ulp of `pow`): ATen's
    pow with a fractional exponent costs ~4x more on CPU, ~40 ms a step over D0's 4 x 4.4 M logits."""
    return x.sqrt().mul_(x) if gamma == 1.5 else x.pow(gamma)


class _SigmoidFocalLoss(torch.autograd.Function):
    """Sum of the official focal loss over `logits [B, A, C]` for `cls_targets [B, A]` (one-hot, no background
    class; IGNORE rows contribute nothing). Elementwise, with z as in `_signed_logits` and s = smoothing:

        loss = alpha_t * sigmoid(z)^gamma * (softplus(z) - s/2 * z),   alpha_t = alpha (y = 1), 1 - alpha (y = 0)
        dloss/dz = alpha_t * sigmoid(z)^gamma * (gamma * (1 - sigmoid(z)) * ce + sigmoid(z) - s/2),  dz/dx = -+1

    As official, the modulating factor uses the unsmoothed label (`det_model_fn.focal_loss`). Computed one
    image at a time: the `[A, C]` temporaries then take 1/B of the memory they would for the whole batch,
    at the step's memory peak (all activations alive).
    """

    @staticmethod
    def _terms(logits, cls_targets, label_smoothing):
        """One image: logits `[A, C]`, cls_targets `[A]`."""
        positive = cls_targets >= 0
        num_classes = logits.shape[-1]
        positive_index = torch.nonzero(positive).squeeze(1) * num_classes + cls_targets[positive]
        z = _signed_logits(logits, positive_index)
        ce = F.softplus(z)
        if label_smoothing:
            ce.sub_(z, alpha=label_smoothing / 2)
        keep = (cls_targets != IGNORE).to(logits.dtype)
        return z, ce, positive, positive_index, keep

    @staticmethod
    def per_anchor(logits, cls_targets, alpha: float, gamma: float, label_smoothing: float) -> torch.Tensor:
        """One image: logits `[A, C]`, cls_targets `[A]` -> the loss summed over classes `[A]` (0 if IGNORE)."""
        z, ce, positive, positive_index, keep = _SigmoidFocalLoss._terms(logits, cls_targets, label_smoothing)
        element = _power(torch.sigmoid(z), gamma).mul_(ce)  # loss without alpha_t
        per_anchor = element.sum(-1).mul_(1 - alpha)
        # alpha_t: 1 - alpha everywhere, then alpha - (1 - alpha) more on the (few) positive entries.
        per_anchor[positive] += (2 * alpha - 1) * element.view(-1)[positive_index]
        return per_anchor.mul_(keep)

    @staticmethod
    def forward(ctx, logits, cls_targets, alpha: float, gamma: float, label_smoothing: float):
        total = logits.new_zeros(())
        for image_logits, targets in zip(logits, cls_targets):
            total += _SigmoidFocalLoss.per_anchor(image_logits, targets, alpha, gamma, label_smoothing).sum()
        ctx.save_for_backward(logits, cls_targets)
        ctx.params = (alpha, gamma, label_smoothing)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        logits, cls_targets = ctx.saved_tensors
        alpha, gamma, label_smoothing = ctx.params
        grads = torch.empty_like(logits)
        for image_logits, targets, grad in zip(logits, cls_targets, grads):
            z, ce, _, positive_index, keep = _SigmoidFocalLoss._terms(image_logits, targets, label_smoothing)
            sig = torch.sigmoid(z)
            torch.sub(1, sig, out=grad).mul_(ce).mul_(gamma).add_(sig).sub_(label_smoothing / 2)
            grad.mul_(_power(sig, gamma))  # d loss / dz without alpha_t
            flat = grad.view(-1)
            positive_grad = flat[positive_index] * -alpha  # alpha_t = alpha and dz/dx = -1 on positive entries
            grad.mul_(1 - alpha)
            flat[positive_index] = positive_grad
            grad.mul_(keep[..., None]).mul_(grad_output)
        return grads, None, None, None, None


def focal_loss_sum(logits: torch.Tensor, cls_targets: torch.Tensor, alpha: float = 0.25, gamma: float = 1.5,
                   label_smoothing: float = 0.0) -> torch.Tensor:
    """Unnormalised focal loss: `logits [B, A, C]` (any float dtype, computed in `loss_dtype`), `cls_targets
    [B, A]` int64 (class >= 0 positive, -1 background, -2 ignored) -> scalar."""
    return _SigmoidFocalLoss.apply(logits.to(loss_dtype(logits)).contiguous(), cls_targets, alpha, gamma,
                                   label_smoothing)


@torch.no_grad()
def focal_loss_per_anchor(logits: torch.Tensor, cls_targets: torch.Tensor, alpha: float = 0.25,
                          gamma: float = 1.5, label_smoothing: float = 0.0) -> torch.Tensor:
    """The terms of `focal_loss_sum` summed over classes only: `[B, A]` in `loss_dtype` (no gradient), for
    inspection (the official per-anchor loss map before normalisation)."""
    logits = logits.to(loss_dtype(logits))
    return torch.stack([_SigmoidFocalLoss.per_anchor(image_logits, targets, alpha, gamma, label_smoothing)
                        for image_logits, targets in zip(logits, cls_targets)])


def box_loss_sum(box_outputs: torch.Tensor, box_targets: torch.Tensor, delta: float = 0.1) -> torch.Tensor:
    """Unnormalised Huber loss `[B, A, 4]` vs `[B, A, 4]` -> scalar, over target entries != 0 only.

    Official `_box_loss`: `tf.losses.huber_loss(weights=box_targets != 0, reduction=SUM)`. The mask is per
    entry: a positive anchor whose target is exactly 0 in a coordinate has no loss there.
    """
    dtype = loss_dtype(box_outputs)
    box_targets = box_targets.to(dtype)  # float32 targets (as official) are exact in float64
    loss = F.huber_loss(box_outputs.to(dtype), box_targets, reduction="none", delta=delta)
    return torch.where(box_targets != 0, loss, 0.0).sum()


def detection_loss(cls_outputs: list[torch.Tensor], box_outputs: list[torch.Tensor], cls_targets: torch.Tensor,
                   box_targets: torch.Tensor, num_positives: torch.Tensor, alpha: float = 0.25, gamma: float = 1.5,
                   delta: float = 0.1, box_loss_weight: float = 50.0, label_smoothing: float = 0.0,
                   num_replicas: int = 1) -> dict[str, torch.Tensor]:
    """Official detection loss from the raw head outputs.

    Args:
        cls_outputs, box_outputs: model outputs, lists over levels of `[B, A_l * C, H, W]` / `[B, A_l * 4, H, W]`.
        cls_targets `[B, A]`, box_targets `[B, A, 4]`: from `TargetAssigner`.
        num_positives (scalar): the positives of the batch (`TargetAssigner`); with `num_replicas` > 1
            processes, the mean over the processes of their batches' positives.
        alpha, gamma, delta, box_loss_weight, label_smoothing: official defaults (`hparams_config.py`).
        num_replicas: processes whose gradients are averaged (DDP). The normaliser is then
            `num_positives + 1 / num_replicas` = (positives of the global batch + 1) / num_replicas, so that
            the averaged gradient, and the mean of the processes' losses, equal those of one process given
            the whole global batch. (The official TF1 TPU path normalises by the per-replica batch alone;
            `tf2/train_lib.py` with `positives_momentum` < 0 averages `positives + 1` over the replicas:
            the same as here up to the +1, counted there once per replica.)
    Returns:
        `{"loss", "cls_loss", "box_loss", "num_positives"}`, scalars in `loss_dtype` (float32, float64 for a
        float64 model); only "loss" is optimised.
    """
    cls_logits, box_preds = flatten_outputs(cls_outputs, box_outputs)
    with torch.autocast(cls_logits.device.type, enabled=False):
        normaliser = num_positives.to(loss_dtype(cls_logits)) + 1.0 / num_replicas
        cls_loss = focal_loss_sum(cls_logits, cls_targets, alpha, gamma, label_smoothing) / normaliser
        box_loss = box_loss_sum(box_preds, box_targets, delta) / (4.0 * normaliser)
    return {"loss": cls_loss + box_loss_weight * box_loss, "cls_loss": cls_loss, "box_loss": box_loss,
            "num_positives": num_positives}
