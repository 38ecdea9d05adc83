"""Any input size the official network accepts: TF 'SAME' ops on odd sides, nearest upsampling to non-2x
sizes, anchors at non-square and non-multiple sizes (against the official formula, written out here), the
size rule and its errors, and a D0 at 640 wide x 384 high end to end."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import AnchorGenerator, build_model, get_config
from model.anchors import feature_sizes
from model.bifpn import ResampleFeatureMap
from model.config import parse_image_size
from model.efficientdet import validate_image_size
from model.layers import Conv2dSame, MaxPool2dSame
from model.postprocess import postprocess


def _tf_same(x: torch.Tensor, k: int, s: int, value: float) -> torch.Tensor:
    """TF 'SAME' input padding (tensorflow/core/framework/kernel_shape_util.cc): output ceil(n / s), total
    padding max((out - 1) * s + k - n, 0), the smaller half before."""
    pads = []
    for n in reversed(x.shape[-2:]):  # F.pad wants the last dimension first
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


@pytest.mark.parametrize("k, s", [(3, 2), (5, 2), (3, 1), (5, 1)])
def test_conv_same_on_odd_and_even_sides(k, s):
    torch.manual_seed(0)
    conv = Conv2dSame(2, 3, k, s, bias=False)
    for h, w in [(1, 1), (2, 3), (5, 4), (7, 9), (10, 11), (13, 8)]:
        x = torch.randn(1, 2, h, w)
        expected = F.conv2d(_tf_same(x, k, s, 0.0), conv.weight, stride=s)
        y = conv(x)
        assert y.shape[-2:] == (math.ceil(h / s), math.ceil(w / s))
        assert torch.allclose(y, expected, atol=1e-6), (h, w)


def test_depthwise_conv_same_on_odd_sides():
    conv = Conv2dSame(4, 4, 5, 2, groups=4, bias=False)
    x = torch.randn(2, 4, 9, 7)
    assert torch.allclose(conv(x), F.conv2d(_tf_same(x, 5, 2, 0.0), conv.weight, stride=2, groups=4), atol=1e-6)


def test_max_pool_same_on_odd_and_even_sides():
    pool = MaxPool2dSame(2)
    for h, w in itertools.product([1, 2, 3, 4, 5, 9, 10], repeat=2):
        x = -1.0 - torch.rand(1, 2, h, w)  # all negative: a zero pad would win
        expected = F.max_pool2d(_tf_same(x, 3, 2, -math.inf), 3, 2)
        y = pool(x)
        assert y.shape == expected.shape and torch.equal(y, expected), (h, w)


def test_nearest_upsampling_3_to_5_is_not_a_2x_repeat():
    up = ResampleFeatureMap(4, 4, 7, 6)
    x = torch.arange(9.0).view(1, 1, 3, 3).repeat(1, 4, 1, 1)
    y = up(x, (5, 5))[0, 0]
    # official resize_nearest_neighbor (align_corners=False, half_pixel_centers=False): floor(dst * 3 / 5)
    rows = [math.floor(d * 3 / 5) for d in range(5)]
    assert rows == [0, 0, 1, 1, 2]
    assert torch.equal(y, x[0, 0][rows][:, rows])
    assert torch.equal(up(x, (6, 6))[0, 0], x[0, 0].repeat_interleave(2, 0).repeat_interleave(2, 1))


def _official_anchors(image_hw, min_level, max_level, num_scales, aspect_ratios, anchor_scale):
    """The official tf2/anchors.py recipe in numpy: feature sizes from repeated (s - 1) // 2 + 1, strides
    image / feature size per axis, centres np.arange(stride / 2, image, stride), yxyx boxes of
    anchor_scale * stride * 2^(octave / num_scales) with width * sqrt(r), height / sqrt(r)."""
    h, w = image_hw
    feats = [(h, w)]
    for _ in range(max_level):
        feats.append(((feats[-1][0] - 1) // 2 + 1, (feats[-1][1] - 1) // 2 + 1))
    boxes_all = []
    for level in range(min_level, max_level + 1):
        stride_y, stride_x = h / feats[level][0], w / feats[level][1]
        per_config = []
        for octave in range(num_scales):
            for ratio in aspect_ratios:
                ax, ay = np.sqrt(ratio), 1.0 / np.sqrt(ratio)
                half_x = anchor_scale * stride_x * 2 ** (octave / num_scales) * ax / 2.0
                half_y = anchor_scale * stride_y * 2 ** (octave / num_scales) * ay / 2.0
                xv, yv = np.meshgrid(np.arange(stride_x / 2, w, stride_x), np.arange(stride_y / 2, h, stride_y))
                xv, yv = xv.reshape(-1), yv.reshape(-1)
                per_config.append(np.vstack((yv - half_y, xv - half_x, yv + half_y, xv + half_x)).swapaxes(0, 1))
        boxes_all.append(np.stack(per_config, 1).reshape(-1, 4))  # location-major, then anchor
    return np.concatenate(boxes_all)


@pytest.mark.parametrize("name, hw", [("efficientdet-d0", (384, 640)), ("efficientdet-d0", (300, 500)),
                                      ("efficientdet-lite0", (320, 320)), ("efficientdet-d7x", (333, 517))])
def test_anchors_follow_the_official_formula(name, hw):
    cfg = get_config(name)
    expected = _official_anchors(hw, cfg.min_level, cfg.max_level, cfg.num_scales, cfg.aspect_ratios,
                                 cfg.anchor_scale)
    anchors = AnchorGenerator.from_config(cfg)(hw)
    assert anchors.shape == expected.shape
    assert np.abs(anchors.numpy() - expected).max() < 1e-3


def test_parse_image_size_is_width_first_like_the_official_code():
    assert parse_image_size("640x384") == (384, 640)  # utils.parse_image_size: "WxH" -> (H, W)
    assert parse_image_size(512) == (512, 512) and parse_image_size("320") == (320, 320)
    assert parse_image_size((384, 640)) == (384, 640)
    for bad in ("abc", "640x", "1x2x3", 1.5, None):
        with pytest.raises(ValueError, match="expected an integer S .* or 'WxH'"):
            parse_image_size(bad)


def _accepted(h, w, min_level=3, max_level=7):
    """The official ResampleFeatureMap rule: going up a level a map shrinks in both sides or in neither."""
    sizes = feature_sizes((h, w), min_level, max_level)[:-1]
    return all((a == 1) == (b == 1) for a, b in sizes)


def test_every_size_the_official_rule_accepts_builds_and_the_others_are_clear_errors():
    with torch.device("meta"):  # one cell and head repeat: the same pyramid, less to trace
        model = build_model("efficientdet-d0", num_classes=2, fpn_cell_repeats=1, box_class_repeats=1).eval()
    sides = [1, 2, 3, 31, 64, 65, 129]
    for h, w in itertools.product(sides, repeat=2):
        x = torch.empty(1, 3, h, w, device="meta")
        if _accepted(h, w):
            cls_outs, box_outs = model(x)
            assert [tuple(c.shape[-2:]) for c in cls_outs] == feature_sizes((h, w), 3, 7), (h, w)
            assert [tuple(b.shape[-2:]) for b in box_outs] == feature_sizes((h, w), 3, 7), (h, w)
        else:
            with pytest.raises(ValueError, match=f"height {h}, width {w} is not supported .*sides above 64"):
                model(x)
    assert not _accepted(64, 640) and _accepted(65, 640) and _accepted(1, 1)
    for bad in [(0, 128), (-5, 64)]:
        with pytest.raises(ValueError, match="both sides must be positive integers"):
            validate_image_size(get_config("efficientdet-d0"), bad, "--image-size")


def test_d0_at_640_wide_384_high_forward_train_step_and_postprocess():
    torch.manual_seed(0)
    hw = parse_image_size("640x384")
    model = build_model("efficientdet-d0", num_classes=3)
    cfg = model.config
    anchors = AnchorGenerator.from_config(cfg)(hw)
    sizes = feature_sizes(hw, cfg.min_level, cfg.max_level)
    assert sizes == [(48, 80), (24, 40), (12, 20), (6, 10), (3, 5)]
    assert anchors.shape[0] == sum(h * w for h, w in sizes) * cfg.num_anchors

    # One training step changes the weights and gives finite gradients everywhere.
    from train.assign import TargetAssigner
    from train.loss import detection_loss
    model.train()
    images = torch.randn(1, 3, *hw)
    cls_outs, box_outs = model(images)
    assigner = TargetAssigner.from_generator(AnchorGenerator.from_config(cfg), hw, torch.device("cpu"))
    targets = assigner(torch.tensor([[[40.0, 100.0, 200.0, 300.0], [300.0, 500.0, 380.0, 630.0]]]),
                       torch.tensor([[1, 2]]))
    assert targets.num_positives > 0
    loss = detection_loss(cls_outs, box_outs, *targets)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    model.eval()
    with torch.no_grad():
        dets = postprocess(*model(images), anchors, torch.ones(1), hw, mode="infer", method="hard")
    assert dets.boxes.shape == (1, 100, 4) and int(dets.num_valid[0]) > 0
    assert float(dets.boxes[0, :, 2].max()) <= hw[0] and float(dets.boxes[0, :, 3].max()) <= hw[1]


@pytest.mark.parametrize("mode", ["train", "trainval", "eval", "infer"])
def test_image_size_flag_takes_s_or_wxh_in_every_mode(mode):
    import main
    required = {"eval": ["--pretrained"], "infer": ["--pretrained", "--images", "x.png"]}.get(mode, [])
    args = main.parse_args(["-mode", mode, "--image-size", "640x384", *required])
    assert args.image_size == (384, 640)
    assert main.parse_args(["-mode", mode, "--image-size", "320", *required]).image_size == 320


@pytest.mark.parametrize("value, message", [("0", "expected positive sides"), ("-128", "expected positive sides"),
                                            ("640x0", "expected positive sides"), ("abc", "got 'abc'"),
                                            ("640x", "got '640x'"), ("1.5", "got '1.5'")])
def test_bad_image_size_flag_is_a_usage_error(value, message, capsys):
    import main
    with pytest.raises(SystemExit):
        main.parse_args(["-mode", "train", "--image-size", value])
    err = capsys.readouterr().err
    assert "argument --image-size" in err and message in err


def test_size_the_official_network_rejects_is_a_clear_error_before_any_work(tmp_path, capsys):
    import main
    from utils.weights import save_weights
    weights = tmp_path / "d0.pth"
    with torch.device("meta"):
        meta = build_model("efficientdet-d0", num_classes=2)
    save_weights(weights, {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in meta.state_dict().items()},
                 model_name="efficientdet-d0", num_classes=2)
    from PIL import Image
    Image.new("RGB", (40, 30)).save(tmp_path / "photo.png")
    code = main.main(["-mode", "infer", "--weights", str(weights), "--images", str(tmp_path / "photo.png"),
                      "--image-size", "640x64", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: --image-size: input height 64, width 640 is not supported by the official network")
    assert not (tmp_path / "out" / "detections.json").exists()
