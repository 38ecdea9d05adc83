"""Box-aware AutoAugment / RandAugment (`data/autoaugment*.py`): parity with the official ops (fixture
`../shared/fixtures/tf_reference_autoaugment`, compared by `parity.augment`), box geometry on synthetic
images, seeded determinism, and training with `--autoaugment`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import main
from conftest import SHARED_FIXTURES, require_fixture
from data import autoaugment as aa
from data import autoaugment_geometry as geo
from data.coco import CocoDetection
from data.shapes import make_shapes_dataset
from data.transforms import TrainTransform
from train.trainer import Trainer
from parity.augment import Replay, augmentation_checks

AUG_FIXTURE = SHARED_FIXTURES / "tf_reference_autoaugment"
GREY, RED = 128, (255, 0, 0)


@pytest.fixture(scope="module")
def checks() -> dict[str, dict]:
    return augmentation_checks(require_fixture(AUG_FIXTURE, "cases.json"))


def _failures(checks, predicate) -> dict:
    return {name: c for name, c in checks.items() if predicate(name) and not c["ok"]}


def test_level_to_arg_and_policy_tables_equal_the_official_ones(checks):
    assert checks["aug_level_to_arg"]["ok"] and checks["aug_policies"]["ok"], _failures(checks, lambda n: True)


def test_every_op_reproduces_the_official_image_and_boxes(checks):
    meta = json.loads((AUG_FIXTURE / "cases.json").read_text())
    names = [f"aug_{c['key']}_{part}" for c in meta["cases"] for part in ("image", "boxes")]
    assert len(names) == 136 and set(names) <= set(checks)
    assert not _failures(checks, lambda n: n in names)
    # every op of the official table is covered by at least one case
    assert {c["op"] for c in meta["cases"]} == set(aa.OPS)


def test_test_policy_end_to_end_reproduces_both_recorded_runs(checks):
    for sign in ("pos", "neg"):
        assert checks[f"aug_policy_test_sign{sign}_image"]["ok"] and checks[f"aug_policy_test_sign{sign}_boxes"]["ok"]


def test_the_checks_catch_a_wrong_op_and_a_wrong_table(checks, monkeypatch):
    monkeypatch.setitem(aa.OPS, "Posterize", aa.OPS["Solarize"])
    monkeypatch.setitem(aa.POLICIES, "v3", aa.POLICIES["v3"][:-1])
    broken = augmentation_checks(AUG_FIXTURE)
    failed = {name for name, check in broken.items() if not check["ok"]}
    assert failed == {"aug_case002_image", "aug_case003_image", "aug_case004_image", "aug_policies"}


def _red_rectangle(height=120, width=160, rect=(30, 40, 70, 100)):
    """Grey image with a red rectangle (rows rect[0]..rect[2]-1, cols rect[1]..rect[3]-1) and its normalised
    box; the box corners map back to the rectangle's first / one-past-last pixels."""
    image = np.full((height, width, 3), GREY, dtype=np.uint8)
    image[rect[0]:rect[2], rect[1]:rect[3]] = RED
    box = np.array([[rect[0] / height, rect[1] / width, rect[2] / height, rect[3] / width]], dtype=np.float32)
    return image, box


def _red_extent(image):
    """(min_y, min_x, max_y, max_x) inclusive of the red pixels."""
    ys, xs = np.nonzero((image == RED).all(-1))
    return ys.min(), xs.min(), ys.max(), xs.max()


@pytest.mark.parametrize("pixels", [25.0, -40.0])
@pytest.mark.parametrize("horizontal", [True, False])
def test_translate_moves_content_and_box_together(pixels, horizontal):
    image, box = _red_rectangle()
    out, out_box = geo.translate_bbox(image, box, np.float32(pixels), aa.REPLACE, shift_horizontal=horizontal)
    shift = np.array([0, pixels, 0, pixels] if horizontal else [pixels, 0, pixels, 0])
    # content moves by -pixels; the box's pixel corners (first, one-past-last) move with it
    assert np.array_equal(_red_extent(out), np.array(_red_extent(image)) - shift)
    scale = np.array([120, 160, 120, 160])
    assert np.allclose(out_box[0] * scale, box[0] * scale - shift, atol=1e-3)
    # the strip uncovered at the border (right / bottom for pixels > 0) is filled with the replace colour
    dark = np.where((image == GREY).all(-1, keepdims=True), np.uint8(30), image)
    moved = geo.translate_x(dark, pixels, aa.REPLACE) if horizontal else geo.translate_y(dark, pixels, aa.REPLACE)
    n = int(abs(pixels))
    strip = (moved[:, -n:] if pixels > 0 else moved[:, :n]) if horizontal else (moved[-n:] if pixels > 0 else moved[:n])
    assert (strip == GREY).all() and (moved == GREY).all(-1).sum() == strip.shape[0] * strip.shape[1]


