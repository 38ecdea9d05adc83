"""Training: targets (anchor assignment), loss, optimiser, learning-rate schedule and weight EMA."""
from .assign import TargetAssigner, Targets, box_iou
from .ema import ModelEMA
from .loss import detection_loss
from .optim import CosineLrSchedule, EfficientDetSGD, build_optimizer, clip_gradients_, param_groups

__all__ = ["CosineLrSchedule", "EfficientDetSGD", "ModelEMA", "TargetAssigner", "Targets", "box_iou",
           "build_optimizer", "clip_gradients_", "detection_loss", "param_groups"]
