"""COCO-format datasets and collation: `data/coco.py` (tiny datasets written to tmp_path)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data.coco import CocoDetection, collate_detection
from data.transforms import preprocess_for_eval

COCO_CATS = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 90, "name": "toothbrush"}]


def _ann(ann_id, image_id, category_id, bbox, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd,
            "area": float(bbox[2] * bbox[3])}


def _write(root, annotations, categories=COCO_CATS, sizes=((40, 60), (30, 50), (20, 20)), broken=(), split="train"):
    """root/annotations/instances_{split}2017.json + root/{split}2017/00000N.png (N = image id, 1-based)."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(exist_ok=True)
    images = []
    for image_id, (height, width) in enumerate(sizes, start=1):
        name = f"{image_id:06d}.png"
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        if image_id in broken:
            (root / f"{split}2017" / name).write_bytes(b"not an image at all")
        else:
            pixels = np.random.default_rng(image_id).integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"{split}2017" / name)
    data = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return root


def test_coco_ids_and_names_use_the_official_90_class_space(tmp_path):
    ds = CocoDetection.from_root(_write(tmp_path, [_ann(1, 1, 18, [5, 5, 10, 10])]), "train", image_size=64)
    assert ds.num_classes == 90 and ds.class_names[17] == "dog" and ds.class_names[2] == "car"
    assert ds.class_names[11] == "unused_12" and ds.class_to_category[11] is None
    assert ds.class_to_category[89] == 90 and ds.category_to_class == {1: 0, 18: 17, 90: 89}
    assert ds.annotations(0)[1].tolist() == [17]
    assert ds[0][1]["classes"].tolist() in ([17], [])


def test_other_categories_get_a_contiguous_map_over_sorted_ids(tmp_path):
    cats = [{"id": 10, "name": "b"}, {"id": 3, "name": "a"}, {"id": 7, "name": "person"}]
    ds = CocoDetection.from_root(_write(tmp_path, [_ann(1, 1, 7, [0, 0, 5, 5]), _ann(2, 1, 10, [1, 1, 5, 5])],
                                        categories=cats), "train")
    assert ds.class_names == ["a", "person", "b"] and ds.class_to_category == [3, 7, 10]
    assert ds.category_to_class == {3: 0, 7: 1, 10: 2} and ds.annotations(0)[1].tolist() == [1, 2]
    # COCO ids with a name that is not COCO's -> contiguous; forced label spaces
    renamed = [{"id": 1, "name": "person"}, {"id": 18, "name": "cat"}]
    assert CocoDetection.from_root(_write(tmp_path / "r", [], renamed), "train").num_classes == 2
    coco = _write(tmp_path / "c", [])
    assert CocoDetection.from_root(coco, "train", label_map="contiguous").class_to_category == [1, 18, 90]
    _write(tmp_path / "x", [], [{"id": 3, "name": "a"}, {"id": 95, "name": "z"}])
    with pytest.raises(ValueError, match=r"^label_map='coco90': .* has category ids \[95\] outside 1\.\.90"):
        CocoDetection.from_root(tmp_path / "x", "train", label_map="coco90")
    with pytest.raises(ValueError, match=r"^label_map: expected None \(auto\), 'coco90' or 'contiguous'"):
        CocoDetection.from_root(tmp_path, "train", label_map="voc")


def test_ground_truth_clipping_crowd_zero_area_and_max_instances(tmp_path):
    anns = [_ann(1, 1, 1, [10, 5, 20, 10]),            # kept: yxyx (5, 10, 15, 30)
            _ann(2, 1, 18, [0, 0, 30, 30], iscrowd=1),  # crowd: skipped in training only
            _ann(3, 1, 1, [30, 12, 0, 8]),              # zero width: dropped
            _ann(4, 1, 90, [-5, 30, 20, 20]),           # leaves the 40 x 60 image: clipped to (30, 0, 40, 15)
            _ann(5, 1, 1, [70, 10, 5, 5])]              # entirely outside: zero area after clipping, dropped
    anns += [_ann(10 + k, 2, 1, [k, k, 3, 3]) for k in range(5)]
    root = _write(tmp_path, anns)
    train = CocoDetection.from_root(root, "train", max_instances=3)
    boxes, classes = train.annotations(0)
    assert boxes.dtype == np.float32 and classes.dtype == np.int64
    np.testing.assert_array_equal(boxes, [[5, 10, 15, 30], [30, 0, 40, 15]])
    assert classes.tolist() == [0, 89]
    np.testing.assert_array_equal(train.annotations(1)[0], [[0, 0, 3, 3], [1, 1, 4, 4], [2, 2, 5, 5]])
    assert train.annotations(2)[0].shape == (0, 4)  # images without boxes are kept
    assert len(train) == 3
    evaluation = CocoDetection.from_root(root, "train", train=False)
    assert evaluation.annotations(0)[1].tolist() == [0, 17, 89]


def test_train_items_are_reproducible_per_seed_epoch_and_index(tmp_path):
    ds = CocoDetection.from_root(_write(tmp_path, [_ann(1, 1, 1, [10, 5, 20, 10])]), "train", image_size=64)
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and target["image_id"] == 1 and target["failures"] == []
    assert torch.equal(ds[0][0], image)
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], image)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_detection)
    images, _ = next(iter(loader))  # workers draw the same augmentation as the main process
    assert all(torch.equal(images[i], ds[i][0]) for i in range(3))


