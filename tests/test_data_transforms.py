"""Official preprocessing (eval) and augmentation (train): `data/transforms.py`."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import record_delta
from data.transforms import MEAN_RGB, STDDEV_RGB, TrainTransform, preprocess_for_eval

RED, GREEN = (255, 0, 0), (0, 255, 0)
GREY = 128


def test_preprocess_for_eval_matches_official_input_tensor(fixture_dir, reference):
    image = Image.open(fixture_dir / "image.png")
    tensor, image_scale = preprocess_for_eval(image, 512)
    expected = reference["input_tensor"][0].transpose(2, 0, 1)
    assert tensor.shape == (3, 512, 512) and tensor.dtype == torch.float32
    assert record_delta("preprocess input_tensor", tensor, expected, 1e-4) < 1e-4
    assert image_scale == float(reference["image_scale"][0]) == 0.880859375
    # the numpy array path gives the same tensor as the PIL path
    assert torch.equal(preprocess_for_eval(np.asarray(image), 512)[0], tensor)


def test_eval_scaled_size_uses_float32_truncation_and_zero_padding():
    # float32: int(41 * (128 / 41)) == 127 (float64 gives 128); the official graph leaves row 127 as padding
    image = np.full((41, 30, 3), 255, dtype=np.uint8)
    tensor, image_scale = preprocess_for_eval(image, 128)
    content = (tensor != 0).any(0)
    assert content[:127, :int(np.float32(30) * (np.float32(128) / np.float32(41)))].all()
    assert not content[127:].any() and not content[:, 94:].any()
    assert image_scale == float(np.float32(1) / (np.float32(128) / np.float32(41)))


def test_eval_non_square_size_and_mean_colour_pads_to_zero():
    image = np.empty((60, 200, 3), dtype=np.uint8)
    image[:] = np.round(MEAN_RGB).astype(np.uint8)
    tensor, image_scale = preprocess_for_eval(image, (128, 256))  # scale = min(128/60, 256/200) = 1.28
    assert tensor.shape == (3, 128, 256) and image_scale == pytest.approx(1 / 1.28)
    assert tensor[:, :76].abs().max() < 0.01 and (tensor[:, 76:] == 0).all()


def test_bad_image_argument_is_a_clear_error():
    with pytest.raises(ValueError, match=r"^image: expected an RGB uint8 array"):
        preprocess_for_eval(np.zeros((10, 10), dtype=np.uint8), 64)


def _two_rectangles(height=100, width=100, a=(5, 10, 25, 40), b=(70, 60, 95, 90)):
    """Grey image with a red rectangle `a` and a green rectangle `b` (yxyx px, end exclusive)."""
    image = np.full((height, width, 3), GREY, dtype=np.uint8)
    image[a[0]:a[2], a[1]:a[3]] = RED
    image[b[0]:b[2], b[1]:b[3]] = GREEN
    return image, np.array([a, b], dtype=np.float32), np.array([7, 9])


def _extent(tensor: torch.Tensor, colour) -> tuple[int, int, int, int] | None:
    """yxyx (end exclusive) of the output pixels nearer to `colour` than to the grey background."""
    rgb = tensor.permute(1, 2, 0).numpy() * np.array(STDDEV_RGB) + np.array(MEAN_RGB)
    hit = np.linalg.norm(rgb - np.array(colour), axis=-1) < np.linalg.norm(rgb - GREY, axis=-1)
    if not hit.any():
        return None
    rows, cols = np.nonzero(hit.any(1))[0], np.nonzero(hit.any(0))[0]
    return rows[0], cols[0], rows[-1] + 1, cols[-1] + 1


def _check_boxes_against_pixels(out, out_boxes, out_classes, what):
    for cls, colour in ((7, RED), (9, GREEN)):
        extent = _extent(out, colour)
        rows = out_boxes[out_classes == cls]
        if len(rows) and extent is None:  # kept, invisible: only a sub-pixel sliver at the crop border
            assert min(rows[0, 2] - rows[0, 0], rows[0, 3] - rows[0, 1]) < 1, f"{what}: class {cls} not visible"
        elif len(rows):  # a kept box coincides with its object's pixels
            np.testing.assert_allclose(extent, rows[0].numpy(), atol=1.0, err_msg=what)
        else:  # a dropped object is invisible, or a sliver on the last row / column (official clip to S - 1)
            assert extent is None or min(extent[2] - extent[0], extent[3] - extent[1]) <= 1, what


@pytest.mark.parametrize("jitter", [(0.3, 0.6), (0.9, 1.1), (1.5, 2.0)], ids=["zoom-out", "about-1", "zoom-in"])
def test_augmented_boxes_sit_on_the_object_pixels(jitter):
    image, boxes, classes = _two_rectangles()
    transform = TrainTransform(96, *jitter)
    for seed in range(8):
        out, out_boxes, out_classes = transform(image, boxes, classes, np.random.default_rng(seed))
        assert out.shape == (3, 96, 96) and out_boxes.dtype == torch.float32 and out_classes.dtype == torch.int64
        _check_boxes_against_pixels(out, out_boxes, out_classes, f"seed {seed} jitter {jitter}")


def test_horizontal_flip_happens_half_the_time_and_moves_the_boxes():
    image, boxes, classes = _two_rectangles()
    transform = TrainTransform(100, 1.0, 1.0)  # scale exactly 1: only the flip changes the geometry
    flipped = []
    for seed in range(20):
        out, out_boxes, out_classes = transform(image, boxes, classes, np.random.default_rng(seed))
        assert out_classes.tolist() == [7, 9]
        _check_boxes_against_pixels(out, out_boxes, out_classes, f"seed {seed}")
        flipped.append(bool(out_boxes[0, 1] > 50))
        if flipped[-1]:  # x -> W - x, y unchanged
            np.testing.assert_allclose(out_boxes[0].numpy(), [5, 60, 25, 90])
    assert 4 <= sum(flipped) <= 16


def test_zoom_out_pads_with_zeros_bottom_right():
    image, boxes, classes = _two_rectangles()
    out, _, _ = TrainTransform(128, 0.5, 0.5, hflip=False)(image, boxes, classes, np.random.default_rng(0))
    # scaled size int(100 * min(64/100, 64/100)) = 64: content top-left, zeros elsewhere
    assert (out[:, 64:] == 0).all() and (out[:, :, 64:] == 0).all() and (out[:, :64, :64] != 0).all()


def test_boxes_cropped_out_are_dropped_with_their_classes():
    image, boxes, classes = _two_rectangles()
    transform = TrainTransform(64, 2.0, 2.0, hflip=False)  # scaled 128 x 128, crop offsets in [0, 64]
    outcomes = set()
    for seed in range(40):
        out, out_boxes, out_classes = transform(image, boxes, classes, np.random.default_rng(seed))
        outcomes.add(tuple(out_classes.tolist()))
        assert len(out_boxes) == len(out_classes)
        assert (out_boxes >= 0).all() and (out_boxes <= 63).all()  # official clip to output_size - 1
        _check_boxes_against_pixels(out, out_boxes, out_classes, f"seed {seed}")
    assert {(7,), (9,)} <= outcomes  # each object alone was cropped out at least once, its class with it


def test_train_transform_is_a_function_of_the_rng():
    image, boxes, classes = _two_rectangles()
    transform = TrainTransform(64)
    a = transform(image, boxes, classes, np.random.default_rng(3))
    b = transform(Image.fromarray(image), boxes, classes, np.random.default_rng(3))
    c = transform(image, boxes, classes, np.random.default_rng(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
