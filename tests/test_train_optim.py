"""Learning-rate schedule, weight-decay parameter selection, gradient clipping and the official SGD step."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from model import build_model
from train.optim import CosineLrSchedule, EfficientDetSGD, build_optimizer, clip_gradients_, decay_parameters
from utils.tf_names import efficientdet_names


def test_cosine_schedule_values():
    s = CosineLrSchedule(base_lr=0.16, warmup_steps=100, total_steps=1100)  # batch 128: 0.08 * 128 / 64
    assert s.lr_at(0) == pytest.approx(0.016)  # warm-up starts at base / 10
    assert s.lr_at(50) == pytest.approx(0.016 + 0.5 * 0.144)
    assert s.lr_at(99) == pytest.approx(0.016 + 0.99 * 0.144)
    # From the end of warm-up the official cosine uses `step`, not `step - warmup`: 0.5 lr (1 + cos(pi * 100 / 1000))
    assert s.lr_at(100) == pytest.approx(0.08 * (1 + math.cos(math.pi * 0.1)))  # 0.156085, below 0.16
    assert s.lr_at(500) == pytest.approx(0.08)  # cos(pi / 2) = 0
    assert s.lr_at(1000) == pytest.approx(0.0, abs=1e-12)  # step = total - warmup
    assert s.lr_at(1100) == pytest.approx(0.08 * (1 + math.cos(math.pi * 1.1)))  # 0.003915: past the minimum
    assert s(0) == pytest.approx(0.1)  # LambdaLR factor


def test_schedule_from_epochs_uses_official_int_rounding():
    s = CosineLrSchedule.from_epochs(0.08, steps_per_epoch=120000 / 64, num_epochs=300)
    assert (s.warmup_steps, s.total_steps) == (1875, 562500)
    s = CosineLrSchedule.from_epochs(0.08, steps_per_epoch=10.5, num_epochs=3, warmup_epochs=1.0)
    assert (s.warmup_steps, s.total_steps) == (10, 31)  # int(10.5), int(31.5)
    with pytest.raises(ValueError, match="must exceed"):
        CosineLrSchedule(0.1, 10, 10)


def test_lambda_lr_follows_lr_at_per_step():
    model = nn.Linear(2, 1)
    schedule = CosineLrSchedule(base_lr=0.2, warmup_steps=3, total_steps=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=123.0)  # the scheduler sets the rate itself
    scheduler = schedule.scheduler(optimizer)
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])  # rate used by this update
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([schedule.lr_at(step) for step in range(8)])


def test_weight_decay_on_conv_weights_only_d0():
    model = build_model("efficientdet-d0")
    decayed, other = decay_parameters(model)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # Backbone 1 stem + 16 depthwise + 15 expand + 16 project + 2 x 16 SE = 80; BiFPN 1 (P6) + 5 resample
    # + 24 nodes x (depthwise + pointwise) = 54; heads 2 x (3 + 1) separable x 2 = 16. Total 150 kernels.
    assert len(decayed) == len(convs) == 150
    ids = {id(p) for p in decayed}
    assert all(id(c.weight) in ids for c in convs)
    assert len(decayed) + len(other) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    excluded = [names[id(p)] for p in other]
    assert all(n.endswith(("bias", "edge_weights")) or ".bn" in n or "bns." in n for n in excluded)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert sum(n.endswith("edge_weights") for n in excluded) == 24
    assert all(id(b.weight) not in ids and id(b.bias) not in ids for b in bns)
    # The same set as the official regex on the TF variable names of the released checkpoints.
    tf_names = efficientdet_names(model)
    official = {n for n, _ in model.named_parameters()
                if isinstance(tf_names[n], str) and re.match(r".*(kernel|weight)$", tf_names[n])}
    assert {names[id(p)] for p in decayed} == official


def test_clip_gradients_hand_computation():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 12.0])
    norm = clip_gradients_([a, b], 10.0)
    # clip_by_norm: |a| = 5 stays, |b| = 12 -> [0, 10]; global norm sqrt(25 + 100) = 11.1803 -> scale 0.894427
    assert a.grad.tolist() == pytest.approx([2.683282, 3.577709], rel=1e-6)
    assert b.grad.tolist() == pytest.approx([0.0, 8.944272], rel=1e-6)
    assert norm.item() == pytest.approx(10.0)
    a.grad, b.grad = torch.tensor([0.3, 0.4]), torch.tensor([1.0, 0.0])
    assert clip_gradients_([a, b], 10.0).item() == pytest.approx(math.sqrt(1.25))
    assert a.grad.tolist() == pytest.approx([0.3, 0.4]) and b.grad.tolist() == [1.0, 0.0]  # within bounds


def test_sgd_step_adds_l2_before_clipping_then_momentum():
    v, u = nn.Parameter(torch.tensor([30.0])), nn.Parameter(torch.tensor([1.0]))
    opt = EfficientDetSGD([{"params": [v], "l2": 1.0}, {"params": [u], "l2": 0.0}], lr=0.1, momentum=0.9,
                          clip_norm=10.0)
    v.grad, u.grad = torch.zeros(1), torch.zeros(1)
    opt.step()
    # gradient 1.0 * 30 (L2) is clipped to 10 before the update: 30 - 0.1 * 10 (torch's weight_decay: 27.0)
    assert v.item() == pytest.approx(29.0) and u.item() == 1.0
    assert opt.last_grad_norm.item() == pytest.approx(10.0)
    v.grad, u.grad = torch.zeros(1), torch.tensor([2.0])
    opt.step()
    # v's gradient is its L2 term 29 -> clip_by_norm 10; with u's 2 the global norm is sqrt(104) -> both scaled
    # by 10 / sqrt(104). TF1 momentum: accum = 0.9 * accum + g (accum_v = 10 from step 1), v -= lr * accum.
    g_v, g_u = 10 * 10 / math.sqrt(104), 2 * 10 / math.sqrt(104)
    assert v.item() == pytest.approx(29.0 - 0.1 * (0.9 * 10 + g_v))
    assert u.item() == pytest.approx(1.0 - 0.1 * (0.9 * 0 + g_u))


def test_build_optimizer_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    opt = build_optimizer(model, lr=0.08)
    decay, rest = opt.param_groups
    assert decay["l2"] == 4e-5 and rest["l2"] == 0.0
    assert [p.shape for p in decay["params"]] == [(4, 3, 3, 3), (2, 4, 1, 1)]
    assert len(rest["params"]) == 4  # two conv biases, BN weight and bias
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 0  # decay applied by step()


def test_one_training_step_end_to_end_d0():
    from model import AnchorGenerator
    from train import ModelEMA, TargetAssigner, detection_loss

    torch.manual_seed(0)
    model = build_model("efficientdet-d0", num_classes=5).train()
    assigner = TargetAssigner.from_generator(AnchorGenerator.from_config(model.config), (128, 128))
    optimizer, ema = build_optimizer(model, lr=0.01), ModelEMA(model)
    images = torch.randn(2, 3, 128, 128)
    targets = assigner(torch.tensor([[[10, 10, 60, 50], [70, 20, 120, 100]], [[30, 30, 90, 90], [0, 0, 0, 0]]]),
                       torch.tensor([[1, 3], [4, -1]]))
    losses = []
    for _ in range(2):
        out = detection_loss(*model(images), *targets)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        ema.update(model)
        losses.append(out["loss"].item())
    assert math.isfinite(losses[0]) and losses[1] < losses[0]
    assert targets.num_positives.item() > 3  # several anchors per box
    assert not torch.equal(ema.module.class_net.predict.conv_pw.bias, model.class_net.predict.conv_pw.bias)


def test_fusion_weights_are_clipped_per_tf_scalar():
    """TF holds a BiFPN node's fusion weights as scalars `WSM`, `WSM_1`, ...: `tf.clip_by_norm` sees each one
    alone, so a gradient [12, 1] becomes [10, 1] before the global clip (as one tensor: [9.96, 0.83])."""
    model = build_model("efficientdet-d0")
    groups = build_optimizer(model, lr=0.01).param_groups
    stacked = [g for g in groups if g.get("per_element")]
    assert len(stacked) == 1 and len(stacked[0]["params"]) == 24 and stacked[0]["l2"] == 0.0
    w = nn.Parameter(torch.zeros(2))
    opt = EfficientDetSGD([{"params": [w], "l2": 0.0, "per_element": True}], lr=1.0, momentum=0.0,
                          clip_norm=10.0)
    w.grad = torch.tensor([8.0, 8.0])
    assert opt.clip_gradients_().item() == pytest.approx(10.0)  # global clip: sqrt(128) -> 10
    assert w.grad.tolist() == pytest.approx([10 / math.sqrt(2)] * 2)
    w.grad = torch.tensor([12.0, 1.0])
    clip_gradients_([], 100.0, per_element=[w])
    assert w.grad.tolist() == pytest.approx([12.0, 1.0])
    clip_gradients_([], 10.0, per_element=[w])  # per scalar: 12 -> 10, then global sqrt(101) -> 10
    assert w.grad.tolist() == pytest.approx([100 / math.sqrt(101), 10 / math.sqrt(101)])


def test_reg_l2_loss_value():
    v, u = nn.Parameter(torch.tensor([3.0, 4.0])), nn.Parameter(torch.tensor([5.0]))
    opt = EfficientDetSGD([{"params": [v], "l2": 0.1}, {"params": [u], "l2": 0.0}], lr=0.1)
    assert opt.reg_l2_loss().item() == pytest.approx(0.1 * 25 / 2)