@pytest.mark.parametrize("degrees", [15.0, -30.0])
def test_rotated_box_encloses_the_rotated_content(degrees):
    image, box = _red_rectangle()
    out, out_box = geo.rotate_with_bboxes(image, box, np.float32(degrees), aa.REPLACE)
    min_y, min_x, max_y, max_x = _red_extent(out)
    y0, x0, y1, x1 = out_box[0] * np.array([120, 160, 120, 160])
    assert y0 - 1 <= min_y and max_y <= y1 + 1 and x0 - 1 <= min_x and max_x <= x1 + 1
    # and is tight: the official box is the rotated corners' enclosing box
    assert (y1 - y0) < (max_y - min_y) + 4 and (x1 - x0) < (max_x - min_x) + 4
    # positive degrees turn the content counter-clockwise on screen: a block right of the centre moves up,
    # and its box with it
    block = np.zeros((101, 101, 3), dtype=np.uint8)
    block[48:53, 80:85] = 255
    block_box = np.array([[48 / 101, 80 / 101, 53 / 101, 85 / 101]], dtype=np.float32)
    turned, turned_box = geo.rotate_with_bboxes(block, block_box, np.float32(degrees), (0, 0, 0))
    row = np.nonzero(turned[..., 0])[0].mean()
    box_row = (turned_box[0, 0] + turned_box[0, 2]) / 2 * 101
    assert (row < 50) == (degrees > 0) and abs(box_row - row) < 2


@pytest.mark.parametrize("horizontal", [True, False])
def test_sheared_box_encloses_the_sheared_content(horizontal):
    image, box = _red_rectangle()
    out, out_box = geo.shear_with_bboxes(image, box, np.float32(-0.3), aa.REPLACE, shear_horizontal=horizontal)
    min_y, min_x, max_y, max_x = _red_extent(out)
    y0, x0, y1, x1 = out_box[0] * np.array([120, 160, 120, 160])
    assert y0 - 1 <= min_y and max_y <= y1 + 1 and x0 - 1 <= min_x and max_x <= x1 + 1
    assert (y1 - y0) < (max_y - min_y) + 4 and (x1 - x0) < (max_x - min_x) + 4


@pytest.mark.parametrize("name", [n for n in aa.OPS if n.endswith("_Only_BBoxes")])
def test_box_only_ops_change_only_box_pixels_and_keep_boxes(name):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    boxes = np.array([[0.1, 0.1, 0.4, 0.5], [0.5, 0.6, 0.9, 0.95]], dtype=np.float32)
    args = aa.level_to_arg(name, 10, sign=1)
    out, out_boxes = aa.apply_op(name, image, boxes, args, rng, prob=3.0)  # per-box probability 1
    inside = np.zeros((90, 130), dtype=bool)
    inside[9:37, 13:66] = inside[45:82, 78:124] = True  # rows int(H*ymin)..int(H*ymax), inclusive
    assert np.array_equal(out[~inside], image[~inside])
    assert not np.array_equal(out[inside], image[inside])
    assert np.array_equal(out_boxes, boxes)


def test_box_only_probability_is_divided_by_three_per_box():
    image = (np.arange(100 * 100 * 3) % 251).astype(np.uint8).reshape(100, 100, 3)
    boxes = np.array([[0.0, 0.0, 0.4, 0.4], [0.5, 0.5, 1.0, 1.0]], dtype=np.float32)
    # prob 0.6 -> per box 0.2: applied when floor(u + 0.2) == 1, i.e. u >= 0.8
    replay = Replay(uniforms=[0.79, 0.81], permutations=[[1, 0]])
    out, _ = aa.apply_op("Flip_Only_BBoxes", image, boxes, (), replay, prob=0.6)
    assert replay.exhausted()
    assert np.array_equal(out[50:, 50:], image[50:, 50:])  # box 1, visited first with u = 0.79: kept
    assert np.array_equal(out[:41, :41], image[:41, :41][:, ::-1])  # box 0, visited second, u = 0.81: flipped


