"""`utils.summary.forward_flops`: the FLOP count behind the summary table and benchmarks/speed.py's GFLOP/s."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import build_model
from utils.summary import PAPER_GFLOPS, forward_flops


@pytest.mark.parametrize("groups", [1, 4, 16])
def test_conv_count_is_twice_its_multiply_adds(groups):
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=groups)
    n, h_out, w_out = 2, 10, 7  # 20 x 13 input, stride 2, pad 1
    macs = n * 32 * (16 // groups) * 3 * 3 * h_out * w_out
    assert forward_flops(conv, (n, 16, 20, 13)) == 2 * macs


def test_linear_and_functional_convs_count():
    """Convs and products called functionally count too (the MBConv projection runs as `F.conv2d` / `bmm`
    on a folded weight, which forward hooks on `nn.Conv2d` modules would not see)."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 4, 1, 1))
            self.fc = nn.Linear(8 * 5 * 5, 3)

        def forward(self, x):
            return self.fc(F.conv2d(x, self.weight).flatten(1))

    assert forward_flops(Functional(), (2, 4, 5, 5)) == 2 * (2 * 8 * 4 * 25 + 2 * 200 * 3)


@pytest.fixture(scope="module")
def d0_meta():
    with torch.device("meta"):
        return build_model("efficientdet-d0").eval()


def test_d0_count_matches_the_paper_and_scales_with_area_and_batch(d0_meta):
    at_512 = forward_flops(d0_meta, (1, 3, 512, 512))
    assert at_512 / 2e9 == pytest.approx(PAPER_GFLOPS["efficientdet-d0"], rel=0.02)  # paper: 2.5 G multiply-adds
    at_128, at_256 = (forward_flops(d0_meta, (1, 3, s, s)) for s in (128, 256))
    # 4x the pixels, 4x the work, but for the squeeze-excite convs on 1x1 pooled maps (independent of size)
    assert at_256 / at_128 == pytest.approx(4.0, rel=0.01)
    assert at_256 / at_128 < 4.0
    assert forward_flops(d0_meta, (3, 3, 128, 128)) == 3 * at_128
