"""benchmarks/effdet_adapter.py: our targets in effdet's conventions, effdet's detections in ours (needs effdet,
the benchmark-only peer; skipped without it)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "benchmarks"))  # after the repository: nothing there shadows it

effdet = pytest.importorskip("effdet", reason="effdet (benchmarks/requirements.txt) is not installed")

import effdet_adapter  # noqa: E402
import train_vs_effdet  # noqa: E402
from data.coco import CocoDetection, collate_detection  # noqa: E402
from data.shapes import make_shapes_dataset  # noqa: E402
from data.transforms import TrainTransform  # noqa: E402
from model import AnchorGenerator, get_config  # noqa: E402
from train.assign import TargetAssigner  # noqa: E402

SIZE = (128, 128)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Eight augmented shapes images at 128 px, as collated for training, with our anchors and labels."""
    root = make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", num_train=8, num_val=2, workers=1)
    train_set = CocoDetection.from_root(root, "train", image_size=SIZE, seed=0,
                                        transform=TrainTransform(SIZE, 0.5, 1.5))
    images, t = collate_detection([train_set[i] for i in range(len(train_set))])
    anchors = AnchorGenerator.from_config(get_config("efficientdet-d0"))(SIZE)
    assigner = TargetAssigner.from_generator(AnchorGenerator.from_config(get_config("efficientdet-d0")), SIZE)
    bench = effdet_adapter.create_effdet_train("d0", train_set.num_classes, SIZE)
    return {"images": images, "boxes": t["gt_boxes"], "classes": t["gt_classes"], "anchors": anchors,
            "our_cls": assigner(t["gt_boxes"], t["gt_classes"]).cls_targets, "bench": bench}


def _check(batch):
    return effdet_adapter.check_target_conversion(batch["bench"], batch["our_cls"], batch["anchors"],
                                                  batch["boxes"], batch["classes"])


def test_effdet_labels_our_converted_targets_as_we_do(batch):
    result = _check(batch)
    assert result["effdet_positives"] > 0 and result["positive_overlap"] >= 0.7 and result["same_class"] >= 0.95
    target = effdet_adapter.effdet_target(batch["boxes"], batch["classes"])
    padding = batch["classes"] < 0
    assert torch.equal(target["cls"][~padding], batch["classes"][~padding] + 1)
    assert bool((target["cls"][padding] == -1).all()) and target["bbox"] is batch["boxes"]


@pytest.mark.parametrize("wrong", ["xyxy boxes", "0-based classes"])
def test_the_check_catches_a_wrong_conversion(batch, monkeypatch, wrong):
    def convert(gt_boxes, gt_classes):
        if wrong == "xyxy boxes":
            return {"bbox": gt_boxes[..., [1, 0, 3, 2]], "cls": torch.where(gt_classes >= 0, gt_classes + 1, -1)}
        return {"bbox": gt_boxes, "cls": gt_classes}
    monkeypatch.setattr(effdet_adapter, "effdet_target", convert)
    with pytest.raises(AssertionError, match="yxyx" if wrong == "xyxy boxes" else "1-based"):
        _check(batch)


def test_effdet_detector_gives_effdets_own_detections_in_our_layout(batch):
    """The rows of effdet's `DetBenchPredict` (hard NMS; without img_info: no scaling, no clipping), boxes yxyx
    and classes 0-based; the letterbox scale multiplies the boxes (NMS is scale-invariant)."""
    from effdet import DetBenchPredict
    model = batch["bench"].model.eval()
    images = batch["images"][:2]
    detector = effdet_adapter.EffdetDetector(model, soft_nms=False)
    dets = detector(images, torch.ones(2))
    with torch.no_grad():
        rows = DetBenchPredict(model)(images)  # [2, 100, 6] xyxy, score, 1-based class
    assert dets.boxes.shape == (2, 100, 4) and torch.equal(dets.num_valid, torch.tensor([100, 100]))
    torch.testing.assert_close(dets.boxes, rows[..., [1, 0, 3, 2]])
    torch.testing.assert_close(dets.scores, rows[..., 4])
    assert torch.equal(dets.classes, rows[..., 5].long() - 1) and int(dets.classes.min()) >= 0
    scales = torch.tensor([1.5, 2.0])
    torch.testing.assert_close(detector(images, scales).boxes, dets.boxes * scales[:, None, None])


@pytest.mark.parametrize("flags, message", [(["--image-size", "200"], "multiple of 128"),
                                            (["--jitter", "1.5", "0.5"], "MIN <= MAX")])
def test_bad_flags_are_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit):
        train_vs_effdet.parse_args(flags)
    assert message in capsys.readouterr().err.strip().splitlines()[-1]

