"""`utils.summary.forward_flops` and `forward_bytes`: the FLOP and memory-traffic counts behind the summary table
and benchmarks/speed.py's GFLOP/s and roofline."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import build_model
from utils.summary import PAPER_GFLOPS, Traffic, forward_bytes, forward_flops, meta_model


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


def test_conv_bytes_are_its_input_weight_bias_and_output():
    with torch.device("meta"):
        conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    inputs, outputs = 2 * 16 * 20 * 13, 2 * 32 * 10 * 7  # 20 x 13 input, stride 2, pad 1
    weight, bias = 32 * 16 * 3 * 3, 32
    assert forward_bytes(conv, (2, 16, 20, 13), 4) == Traffic(4 * (inputs + outputs), 4 * (weight + bias))


def test_views_move_nothing():
    class Views(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))  # only for the device: never read

        def forward(self, x):  # (a reshape of a permuted view would copy)
            y = x.reshape(2, 100).t().detach()[1:].unsqueeze(0).squeeze(0).expand(3, 99, 2)
            return y, x.view(2, 4, 25).permute(2, 0, 1).transpose(0, 1).select(2, 1).as_strided((3,), (1,))

    assert forward_bytes(Views(), (2, 4, 5, 5), 4) == Traffic(0, 0)


def test_a_broadcast_reads_its_elements_once():
    class Bias(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(1, 4, 1, 1, device="meta"))

        def forward(self, x):
            return x + self.bias.expand_as(x)  # a [2, 4, 5, 5] view with stride 0 but on the channels

    assert forward_bytes(Bias(), (2, 4, 5, 5), 4) == Traffic(4 * 2 * (2 * 4 * 5 * 5), 4 * 4)


def test_element_size_scales_floats_only():
    with torch.device("meta"):
        conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    at_4, at_2, at_1 = (forward_bytes(conv, (2, 16, 20, 13), size) for size in (4, 2, 1))
    assert at_2 == Traffic(at_4.activations // 2, at_4.weights // 2)
    assert at_1 == Traffic(at_4.activations // 4, at_4.weights // 4)

    class Pool(nn.Module):  # max-pool indices (int64) keep their 8 bytes whatever the element size
        def __init__(self):
            super().__init__()
            self.unused = nn.Parameter(torch.ones(1, device="meta"))

        def forward(self, x):
            return F.max_pool2d(x, 2)

    values, indices = 32 + 8, 8  # [1, 2, 4, 4] in, [1, 2, 2, 2] out
    assert [forward_bytes(Pool(), (1, 2, 4, 4), size).activations for size in (4, 2)] == [
        4 * values + 8 * indices, 2 * values + 8 * indices]


def test_fused_activations_count_only_after_a_conv_or_gemm():
    """An in-place activation on the output of the conv just before it is oneDNN's post-op (free); after any
    other op (the BiFPN's fusion sum) it is a pass of its own."""

    class ConvAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1, bias=False)

        def forward(self, x):
            y = F.silu(self.conv(x), inplace=True)
            return F.silu(y.add_(x), inplace=True)

    with torch.device("meta"):
        model = ConvAct()
    pixels = 4 * 6 * 6
    conv, add, act = 2 * pixels, 3 * pixels, 2 * pixels  # read x, write y; read y and x, write y; read, write
    assert forward_bytes(model, (1, 4, 6, 6), 4, fused_activations=True).activations == 4 * (conv + add + act)
    assert forward_bytes(model, (1, 4, 6, 6), 4).activations == 4 * (conv + act + add + act)


def _numel(module: nn.Module) -> int:
    return sum(t.numel() for t in [*module.parameters(), *module.buffers()] if t.is_floating_point())


@pytest.mark.parametrize("fused", [False, True])
def test_d0_weight_bytes_are_each_read_of_each_weight(fused):
    """Every weight is read once per forward, except the heads' convs shared by the 5 levels (each level has its
    own BN, fused: its own pointwise conv with that BN folded in); `num_batches_tracked` (int64) is never read."""
    model = meta_model("efficientdet-d0", fused=fused)
    heads = [model.class_net, model.box_net]
    if fused:
        per_level = [(h.dw, h.predict) for h in heads]  # FusedHead: shared dw, per-level pw, shared predict
        once = [h.pw for h in heads]
    else:
        per_level = [(h.convs, h.predict) for h in heads]  # HeadNet: shared separable convs, per-level BN
        once = [h.bns for h in heads]
    reads = (_numel(model) - sum(_numel(h) for h in heads) + sum(_numel(m) for m in once)
             + 5 * sum(_numel(m) for pair in per_level for m in pair))
    assert forward_bytes(model, (1, 3, 512, 512), 2).weights == 2 * reads


def test_d0_bytes_per_image_are_plausible():
    """D0 512 px fp32: activations scale with the batch, weights do not; the fused module (BN folded, activations
    fused) moves well under the plain one, which moves every conv output at least twice (conv, BN)."""
    fused, plain = meta_model("efficientdet-d0", fused=True), meta_model("efficientdet-d0")
    one, two = (forward_bytes(fused, (n, 3, 512, 512), 4, fused_activations=True) for n in (1, 2))
    assert two == Traffic(2 * one.activations, one.weights)
    unfused = forward_bytes(plain, (1, 3, 512, 512), 4)
    assert 0.3 < one.activations / unfused.activations < 0.5  # 487 MB vs 1263 MB
    assert 4e8 < one.activations < 6e8
