"""Detection loss: focal and Huber against hand values and the official formulas, normalisation, layout."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model import flatten_outputs
from train.loss import _SigmoidFocalLoss, box_loss_sum, detection_loss, focal_loss_sum


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _official_focal(x: torch.Tensor, targets: torch.Tensor, alpha=0.25, gamma=1.5, smoothing=0.0) -> torch.Tensor:
    """det_model_fn.focal_loss composed op by op on a one-hot target, ignored (-2) anchors masked, summed."""
    y = F.one_hot(targets.clamp(min=0), x.shape[-1]).to(x.dtype) * (targets >= 0)[..., None]
    p = torch.sigmoid(x)
    p_t = y * p + (1 - y) * (1 - p)
    alpha_factor = y * alpha + (1 - y) * (1 - alpha)
    modulating = (1 - p_t) ** gamma
    y_smooth = y * (1 - smoothing) + 0.5 * smoothing
    ce = F.binary_cross_entropy_with_logits(x, y_smooth, reduction="none")  # = sigmoid_cross_entropy_with_logits
    return (alpha_factor * modulating * ce * (targets != -2)[..., None]).sum()


def test_focal_loss_hand_values():
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.3]]])  # one image, two anchors, two classes
    targets = torch.tensor([[0, -1]])  # anchor 0 is class 0, anchor 1 background
    p = [_sigmoid(v) for v in (0.5, -1.0, 2.0, 0.3)]
    expected = (0.25 * (1 - p[0]) ** 1.5 * -math.log(p[0])  # positive entry: alpha (1 - p)^g (-log p)
                + 0.75 * p[1] ** 1.5 * -math.log(1 - p[1])  # negatives: (1 - alpha) p^g (-log(1 - p))
                + 0.75 * p[2] ** 1.5 * -math.log(1 - p[2])
                + 0.75 * p[3] ** 1.5 * -math.log(1 - p[3]))
    assert focal_loss_sum(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_label_smoothing_hand_values():
    # Smoothing 0.1: cross-entropy against 1 - 0.05 / 0.05, modulating factor from the unsmoothed label.
    logits, s = torch.tensor([[[0.5, -1.0]]]), 0.1
    p0, p1 = _sigmoid(0.5), _sigmoid(-1.0)
    ce0 = -(0.95 * math.log(p0) + 0.05 * math.log(1 - p0))
    ce1 = -(0.05 * math.log(p1) + 0.95 * math.log(1 - p1))
    expected = 0.25 * (1 - p0) ** 1.5 * ce0 + 0.75 * p1 ** 1.5 * ce1
    got = focal_loss_sum(logits, torch.tensor([[0]]), label_smoothing=s).item()
    assert got == pytest.approx(expected, rel=1e-6)
    assert got != pytest.approx(focal_loss_sum(logits, torch.tensor([[0]])).item(), rel=1e-3)


@pytest.mark.parametrize("smoothing, gamma", [(0.0, 1.5), (0.1, 1.5), (0.0, 2.0), (0.1, 0.7)])
def test_focal_loss_equals_official_formula_and_gradient(smoothing, gamma):
    """gamma 1.5 (official) runs as x * sqrt(x), any other through pow: both must be the official formula."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 30, 5, generator=g, dtype=torch.float64) * 4).requires_grad_()
    targets = torch.randint(-2, 5, (2, 30), generator=g)  # positives, background and ignored anchors
    ours = _SigmoidFocalLoss.apply(x, targets, 0.25, gamma, smoothing)
    official = _official_focal(x, targets, gamma=gamma, smoothing=smoothing)
    assert ours.item() == pytest.approx(official.item(), rel=1e-12)
    (g_ours,), (g_official,) = torch.autograd.grad(ours, x), torch.autograd.grad(official, x)
    assert torch.allclose(g_ours, g_official, rtol=1e-10, atol=1e-14)
    small, small_targets = x[:1, :6].detach().clone().requires_grad_(), targets[:1, :6]
    assert torch.autograd.gradcheck(lambda z: _SigmoidFocalLoss.apply(z, small_targets, 0.25, gamma, smoothing),
                                    (small,))


