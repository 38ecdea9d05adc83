"""The TF details that the official weights and numbers depend on, checked one by one."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import VARIANTS, AnchorGenerator, BoxCoder, build_model, get_config
from model.bifpn import FNode, bifpn_nodes
from model.layers import Conv2dSame, MaxPool2dSame, SeparableConv2d

# Official trainable-parameter counts with 90 classes (efficientdet_arch_test.py).
OFFICIAL_PARAMS = {
    "efficientdet-d0": 3_880_067, "efficientdet-d1": 6_625_898, "efficientdet-d2": 8_097_039,
    "efficientdet-d3": 12_032_296, "efficientdet-d4": 20_723_675, "efficientdet-d5": 33_653_315,
    "efficientdet-d6": 51_871_782, "efficientdet-d7": 51_871_782, "efficientdet-d7x": 77_147_166,
}


def meta_model(name, **kw):
    with torch.device("meta"):  # structure only: fast even for D7x
        return build_model(name, **kw)


@pytest.mark.parametrize("name", list(OFFICIAL_PARAMS))
def test_parameter_counts_equal_official(name):
    model = meta_model(name)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]


def test_variant_table():
    d_variants = [n for n in VARIANTS if not VARIANTS[n].is_lite]  # Lite: tests/test_lite.py
    assert d_variants == list(OFFICIAL_PARAMS)
    d7, d7x = get_config("efficientdet-d7"), get_config("efficientdet-d7x")
    assert d7.anchor_scale == 5.0 and d7x.anchor_scale == 4.0
    assert d7x.max_level == 8 and d7x.backbone_name == "efficientnet-b7" and d7x.size_divisor == 256
    assert [VARIANTS[n].fpn_weight_method for n in d_variants] == ["fastattn"] * 6 + ["sum"] * 3
    with pytest.raises(ValueError, match="unknown model 'efficientdet-d9'.*efficientdet-d0.*efficientdet-d7x"):
        build_model("efficientdet-d9")


def test_tf_same_conv_padding_is_bottom_right():
    conv = Conv2dSame(1, 1, 3, stride=2, bias=False)
    x = torch.randn(1, 1, 8, 8)
    w = conv.weight[0, 0]
    y = conv(x)[0, 0]
    assert y.shape == (4, 4)
    # TF pads 0 rows/cols before and 1 after: the first window starts at (0, 0) with no padding ...
    assert torch.allclose(y[0, 0], (w * x[0, 0, :3, :3]).sum(), atol=1e-6)
    # ... and the last window hangs over the bottom/right edge onto zeros.
    assert torch.allclose(y[3, 3], (w[:2, :2] * x[0, 0, 6:, 6:]).sum(), atol=1e-6)
    # PyTorch's symmetric padding gives a different result: the trap this module avoids.
    assert not torch.allclose(y, F.conv2d(x, conv.weight, stride=2, padding=1)[0, 0])


def test_tf_same_conv_kernel5_stride2_and_stride1():
    conv5 = Conv2dSame(1, 1, 5, stride=2, bias=False)
    x = torch.randn(1, 1, 8, 8)
    y = conv5(x)[0, 0]
    w = conv5.weight[0, 0]
    # total padding 3: 1 before, 2 after
    assert torch.allclose(y[0, 0], (w[1:, 1:] * x[0, 0, :4, :4]).sum(), atol=1e-5)
    assert torch.allclose(y[3, 3], (w[:3, :3] * x[0, 0, 5:, 5:]).sum(), atol=1e-5)
    conv1 = Conv2dSame(2, 3, 3, stride=1)
    assert conv1(torch.randn(1, 2, 7, 5)).shape == (1, 3, 7, 5)


def test_max_pool_same_pads_with_minus_infinity():
    pool = MaxPool2dSame(2)
    assert pool.kernel_size == 3  # official: kernel = stride + 1
    x = -1.0 - torch.rand(1, 1, 8, 8)  # all negative: a zero pad would win
    y = pool(x)[0, 0]
    assert y.shape == (4, 4)
    assert y[3, 3] == x[0, 0, 6:, 6:].max()  # only the 2x2 in-bounds cells of the last window
    assert y[0, 0] == x[0, 0, :3, :3].max()
    assert (y < 0).all()


def test_batch_norm_eps_and_momentum():
    bns = [m for m in build_model("efficientdet-d0").modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 108  # 108 BNs = the fixture's 216 moving_mean/variance variables / 2
    assert all(bn.eps == 1e-3 and bn.momentum == pytest.approx(0.01) for bn in bns)


def test_biases_exactly_where_official_has_them():
    model = build_model("efficientdet-d0")
    for name, m in model.backbone.named_modules():
        if isinstance(m, nn.Conv2d):
            assert (m.bias is not None) == (".se." in name), name
    separables = [m for m in model.modules() if isinstance(m, SeparableConv2d)]
    assert separables and all(s.conv_dw.bias is None and s.conv_pw.bias is not None for s in separables)
    resample_convs = [m for n, m in model.fpn.named_modules() if isinstance(m, nn.Conv2d) and n.endswith(".conv")]
    assert len(resample_convs) == 6 and all(c.bias is not None for c in resample_convs)  # P6 + 5 first-cell


def test_class_bias_prior():
    model = build_model("efficientdet-d0", num_classes=3)
    assert torch.allclose(model.class_net.predict.conv_pw.bias, torch.full((27,), -math.log(99.0)))
    assert torch.all(model.box_net.predict.conv_pw.bias == 0)


def test_bifpn_node_table():
    assert bifpn_nodes(3, 7) == [(6, [3, 4]), (5, [2, 5]), (4, [1, 6]), (3, [0, 7]), (4, [1, 7, 8]),
                                 (5, [2, 6, 9]), (6, [3, 5, 10]), (7, [4, 11])]
    nodes8 = bifpn_nodes(3, 8)
    assert len(nodes8) == 10 and nodes8[0] == (7, [4, 5]) and nodes8[-1] == (8, [5, 14])


def test_fast_normalized_fusion_and_sum():
    torch.manual_seed(0)
    node = FNode([4, 4], [3, 3], 3, 4, "fastattn").eval()
    with torch.no_grad():
        node.edge_weights.copy_(torch.tensor([2.0, -1.0]))  # negative weights are ReLU'd away
    a, b = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    expected = node.bn(node.conv(F.silu(a * 2.0 / (2.0 + 1e-4))))
    assert torch.allclose(node([a, b]), expected, atol=1e-6)
    summed = FNode([4, 4], [3, 3], 3, 4, "sum").eval()
    assert summed.edge_weights is None
    assert torch.allclose(summed([a, b]), summed.bn(summed.conv(F.silu(a + b))), atol=1e-6)


def test_second_projection_of_p4_p5_has_its_own_weights():
    cell = build_model("efficientdet-d0").fpn.cells[0]
    p4_td, p4_bu = cell.nodes[2].resample[0], cell.nodes[4].resample[0]  # fnode2 and fnode4 read P4
    assert p4_td.project and p4_bu.project and p4_td.conv.weight is not p4_bu.conv.weight
    assert not any(r.project for n in build_model("efficientdet-d0").fpn.cells[1].nodes for r in n.resample)


def test_forward_shapes_and_layout_non_square():
    model = build_model("efficientdet-d0", num_classes=5).eval()
    with torch.no_grad():
        cls_outs, box_outs = model(torch.randn(2, 3, 128, 256))
    assert [tuple(c.shape) for c in cls_outs] == [(2, 45, 128 >> l, 256 >> l) for l in range(3, 8)]
    assert [tuple(b.shape) for b in box_outs] == [(2, 36, 128 >> l, 256 >> l) for l in range(3, 8)]


def test_d7x_has_p8():
    model = meta_model("efficientdet-d7x", num_classes=2).eval()
    cls_outs, box_outs = model(torch.empty(1, 3, 256, 256, device="meta"))
    assert len(cls_outs) == 6 and cls_outs[-1].shape == (1, 18, 1, 1) and box_outs[0].shape == (1, 36, 32, 32)


@pytest.mark.parametrize("size, expected", [((64, 640), "height 64, width 640.*P6 map is 1 high and 10 wide"),
                                            ((0, 128), "height 0, width 128.*positive")])
def test_invalid_input_size_is_a_clear_error(size, expected):
    model = meta_model("efficientdet-d0")
    with pytest.raises(ValueError, match=expected):
        model(torch.empty(1, 3, *size, device="meta"))


def test_drop_connect_schedule():
    assert all(b.survival_prob == 0.0 for b in meta_model("efficientdet-d0").backbone.blocks)  # off for B0
    blocks = meta_model("efficientdet-d1").backbone.blocks
    probs = [b.survival_prob for b in blocks]
    assert probs[0] == 1.0 and probs[-1] == pytest.approx(1 - 0.2 * (len(blocks) - 1) / len(blocks))
    # Identity in eval: the same network as with drop-connect off (survival 1). Two eval passes of the same
    # model would also agree under a deterministic drop-connect in eval (a scaling by survival_prob, say).
    model = build_model("efficientdet-d1").eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        scheduled = model.backbone(x)
        for block in model.backbone.blocks:
            block.survival_prob = 1.0
        kept = model.backbone(x)
    assert all(torch.equal(a, b) for a, b in zip(scheduled, kept, strict=True))


def test_anchors_sizes_and_order():
    gen = AnchorGenerator.from_config(get_config("efficientdet-d7"))
    anchors = gen((128, 128))
    assert anchors.shape == (sum((128 >> l) ** 2 for l in range(3, 8)) * 9, 4)
    first = anchors[:9]  # P3, location (0, 0): centre (4, 4); base 5.0 * 8 * 2^(s/3)
    h, w = first[:, 2] - first[:, 0], first[:, 3] - first[:, 1]
    assert torch.allclose((first[:, :2] + first[:, 2:]) / 2, torch.full((9, 2), 4.0))
    assert torch.allclose(h[0], torch.tensor(40.0)) and torch.allclose(w[1] / h[1], torch.tensor(2.0))  # exact sqrt2
    assert torch.allclose(h[3], torch.tensor(40.0 * 2 ** (1 / 3)))
    assert torch.allclose(anchors[9, 1::2].mean(), torch.tensor(12.0))  # next location: x + stride


def test_box_coder_round_trip_and_order():
    coder = BoxCoder()
    anchors = torch.tensor([[10.0, 20.0, 50.0, 100.0]])  # yxyx: h 40, w 80
    boxes = torch.tensor([[14.0, 20.0, 54.0, 180.0]])
    deltas = coder.encode(boxes, anchors)
    assert torch.allclose(deltas, torch.tensor([[0.1, 0.5, 0.0, math.log(2.0)]]), atol=1e-6)  # (ty, tx, th, tw)
    assert torch.allclose(coder.decode(deltas, anchors), boxes, atol=1e-4)
