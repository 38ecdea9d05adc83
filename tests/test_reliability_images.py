"""Images: every PIL mode decoded into correct 8-bit RGB or refused (data/image_io.py), and unreadable or
missing dataset images found, counted and limited (data/coco.py, data/bad_images.py). Files generated here."""
from __future__ import annotations

import json
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import main
from data.bad_images import BadImage, BadImageBudget, BadImageLimit
from data.coco import CocoDetection
from data.image_io import BACKGROUND, ImageReadError, read_rgb, to_rgb8

GREY16 = np.array([[0, 257, 257 * 100], [257 * 200 + 129, 65534, 65535]], dtype=np.uint16)


def _rgb(path, **kwargs):
    return read_rgb(path, **kwargs).astype(int)


def _png16_rgb(path, pixels: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write one)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16_bit_grey_uses_the_full_range(tmp_path):
    Image.fromarray(GREY16).save(tmp_path / "grey16.png")  # PIL opens it as I;16
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    expected = np.floor(GREY16 / 257 + 0.5).astype(int)
    assert expected.tolist() == [[0, 1, 100], [201, 255, 255]]  # 51529 / 257 = 200.502 rounds up
    rgb = _rgb(tmp_path / "grey16.png")
    assert rgb.shape == (2, 3, 3) and (rgb == expected[:, :, None]).all()
    Image.fromarray(GREY16.astype(">u2")).save(tmp_path / "grey16b.tif")
    assert Image.open(tmp_path / "grey16b.tif").mode == "I;16B"
    assert (_rgb(tmp_path / "grey16b.tif") == expected[:, :, None]).all()
    # the bug this replaces: convert("RGB") turns everything above 255 white
    assert np.asarray(Image.open(tmp_path / "grey16.png").convert("RGB"))[1, 0].tolist() == [255, 255, 255]


def test_16_bit_rgb_png_keeps_its_colours(tmp_path):
    pixels = np.array([[[65535, 0, 257 * 50], [257 * 128, 257 * 64, 0]]], dtype=np.uint16)
    _png16_rgb(tmp_path / "rgb16.png", pixels)
    assert _rgb(tmp_path / "rgb16.png").tolist() == [[[255, 0, 50], [128, 64, 0]]]


def test_32_bit_integer_and_float_images(tmp_path):
    Image.fromarray(GREY16.astype(np.int32)).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    assert (_rgb(tmp_path / "i32.tif")[:, :, 0] == np.floor(GREY16 / 257 + 0.5)).all()
    Image.fromarray(np.array([[-5, 70000]], dtype=np.int32)).save(tmp_path / "i32_bad.tif")
    with pytest.raises(ImageReadError, match=r"i32_bad.tif: unsupported \(32-bit integer image with values -5..70000"):
        read_rgb(tmp_path / "i32_bad.tif")
    unit = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(unit).save(tmp_path / "f_unit.tif")
    assert _rgb(tmp_path / "f_unit.tif")[0, :, 1].tolist() == [0, 128, 255]
    Image.fromarray(np.array([[0.0, 17.0, 254.6]], dtype=np.float32)).save(tmp_path / "f_255.tif")
    assert _rgb(tmp_path / "f_255.tif")[0, :, 2].tolist() == [0, 17, 255]
    for name, values in (("f_nan", [[0.0, np.nan]]), ("f_big", [[0.0, 300.0]]), ("f_neg", [[-1.0, 0.5]])):
        Image.fromarray(np.array(values, dtype=np.float32)).save(tmp_path / f"{name}.tif")
        with pytest.raises(ImageReadError, match=rf"{name}.tif: unsupported \(32-bit float image") as err:
            read_rgb(tmp_path / f"{name}.tif")
        assert err.value.reason == "unsupported"