def test_ignored_anchors_contribute_nothing():
    x = torch.randn(1, 3, 4, requires_grad=True)
    targets = torch.tensor([[1, -2, -1]])
    loss = focal_loss_sum(x, targets)
    loss.backward()
    assert x.grad[0, 1].abs().max().item() == 0.0 and x.grad[0, 0].abs().max().item() > 0
    with torch.no_grad():
        x[0, 1] += 100.0  # whatever the ignored anchor predicts
    assert focal_loss_sum(x, targets).item() == pytest.approx(loss.item())


def test_huber_box_loss_hand_values_and_mask():
    targets = torch.tensor([[[0.1, 0.0, -0.2, 0.5]]])
    preds = torch.tensor([[[0.15, 7.0, 0.1, 0.5]]])
    # |d| = 0.05 <= 0.1: 0.5 d^2 = 0.00125; target 0 entry masked; |d| = 0.3: 0.1 * 0.3 - 0.5 * 0.01 = 0.025; d = 0
    assert box_loss_sum(preds, targets, delta=0.1).item() == pytest.approx(0.00125 + 0.025)


def _outputs(levels, batch=2, anchors=3, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cls = [torch.randn(batch, anchors * classes, h, w, generator=g) for h, w in levels]
    box = [torch.randn(batch, anchors * 4, h, w, generator=g) * 0.2 for h, w in levels]
    return cls, box


def test_flatten_outputs_order_is_level_y_x_anchor():
    cls, box = _outputs([(2, 3), (1, 2)])
    flat_cls, flat_box = flatten_outputs(cls, box)
    assert flat_cls.shape == (2, (6 + 2) * 3, 4) and flat_box.shape == (2, 24, 4)
    # level 0, y = 1, x = 2, anchor 1, class 3 -> row (1 * 3 + 2) * 3 + 1 = 16, channel a * C + c = 7
    assert flat_cls[1, 16, 3] == cls[0][1, 7, 1, 2]
    # level 1, y = 0, x = 1, anchor 2, box coord 1 -> row 18 + (0 * 2 + 1) * 3 + 2 = 23, channel 2 * 4 + 1 = 9
    assert flat_box[0, 23, 1] == box[1][0, 9, 0, 1]


def test_detection_loss_normalisation_and_weighting():
    cls, box = _outputs([(2, 2), (1, 1)], batch=2)
    num_anchors = 15
    g = torch.Generator().manual_seed(1)
    cls_targets = torch.full((2, num_anchors), -1)
    cls_targets[0, 3], cls_targets[1, 7], cls_targets[1, 14] = 2, 0, 3
    box_targets = torch.zeros(2, num_anchors, 4)
    box_targets[cls_targets >= 0] = torch.randn(3, 4, generator=g) * 0.1
    out = detection_loss(cls, box, cls_targets, box_targets, torch.tensor(3.0))
    flat_cls, flat_box = flatten_outputs(cls, box)
    normaliser = 3.0 + 1.0  # positives in the whole batch + 1
    expected_cls = _official_focal(flat_cls.double(), cls_targets).item() / normaliser
    expected_box = box_loss_sum(flat_box, box_targets).item() / (4 * normaliser)
    assert out["cls_loss"].item() == pytest.approx(expected_cls, rel=1e-5)
    assert out["box_loss"].item() == pytest.approx(expected_box, rel=1e-5)
    assert out["loss"].item() == pytest.approx(expected_cls + 50.0 * expected_box, rel=1e-5)
    assert out["num_positives"].item() == 3
    other = detection_loss(cls, box, cls_targets, box_targets, torch.tensor(7.0))
    assert other["loss"].item() == pytest.approx(out["loss"].item() * 4 / 8, rel=1e-5)


def test_low_precision_outputs_are_computed_in_float32():
    cls, box = _outputs([(2, 2)], batch=1)
    cls_targets = torch.full((1, 12), -1)
    cls_targets[0, 5] = 1
    box_targets = torch.zeros(1, 12, 4)
    box_targets[0, 5] = torch.tensor([0.1, -0.1, 0.2, 0.05])
    half = [t.bfloat16().requires_grad_() for t in cls], [t.bfloat16().requires_grad_() for t in box]
    out = detection_loss(*half, cls_targets, box_targets, torch.tensor(1.0))
    ref = detection_loss([t.float() for t in half[0]], [t.float() for t in half[1]], cls_targets, box_targets,
                         torch.tensor(1.0))
    assert all(v.dtype == torch.float32 for v in out.values())
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)
    out["loss"].backward()
    assert half[0][0].grad.dtype == torch.bfloat16 and half[0][0].grad.abs().sum() > 0