def test_eval_items_follow_the_official_preprocessing(tmp_path):
    root = _write(tmp_path, [_ann(1, 1, 1, [10, 5, 20, 10])], split="val")
    ds = CocoDetection.from_root(root, "val", image_size=64)
    image, meta = ds[0]
    expected, scale = preprocess_for_eval(Image.open(root / "val2017" / "000001.png"), 64)
    assert torch.equal(image, expected) and meta == {"image_id": 1, "scale": scale, "orig_size": (40, 60)}
    images, batch = collate_detection([ds[0], ds[1]])
    assert images.shape == (2, 3, 64, 64) and batch["image_ids"].tolist() == [1, 2]
    # 1 / scale in float32, as TF: 60 / 64 -> 0.93749994
    assert batch["scales"] == [float(np.float32(1) / (np.float32(64) / np.float32(w))) for w in (60, 50)]
    assert batch["scales"][0] != 60 / 64 and batch["orig_sizes"] == [(40, 60), (30, 50)]
    with pytest.raises(ValueError, match=r"^transform: only used for training"):
        CocoDetection.from_root(root, "val", transform=lambda *a: a)


def _no_augmentation(image, boxes, classes, rng):
    return torch.zeros(3, 64, 64), torch.from_numpy(boxes), torch.from_numpy(classes)


def test_collate_pads_with_minus_one_and_handles_no_boxes(tmp_path):
    root = _write(tmp_path, [_ann(1, 1, 1, [0, 0, 60, 40]), _ann(2, 1, 18, [0, 0, 30, 20])])
    ds = CocoDetection.from_root(root, "train", image_size=64, transform=_no_augmentation)
    images, batch = collate_detection([ds[0], ds[2]])
    assert images.shape == (2, 3, 64, 64) and batch["gt_boxes"].shape == (2, 2, 4)
    assert batch["gt_classes"].tolist() == [[0, 17], [-1, -1]] and (batch["gt_boxes"][1] == -1).all()
    assert batch["image_ids"].tolist() == [1, 3] and batch["num_failed"] == 0
    _, empty = collate_detection([ds[1], ds[2]])  # M = 0
    assert empty["gt_boxes"].shape == (2, 0, 4) and empty["gt_classes"].shape == (2, 0)


def test_broken_images_are_skipped_and_listed(tmp_path):
    root = _write(tmp_path, [_ann(1, 3, 1, [1, 1, 5, 5])], broken=(2,))
    train = CocoDetection.from_root(root, "train", image_size=32)
    evaluation = CocoDetection.from_root(root, "train", train=False, image_size=32)
    (root / "train2017" / "000001.png").unlink()  # a file that vanishes during the run is a failure too
    image, target = train[0]  # images 1 and 2 fail: the item is image 3
    assert target["image_id"] == 3
    assert [(b.file_name, b.reason) for b in target["failures"]] == [("000001.png", "missing"),
                                                                      ("000002.png", "cannot decode")]
    items = [evaluation[i] for i in range(3)]
    assert [getattr(item, "reason", None) for item in items[:2]] == ["missing", "cannot decode"]
    assert items[2][1]["image_id"] == 3
    _, batch = collate_detection(items)
    assert batch["image_ids"].tolist() == [3] and batch["num_failed"] == 2
    images, batch = collate_detection(items[:2])
    assert images is None and batch["num_failed"] == 2 and batch["image_ids"].tolist() == []


def test_bad_paths_and_files_are_clear_errors(tmp_path):
    layout = "DIR/annotations/instances_{train,val}2017.json + DIR/{train,val}2017/"
    with pytest.raises(FileNotFoundError, match=r"^root .*nowhere does not exist") as err:
        CocoDetection.from_root(tmp_path / "nowhere", "train")
    assert layout in str(err.value)
    root = _write(tmp_path, [])
    with pytest.raises(FileNotFoundError, match=r"^ann_file .*instances_val2017.json does not exist") as err:
        CocoDetection.from_root(root, "val")
    assert layout in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"^image_dir .*images does not exist"):
        CocoDetection(root / "annotations" / "instances_train2017.json", root / "images", train=True)
    ann_file = root / "annotations" / "instances_train2017.json"
    for text, reason in (("{not json", "not valid JSON"), ("[1, 2]", "top level is list"),
                         ('{"images": [], "categories": []}', "no 'annotations' list"),
                         ('{"images": [{"id": 1}], "annotations": [], "categories": []}', "an image lacks")):
        ann_file.write_text(text)
        with pytest.raises(ValueError, match=rf"^ann_file .*instances_train2017.json is not COCO json \({reason}"
                           ) as err:
            CocoDetection.from_root(root, "train")
        assert "\n" not in str(err.value)
    _write(root, [_ann(17, 1, 99, [1, 1, 5, 5])])
    with pytest.raises(ValueError, match=r"^ann_file .*: annotation id 17 has category_id 99, which is not in"):
        CocoDetection.from_root(root, "train")
