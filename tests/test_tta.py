"""Test-time augmentation (`eval.tta`, `Detector(tta=...)`, `--tta`): pass sizes, flip and scale passes against
the un-augmented detector, the official concatenation order and pass count, the eval loop's wiring, the engine
refusal and the command-line flag. Generated data only: random images, randomised D0 weights, a fake network."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import main
from data.coco import CocoDetection
from data.transforms import preprocess_for_eval
from eval.coco_eval import detections_to_coco
from eval.evaluator import Detector, run_detection
from eval.tta import Pass, TestTimeAugmentation, scaled_size, tta_passes
from eval.wbf import fuse_detections
from model import build_model
from model_helpers import tiny_shapes_run
from utils.random_weights import randomise_

NUM_CLASSES = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny inputs, one thread


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomise_(build_model("efficientdet-d0", num_classes=NUM_CLASSES)).eval()


def originals(seed: int, sizes=((150, 200), (128, 96))) -> list[np.ndarray]:
    """Random RGB uint8 images of the given (H, W): not square, so the inputs are letterboxed."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def preprocessed(model, arrays, size):
    pre = [preprocess_for_eval(a, size, model.config.mean_rgb, model.config.stddev_rgb) for a in arrays]
    return torch.stack([t for t, _ in pre]), torch.tensor([s for _, s in pre])


def assert_same_detections(a, b, atol=1e-4):
    assert a.num_valid.tolist() == b.num_valid.tolist()
    for i, q in enumerate(a.num_valid.tolist()):
        torch.testing.assert_close(a.boxes[i, :q], b.boxes[i, :q], atol=atol, rtol=0)
        torch.testing.assert_close(a.scores[i, :q], b.scores[i, :q], atol=1e-6, rtol=0)
        assert a.classes[i, :q].tolist() == b.classes[i, :q].tolist()


def test_scale_sizes_are_multiples_of_the_size_divisor():
    """0.8x / 1.2x to the nearest multiple of 128: D0's 512 -> 384 / 640; 256 would round back to 256 and
    moves one multiple (128 / 384); each side on its own; 1x is the input size even when it is no multiple
    (Lite0's 320); 128 cannot shrink and runs once."""
    assert [scaled_size((512, 512), f, 128) for f in (0.8, 1.0, 1.2)] == [(384, 384), (512, 512), (640, 640)]
    assert [scaled_size((320, 320), f, 128) for f in (0.8, 1.0, 1.2)] == [(256, 256), (320, 320), (384, 384)]
    assert [scaled_size((256, 256), f, 128) for f in (0.8, 1.2)] == [(128, 128), (384, 384)]
    assert scaled_size((384, 640), 0.8, 128) == (256, 512) and scaled_size((384, 640), 1.2, 128) == (512, 768)
    assert tta_passes("scales", (128, 128), 128) == [Pass((128, 128), False), Pass((256, 256), False)]
    assert tta_passes("flip+scales", (512, 512), 128) == [Pass((s, s), f) for s in (384, 512, 640)
                                                          for f in (False, True)]
    with pytest.raises(ValueError, match="--tta mirror: expected one of flip, scales, flip\\+scales"):
        tta_passes("mirror", (512, 512), 128)