def test_transparency_is_composited_over_white(tmp_path):
    assert BACKGROUND == (255, 255, 255)
    rgba = np.array([[[200, 0, 0, 0], [0, 0, 200, 255], [0, 100, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    # alpha 128: 100 * 128/255 + 255 * 127/255 = 177.2; 255 * 127/255 = 127
    assert _rgb(tmp_path / "rgba.png").tolist() == [[[255, 255, 255], [0, 0, 200], [127, 177, 127]]]
    Image.fromarray(np.array([[[50, 0], [50, 255]]], dtype=np.uint8), "LA").save(tmp_path / "la.png")
    assert _rgb(tmp_path / "la.png").tolist() == [[[255] * 3, [50] * 3]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 40, 50, 60])
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)  # palette entry 0 transparent
    palette.save(tmp_path / "p.gif", transparency=0)
    for name in ("p.png", "p.gif"):
        assert _rgb(tmp_path / name).tolist() == [[[255, 255, 255], [40, 50, 60]]], name
    palette.save(tmp_path / "p_opaque.png")
    assert _rgb(tmp_path / "p_opaque.png").tolist() == [[[10, 20, 30], [40, 50, 60]]]
    Image.new("RGB", (2, 1), (9, 8, 7)).save(tmp_path / "rgb_trns.png", transparency=(9, 8, 7))
    assert _rgb(tmp_path / "rgb_trns.png").tolist() == [[[255, 255, 255]] * 2]


def test_cmyk_bilevel_grey_and_unsupported_modes(tmp_path):
    cmyk = Image.new("CMYK", (2, 1), (255, 0, 0, 0))
    cmyk.putpixel((1, 0), (0, 0, 0, 128))
    cmyk.save(tmp_path / "cmyk.tif")
    assert _rgb(tmp_path / "cmyk.tif").tolist() == [[[0, 255, 255], [127, 127, 127]]]
    cmyk.save(tmp_path / "cmyk.jpg", quality=100)
    assert np.abs(_rgb(tmp_path / "cmyk.jpg") - [[[0, 255, 255], [127, 127, 127]]]).max() <= 8  # lossy
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    bilevel.save(tmp_path / "one.png")
    assert _rgb(tmp_path / "one.png").tolist() == [[[0, 0, 0], [255, 255, 255]]]
    Image.new("L", (1, 1), 77).save(tmp_path / "grey.png")
    assert _rgb(tmp_path / "grey.png").tolist() == [[[77, 77, 77]]]
    with pytest.raises(ImageReadError, match=r"lab: unsupported \(PIL image mode 'LAB'"):
        to_rgb8(Image.new("LAB", (1, 1)), "lab")
    out = to_rgb8(Image.new("RGB", (3, 2), (1, 2, 3)))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3) and out.flags.writeable


def test_exif_orientation_only_on_request(tmp_path):
    pixels = np.zeros((2, 4, 3), dtype=np.uint8)
    pixels[0, 0] = 255  # white top-left corner of the stored grid
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "rotated.png", exif=exif)
    stored = _rgb(tmp_path / "rotated.png")
    assert stored.shape == (2, 4, 3) and stored[0, 0].tolist() == [255] * 3  # train / eval: stored grid
    upright = _rgb(tmp_path / "rotated.png", exif_transpose=True)
    assert upright.shape == (4, 2, 3) and upright[0, 1].tolist() == [255] * 3  # infer: as viewers show it


