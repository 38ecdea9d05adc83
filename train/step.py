"""One optimisation step of `-mode train|trainval`, built from the trainer's flags.

    targets = TargetAssigner(gt)                        anchor labels of the batch (float32, as official)
    outputs = model(images)                             training mode, --amp autocast, the run's memory layout
    losses  = detection_loss(outputs, targets)          normalised by the positives of the global batch
    backward; EfficientDetSGD.step (+ L2 gradient, two-stage clipping, momentum update); lr schedule; EMA

`TrainStep.from_flags` is what `Trainer` runs and what `parity.training` drives on the official reference
step (with the fixture's hyper-parameters as flags), so the parity proves the step the trainer takes.
The step runs in the model's dtype: a float64 model (parity only) is fed float64 images, and the loss,
L2 term and clipping norms then follow it in float64 (`train.loss`, `train.optim`).
"""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from model import AnchorGenerator
from train.assign import TargetAssigner, Targets
from train.distributed import DistInfo, all_agree, all_mean
from train.ema import ModelEMA
from train.loss import detection_loss
from train.optim import CosineLrSchedule, EfficientDetSGD, build_optimizer, run_warmup_epochs

LOSS_TERMS = ("loss", "cls_loss", "box_loss")


def lr_schedule(args: argparse.Namespace, steps_per_epoch: int, global_batch: int) -> CosineLrSchedule:
    """The run's schedule: base rate `--lr` (default 0.08 * global batch / 64), linear warm-up over
    `run_warmup_epochs` epochs, official cosine to `--epochs` (`CosineLrSchedule`)."""
    lr = args.lr if args.lr is not None else 0.08 * global_batch / 64
    warmup = run_warmup_epochs(args.warmup_epochs, args.epochs)
    return CosineLrSchedule(lr, int(warmup * steps_per_epoch), int(args.epochs * steps_per_epoch))


def memory_format_for(args: argparse.Namespace, device: torch.device) -> torch.memory_format:
    """channels_last on CPU unless `--nchw`: NHWC trains D0 at 256 px 1.4x (fp32) to 1.6x (bf16 autocast)
    faster there (benchmarks/speed.py); same gradients up to rounding (tests/test_speed_paths.py).
    Unmeasured on CUDA, so NCHW there."""
    return torch.channels_last if device.type == "cpu" and not args.nchw else torch.contiguous_format


@dataclass
class StepForward:
    """What one step's forward produced, for an observer: `targets` (`TargetAssigner`), the head outputs
    (lists over levels of `[B, A*C, H, W]` / `[B, A*4, H, W]`) and `detection_loss`'s dict."""

    targets: Targets
    cls_outputs: list[torch.Tensor]
    box_outputs: list[torch.Tensor]
    losses: dict[str, torch.Tensor]


@dataclass
class TrainStep:
    """The per-step state and function of a run. `train_model` is what runs forward (the DDP wrapper under
    torchrun, else `model`); `loss` is `detection_loss` or a stand-in with its signature (the trainer passes
    the one it imported); `observe`, if set, is called with each step's `StepForward`."""

    model: nn.Module
    optimizer: EfficientDetSGD
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: ModelEMA
    scaler: torch.amp.GradScaler
    assigner: TargetAssigner
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    label_smoothing: float
    dist: DistInfo
    device: torch.device
    loss: Callable[..., dict[str, torch.Tensor]] = detection_loss
    train_model: nn.Module | None = None
    observe: Callable[[StepForward], None] | None = None

    @classmethod
    def from_flags(cls, model: nn.Module, args: argparse.Namespace, image_size: tuple[int, int],
                   schedule: CosineLrSchedule, device: torch.device, dist: DistInfo = DistInfo(),
                   loss: Callable[..., dict[str, torch.Tensor]] = detection_loss) -> "TrainStep":
        """The step of a run with flags `args` (`train.cli`) for `model` (on `device`, frozen parts already
        frozen): puts the model in the run's memory layout, builds the optimiser (rate `schedule.base_lr`),
        its per-step schedule, the EMA shadows, the AMP set-up and the anchor assigner."""
        memory_format = memory_format_for(args, device)
        model.to(memory_format=memory_format)
        optimizer = build_optimizer(model, schedule.base_lr, weight_decay=args.weight_decay,
                                    clip_norm=args.clip_norm or None)
        cuda_fp16 = args.amp and device.type == "cuda"
        generator = AnchorGenerator.from_config(model.config)
        return cls(model, optimizer, schedule.scheduler(optimizer), ModelEMA(model, args.ema_decay),
                   torch.amp.GradScaler("cuda", enabled=cuda_fp16),
                   TargetAssigner.from_generator(generator, image_size, device, method=args.assigner),
                   (torch.float16 if cuda_fp16 else torch.bfloat16) if args.amp else None,
                   memory_format, args.label_smoothing, dist, device, loss)

    def forward(self, images: torch.Tensor, gt_boxes: torch.Tensor, gt_classes: torch.Tensor) -> StepForward:
        """This process's `detection_loss` of a batch (`images [B, 3, H, W]`, padded `gt_boxes [B, M, 4]` yxyx
        pixels, `gt_classes [B, M]`) through the training model, with autograd.

        Under DDP each process normalises by the positives of the whole global batch (their mean over the
        processes, as the multi-replica `tf2/train_lib.py`), so that DDP's averaged gradient and the mean of
        the processes' losses do not depend on how the global batch is split over processes.
        """
        targets = self.assigner(gt_boxes, gt_classes)
        dtype = next(self.model.parameters()).dtype  # float32; float64 for the parity's exact step
        images = images.to(dtype=dtype, memory_format=self.memory_format)
        autocast = (torch.autocast(self.device.type, self.amp_dtype) if self.amp_dtype
                    else contextlib.nullcontext())
        with autocast:
            cls_outs, box_outs = (self.train_model or self.model)(images)
        losses = self.loss(cls_outs, box_outs, targets.cls_targets, targets.box_targets,
                                all_mean(targets.num_positives, self.dist), label_smoothing=self.label_smoothing,
                                num_replicas=self.dist.world_size)
        forward = StepForward(targets, cls_outs, box_outs, losses)
        if self.observe is not None:
            self.observe(forward)
        return forward

    def __call__(self, images: torch.Tensor, gt_boxes: torch.Tensor, gt_classes: torch.Tensor) -> dict | None:
        """One optimisation step; returns the global batch's losses (under DDP: the mean over the processes,
        the positives summed), or None when the loss was not finite (step skipped)."""
        losses = self.forward(images, gt_boxes, gt_classes).losses
        if not all_agree(bool(torch.isfinite(losses["loss"])), self.dist, self.device):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.scaler.scale(losses["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.ema.update(self.model)
        terms = all_mean(torch.stack([losses[k].detach() for k in LOSS_TERMS]), self.dist).tolist()
        return {**dict(zip(LOSS_TERMS, terms)), "num_positives": float(losses["num_positives"]) * self.dist.world_size}
