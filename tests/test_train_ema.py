"""EMA of weights and BN statistics with the official warm-up of the decay."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from train.ema import ModelEMA


def _model() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2))
    with torch.no_grad():
        model[0].weight.zero_()
    return model


def test_decay_warm_up_values():
    ema = ModelEMA(_model(), decay=0.9998)
    assert ema.decay_at(0) == pytest.approx(1 / 10)
    assert ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(10) == pytest.approx(11 / 20)
    assert ema.decay_at(10**6) == 0.9998  # min(0.9998, 0.999991)


def test_updates_average_weights_and_bn_buffers_copy_counters():
    model = _model()
    ema = ModelEMA(model)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].running_mean.fill_(2.0)
    model[1].num_batches_tracked += 5
    ema.update(model)  # update 1 uses num_updates = 1 (global step after the optimiser step): decay 2/11
    assert ema.num_updates == 1
    assert ema.module[0].weight.flatten().tolist() == pytest.approx([9 / 11] * 2)  # 0 + (1 - 2/11) * (1 - 0)
    assert ema.module[1].running_mean.tolist() == pytest.approx([18 / 11] * 2)  # BN statistics averaged too
    assert ema.module[1].running_var.tolist() == pytest.approx([1.0] * 2)
    assert ema.module[1].num_batches_tracked.item() == 5  # integer buffer copied
    with torch.no_grad():
        model[0].weight.fill_(2.0)
    ema.update(nn.DataParallel(model))  # wrapped models are unwrapped; update 2: decay 3/12
    assert ema.module[0].weight.flatten().tolist() == pytest.approx([9 / 11 + 0.75 * (2 - 9 / 11)] * 2)
    assert model[0].weight.flatten().tolist() == [2.0, 2.0]  # the trained model is untouched


def test_state_dict_round_trip_keeps_the_counter():
    model = _model()
    ema = ModelEMA(model)
    with torch.no_grad():
        model[0].weight.fill_(3.0)
    for _ in range(3):
        ema.update(model)
    restored = ModelEMA(_model())
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 3
    assert torch.equal(restored.module[0].weight, ema.module[0].weight)
    ema.update(model)
    restored.update(model)
    assert torch.equal(restored.module[0].weight, ema.module[0].weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_update_stays_on_device():
    model = _model().cuda()
    ema = ModelEMA(model)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema.update(model)
    assert ema.module[0].weight.device.type == "cuda"
    assert ema.module[0].weight.flatten().tolist() == pytest.approx([9 / 11] * 2)