def test_reasons_missing_truncated_and_not_an_image(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    for name, reason in (("gone.png", "missing"), ("cut.jpg", "truncated"), ("text.png", "cannot decode")):
        with pytest.raises(ImageReadError) as err:
            read_rgb(tmp_path / name)
        assert err.value.reason == reason and str(err.value).startswith(f"{tmp_path / name}: {reason} (")


# ---------------------------------------------------------------- datasets


def _dataset(root, sizes, split="train", write=True, modes=None):
    """root/annotations/instances_{split}2017.json + root/{split}2017/N.png with one box each."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(exist_ok=True)
    images, anns = [], []
    for k, (h, w) in enumerate(sizes, start=1):
        images.append({"id": k, "file_name": f"{k}.png", "height": h, "width": w})
        anns.append({"id": k, "image_id": k, "category_id": 1, "bbox": [1, 1, 8, 8], "area": 64, "iscrowd": 0})
        if write:
            pixels = np.random.default_rng(k).integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"{split}2017" / f"{k}.png")
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return root


def test_missing_files_are_an_error_when_the_dataset_is_built(tmp_path):
    root = _dataset(tmp_path, [(32, 32)] * 8)
    for k in (2, 3, 5, 6, 7, 8):
        (root / "train2017" / f"{k}.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"^image_dir .*train2017: 6 of the 8 images of .*instances_train2017"
                                                r".json are missing: 2.png, 3.png, 5.png, 6.png, 7.png, \.\.\.$"):
        CocoDetection.from_root(root, "train")


def test_16_bit_dataset_image_and_size_mismatch_warning(tmp_path):
    root = _dataset(tmp_path, [(2, 3), (40, 30)])
    Image.fromarray(GREY16).save(root / "train2017" / "1.png")
    ds = CocoDetection.from_root(root, "train", image_size=32)
    assert (ds.load_image(0).astype(int) == np.floor(GREY16 / 257 + 0.5)[:, :, None]).all()
    Image.fromarray(np.zeros((50, 20, 3), dtype=np.uint8)).save(root / "train2017" / "2.png")
    with pytest.warns(UserWarning, match=r"2.png: decodes to height x width 50 x 20, but .* says 40 x 30; using the "
                                         r"decoded size"):
        assert ds.load_image(1).shape == (50, 20, 3)
        image, target = ds[1]
    assert image.shape == (3, 32, 32) and target["failures"] == []


def test_max_bad_images_limits_and_budget():
    assert BadImageLimit.parse("1%").of(250) == 2 and BadImageLimit.parse("10").of(5) == 10
    assert BadImageLimit.parse("0.5 %").of(1000) == 5 and str(BadImageLimit.parse("2.5%")) == "2.5%"
    for bad in ("-1", "101%", "x", "1e3", "nan%"):
        with pytest.raises(ValueError, match="expected a number of images"):
            BadImageLimit.parse(bad)
    budget = BadImageBudget(BadImageLimit(percent=1.0), 200, "epoch 1 on imgs", speak=False)
    budget.add([BadImage(1, "a.png", "missing", "no such file")])
    budget.add([], count=1)  # another rank's failure
    with pytest.raises(RuntimeError, match=r"^epoch 1 on imgs: 3 unreadable images, more than --max-bad-images 1% "
                                           r"\(= 2 of 200 images\); stopped: 1 missing, 1 truncated; first a.png "
                                           r"\(missing\), b.png \(truncated\)$"):
        budget.add([BadImage(2, "b.png", "truncated", "image file is truncated")])


def test_eval_skips_unreadable_images_and_scores_the_rest(tmp_path, capsys):
    import torch
    from model import build_model
    from utils.weights import save_weights
    root = _dataset(tmp_path / "data", [(64, 64)] * 4, split="val")
    (root / "val2017" / "3.png").write_bytes(b"broken")
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    save_weights(weights, build_model("efficientdet-d0", num_classes=1).state_dict(), model_name="efficientdet-d0",
                 num_classes=1, class_names=["thing"], class_to_category=[1], image_size=128)
    common = ["-mode", "eval", "--weights", str(weights), "--data", str(root), "--workers", "0", "--nms", "hard",
              "--batch-size", "2"]
    assert main.main(common + ["--output", str(tmp_path / "strict")]) == 2  # 1 of 4 > 1 % of 4 (= 0)
    error = re.search(r"error: .*", capsys.readouterr().err).group(0)  # after the progress bar's output
    assert error == (f"error: evaluation on {root / 'val2017'}: 1 unreadable images, more than --max-bad-images 1% "
                     f"(= 0 of 4 images); stopped: 1 cannot decode; first 3.png (cannot decode)")
    assert not (tmp_path / "strict" / "metrics_val.json").exists()
    assert main.main(common + ["--output", str(tmp_path / "lenient"), "--max-bad-images", "1"]) == 0
    out = capsys.readouterr().out
    assert "skipping 3.png: cannot decode" in out
    assert "1 unreadable image(s) skipped, the metrics are over the 3 read" in out
    metrics = json.loads((tmp_path / "lenient" / "metrics_val.json").read_text())
    assert metrics["images"] == 3 and metrics["failed"] == 1
    assert {d["image_id"] for d in json.loads((tmp_path / "lenient" / "detections_val.json").read_text())} <= {1, 2, 4}


def test_training_stops_as_soon_as_bad_images_pass_the_limit(tmp_path):
    from train.trainer import Trainer
    root = _dataset(tmp_path / "data", [(64, 64)] * 8)
    args = main.parse_args(["-mode", "train", "--data", str(root), "--image-size", "128", "--batch-size", "2",
                            "--epochs", "2", "--workers", "0", "--output", str(tmp_path / "run"),
                            "--max-bad-images", "1"])
    trainer = Trainer(args)
    for k in (2, 3):  # items 1 and 2 of the epoch's order read the next image instead: 2 failures
        (root / "train2017" / f"{k}.png").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(RuntimeError, match=r"unreadable images, more than --max-bad-images 1 \(= 1 of 8 images\)"):
        trainer.fit()
    assert trainer.step <= 4  # stopped within the first epoch, as soon as the second failure came
    assert (tmp_path / "run" / "last.pth").is_file()  # and the steps done are saved