class MirrorNet:
    """A network whose outputs mirror with its input: each level's maps are functions of the stride-pooled
    mean image (pooling windows aligned to a multiple of the stride mirror onto each other), with per-channel
    constants; the box deltas move nothing along x (tx = 0), so a mirrored input gives mirrored boxes.
    Boxes are shrunk to ~5 % of their anchors (th, tw ~ -3) so that none reaches the input's border: clipping
    two boxes to it could bring them above the fusion IoU after NMS let them both through."""

    def __init__(self, anchors_per_cell: int = 9, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.cls_w = torch.randn(anchors_per_cell * NUM_CLASSES, 1, 1, generator=g) * 3
        self.cls_b = torch.randn(anchors_per_cell * NUM_CLASSES, 1, 1, generator=g) - 3
        self.box_w = torch.randn(anchors_per_cell, 4, 1, 1, generator=g) * 0.3
        self.box_w[:, 1] = 0  # tx
        self.box_b = torch.tensor([0.0, 0.0, -3.0, -3.0]).reshape(1, 4, 1, 1)

    def __call__(self, images):
        gray = images.mean(1, keepdim=True)
        pooled = [F.avg_pool2d(gray, 2 ** level) for level in range(3, 8)]
        return ([p * self.cls_w + self.cls_b for p in pooled],
                [(torch.tanh(p)[:, None] * self.box_w + self.box_b).flatten(1, 2) for p in pooled])


def test_flip_of_a_mirror_symmetric_network_gives_the_unaugmented_boxes(model):
    """Each detection of the mirrored pass, mapped back, is its twin in the plain pass (class-agnostic hard
    NMS at 0.5 leaves no two same-class boxes at IoU >= 0.55 in a pass): every cluster is a twin pair, its box
    their mean, its score mean x min(1, 2 / 2), i.e. the plain detections (letterboxed, scaled inputs)."""
    arrays = originals(1)
    images, scales = preprocessed(model, arrays, 256)
    plain = Detector(model, 256, "infer", "hard", network=MirrorNet())(images, scales)
    flip = Detector(model, 256, "infer", "hard", network=MirrorNet(), tta="flip")
    assert not flip.tta.needs_originals
    assert plain.num_valid.min() > 20
    assert_same_detections(flip(images, scales), plain)


def test_a_scales_pass_at_1x_alone_equals_no_tta(model):
    arrays = originals(2)
    images, scales = preprocessed(model, arrays, 128)
    detector = Detector(model, 128, "eval", "soft")
    alone = TestTimeAugmentation([Pass((128, 128), False)], (128, 128), model.config.mean_rgb,
                                 model.config.stddev_rgb)
    assert_same_detections(alone(detector._detect, images, scales, arrays), detector(images, scales), atol=0)


def test_a_scale_pass_is_the_detector_at_that_size_on_the_original(model):
    """The 256 px pass of a 128 px detector resizes the original with the eval preprocessing: it equals a
    256 px detector on `preprocess_for_eval(original, 256)` (boxes in original pixels either way)."""
    arrays = originals(3)
    images, scales = preprocessed(model, arrays, 128)
    big = TestTimeAugmentation([Pass((256, 256), False)], (128, 128), model.config.mean_rgb,
                               model.config.stddev_rgb)
    expected = Detector(model, 256, "eval", "soft")(*preprocessed(model, arrays, 256))
    assert_same_detections(big(Detector(model, 128, "eval", "soft")._detect, images, scales, arrays), expected)


def test_passes_are_fused_last_first_with_their_count(model):
    """`--tta scales` at 128: passes 128 and 256; their rows are concatenated 256 first (the official loop
    prepends each new pass) and fused with num_models = 2."""
    arrays = originals(4)
    images, scales = preprocessed(model, arrays, 128)
    tta = Detector(model, 128, "eval", "soft", tta="scales")
    small = Detector(model, 128, "eval", "soft")(images, scales)
    large = Detector(model, 256, "eval", "soft")(*preprocessed(model, arrays, 256))
    rows = [large, small]
    valid = torch.cat([torch.arange(d.scores.shape[1]) < d.num_valid[:, None] for d in rows], 1)
    expected = fuse_detections(torch.cat([d.boxes for d in rows], 1), torch.cat([d.scores for d in rows], 1),
                               torch.cat([d.classes for d in rows], 1), valid, num_models=2)
    assert_same_detections(tta(images, scales, arrays), expected)
    with pytest.raises(ValueError, match="needs the 2 original image"):
        tta(images, scales)


def test_exported_network_refuses_scales_in_one_line(model):
    Detector(model, 256, "infer", "hard", network=MirrorNet(), tta="flip")  # one size: fine
    with pytest.raises(ValueError) as err:
        Detector(model, 256, "infer", "hard", network=MirrorNet(), tta="flip+scales")
    assert "\n" not in str(err.value) and "exported network runs 256x256" in str(err.value)


def test_evaluation_loop_passes_the_original_images(model, tmp_path):
    """`run_detection` with a scales TTA reads each image again for its other sizes: its results equal the
    detector called image by image on the dataset's tensor and the decoded image."""
    images = []
    for i, (h, w) in enumerate(((150, 200), (100, 90), (120, 160))):
        Image.fromarray(originals(10 + i, [(h, w)])[0]).save(tmp_path / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "categories": [{"id": c + 1, "name": f"c{c}"} for c in range(3)],
                               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 40, 30],
                                                "area": 1200, "iscrowd": 0}]}))
    dataset = CocoDetection(ann, tmp_path, train=False, image_size=128, mean_rgb=model.config.mean_rgb,
                            stddev_rgb=model.config.stddev_rgb)
    detector = Detector(model, 128, "eval", "soft", tta="flip+scales")
    results, stats, _ = run_detection(detector, dataset, 2, 0, torch.device("cpu"), progress=False)
    expected = []
    for batch in ([0, 1], [2]):  # the same batches: a batch's float sums depend on its size
        items = [dataset[i] for i in batch]
        dets = detector(torch.stack([t for t, _ in items]), torch.tensor([target["scale"] for _, target in items]),
                        [dataset.load_image(i) for i in batch])
        expected += detections_to_coco(dets, [target["image_id"] for _, target in items], dataset.class_to_category)
    assert stats["images"] == 3 and len(results) > 0
    assert results == expected


@pytest.mark.parametrize("mode, required", [("eval", ["--weights", "w.pth"]),
                                            ("infer", ["--weights", "w.pth", "--images", "x.jpg"])])
def test_cli_accepts_tta_and_rejects_bad_values_in_one_line(mode, required, capsys):
    assert main.parse_args(["-mode", mode, *required]).tta is None
    for value in ("flip", "scales", "flip+scales"):
        assert main.parse_args(["-mode", mode, *required, "--tta", value]).tta == value
    with pytest.raises(SystemExit) as exit_:
        main.parse_args(["-mode", mode, *required, "--tta", "mirror"])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == ["main.py: error: argument --tta: invalid choice: 'mirror' (choose from 'flip', 'scales', "
                      "'flip+scales')"]


def test_eval_cli_runs_the_tta_it_is_given(tmp_path):
    """`-mode eval --tta flip` runs the flip pass (2 passes fused: other detections than without it) and says
    so in metrics_val.json."""
    root, weights = tiny_shapes_run(tmp_path, randomised=True)
    found = {}
    for tta in (None, "flip"):
        out = tmp_path / f"eval-{tta}"
        assert main.main(["-mode", "eval", "--weights", str(weights), "--data", str(root), "--workers", "0",
                          "--device", "cpu", "--output", str(out), *(["--tta", tta] if tta else [])]) == 0
        metrics = json.loads((out / "metrics_val.json").read_text())
        assert metrics["tta"] == tta
        found[tta] = json.loads((out / "detections_val.json").read_text())
    assert found["flip"] != found[None] and len(found["flip"]) > 0