@pytest.mark.parametrize("policy", aa.AUTOAUGMENT_CHOICES)
def test_policies_are_deterministic_given_the_seed_and_keep_boxes_valid(policy):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    boxes = np.array([[0.1, 0.2, 0.5, 0.6], [0.55, 0.05, 0.95, 0.4], [0.0, 0.0, 1.0, 1.0]], dtype=np.float32)
    outputs = []
    for seed in range(12):
        first = aa.augment(image, boxes, policy, np.random.default_rng(seed))
        again = aa.augment(image, boxes, policy, np.random.default_rng(seed))
        assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
        out_image, out_boxes = first
        assert out_image.dtype == np.uint8 and out_image.shape == image.shape and out_boxes.shape == boxes.shape
        assert ((out_boxes >= 0) & (out_boxes <= 1)).all()
        assert (out_boxes[:, 2] >= out_boxes[:, 0]).all() and (out_boxes[:, 3] >= out_boxes[:, 1]).all()
        outputs.append(out_image)
    assert len({o.tobytes() for o in outputs}) > 1  # the seed matters


@pytest.mark.parametrize("name", sorted(aa.OPS))
def test_every_op_accepts_an_image_without_boxes(name):
    image = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    out, boxes = aa.apply_op(name, image, np.zeros((0, 4), np.float32), aa.level_to_arg(name, 7, sign=-1),
                             np.random.default_rng(0), prob=0.6)
    assert out.shape == image.shape and out.dtype == np.uint8 and boxes.shape == (0, 4)


def test_randaugment_magnitude_15_arguments():
    # the official pipeline calls RandAugment at magnitude 15, beyond the 0..10 level range
    assert aa.level_to_arg("Rotate_BBox", 15.0, sign=-1) == (np.float32(-45.0),)
    assert aa.level_to_arg("Cutout", 15.0) == (150,)
    assert aa.level_to_arg("Solarize", 15.0) == (384,)  # a uint8 tensor in TF: wraps to 128
    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    out, _ = aa.apply_op("Solarize", image, np.zeros((0, 4), np.float32), (384,), None)
    assert np.array_equal(out, np.where(image < 128, image, 255 - image))


def test_train_transform_applies_the_policy_from_the_item_generator():
    image, box = _red_rectangle(120, 400, (30, 150, 70, 250))  # stays inside after a 100 px shift either way
    boxes_px = box * np.array([120, 400, 120, 400], dtype=np.float32)
    plain = TrainTransform(128, 1.0, 1.0, hflip=False)
    augmented = TrainTransform(128, 1.0, 1.0, hflip=False, autoaugment="test")
    first = augmented(image, boxes_px, [3], np.random.default_rng(5))
    again = augmented(image, boxes_px, [3], np.random.default_rng(5))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    base = plain(image, boxes_px, [3], np.random.default_rng(5))
    # test policy = TranslateX_BBox(+-100 px) then Equalize: the box moves by 100 px (x scale 128/400)
    assert torch.allclose((first[1] - base[1]).abs(), torch.tensor([[0.0, 32.0, 0.0, 32.0]]), atol=1e-3)
    with pytest.raises(ValueError, match=r"^autoaugment 'v9': expected one of v0, v1, v2, v3, test, randaug"):
        TrainTransform(128, autoaugment="v9")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", num_train=4, num_val=2, workers=1)


def test_dataset_items_with_autoaugment_are_a_function_of_seed_epoch_index(shapes):
    def dataset():
        return CocoDetection.from_root(shapes, "train", train=True, image_size=128, seed=7,
                                       transform=TrainTransform(128, autoaugment="randaug"))
    one, two = dataset(), dataset()
    for index in range(len(one)):
        a, b = one[index], two[index]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    epoch0 = [one[i][0] for i in range(len(one))]
    one.set_epoch(1)
    assert any(not torch.equal(x, one[i][0]) for i, x in enumerate(epoch0))


def test_training_steps_with_autoaugment(shapes, tmp_path):
    args = main.parse_args(["-mode", "train", "--data", str(shapes), "--image-size", "128", "--batch-size", "2",
                            "--epochs", "1", "--workers", "0", "--log-every", "1", "--autoaugment", "v1",
                            "--output", str(tmp_path / "run")])
    Trainer(args).fit()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r["type"] == "train"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    saved = torch.load(tmp_path / "run" / "last.pth", weights_only=False)
    assert saved["config"]["autoaugment"] == "v1"
