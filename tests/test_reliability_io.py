"""Outputs and inputs that go wrong: zero-area boxes, unreadable infer inputs, unwritable output folders, a full
disk (simulated), non-checkpoint .pth files, unsafe tarballs, and the permissions of written files."""
from __future__ import annotations

import errno
import io
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from conftest import ROOT
from eval.infer import image_detections
from model import build_model
from model.postprocess import Detections
from data.atomic import atomic_open, write_json
from utils.pretrained import resolve_pretrained
from utils.weights import atomic_torch_save, load_weights, save_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random-init D0 weights for 2 classes at 128 px."""
    path = tmp_path_factory.mktemp("weights") / "w.pth"
    torch.manual_seed(0)
    save_weights(path, build_model("efficientdet-d0", num_classes=2).state_dict(), model_name="efficientdet-d0",
                 num_classes=2, class_names=["a", "b"], class_to_category=[1, 2], image_size=128)
    return path


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_boxes_without_area_after_clipping_are_dropped():
    boxes = torch.tensor([[[10.0, 10.0, 50.0, 40.0],      # inside: kept
                           [10.0, 120.0, 20.0, 140.0],    # right of the 100 px wide photo: width 0 after clipping
                           [-30.0, 5.0, -2.0, 30.0],      # above it: height 0
                           [10.0, 20.0, 30.0, 20.004],    # width 0.004: 0 once rounded to 0.01
                           [90.0, 90.0, 130.0, 120.0]]])  # partly outside: clipped to 10 x 10
    dets = Detections(boxes=boxes, scores=torch.full((1, 5), 0.9), classes=torch.zeros(1, 5, dtype=torch.long),
                      num_valid=torch.tensor([5]))
    found = image_detections(dets, 0, 100, 100, 0.5, ["a"], [7])
    assert [d["bbox"] for d in found] == [[10.0, 10.0, 30.0, 40.0], [90.0, 90.0, 10.0, 10.0]]
    assert found[0] == {"category_id": 7, "class": 0, "class_name": "a", "score": 0.9, "bbox": [10.0, 10.0, 30.0, 40.0]}


def test_infer_fails_when_no_input_can_be_read(weights, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "text.jpg").write_text("not an image")
    Image.new("RGB", (64, 64)).save(inputs / "whole.jpg")
    (inputs / "cut.jpg").write_bytes((inputs / "whole.jpg").read_bytes()[:200])
    (inputs / "whole.jpg").unlink()
    out = tmp_path / "out"
    assert main.main(["-mode", "infer", "--weights", str(weights), "--images", str(inputs), "--output", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err == ("error: --images: none of the 2 input file(s) could be read as an image (1 cannot decode, "
                            "1 truncated); nothing written\n")
    assert "skipping" in captured.out and list(out.iterdir()) == []
    empty = tmp_path / "empty"
    empty.mkdir()  # listed before the weights are read: the missing weight file is not what is reported
    assert main.main(["-mode", "infer", "--weights", "missing.pth", "--images", str(empty), "--output", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --images {empty}: no image files in this folder")


def test_infer_outputs_follow_the_umask(weights, tmp_path, umask_022):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert main.main(["-mode", "infer", "--weights", str(weights), "--images", str(tmp_path / "a.png"),
                      "--output", str(out), "--threshold", "0.99"]) == 0
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {"a.png": 0o644, "detections.json": 0o644}


def test_written_files_follow_the_umask_or_keep_their_mode(tmp_path):
    old = os.umask(0o027)
    try:
        save_weights(tmp_path / "w.pth", {"x": torch.zeros(2)})
        write_json({}, tmp_path / "m.json")
        assert (tmp_path / "w.pth").stat().st_mode & 0o777 == 0o640
        assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o640
        os.chmod(tmp_path / "m.json", 0o600)
        write_json({"again": 1}, tmp_path / "m.json")  # replacing a file keeps its mode, as open("w") does
        assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize("mode", ["infer", "eval", "train", "trainval"])
def test_an_unwritable_output_folder_is_refused_before_any_work(mode, tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    output = tmp_path / "file" / "out"
    # Weights and data do not exist: the output folder must be checked first.
    flags = {"infer": ["--weights", "missing.pth", "--images", str(tmp_path)],
             "eval": ["--weights", "missing.pth", "--data", str(tmp_path / "nowhere")],
             "train": ["--data", str(tmp_path / "nowhere")], "trainval": ["--data", str(tmp_path / "nowhere")]}
    assert main.main(["-mode", mode, *flags[mode], "--output", str(output)]) == 2
    assert capsys.readouterr().err == f"error: --output {output}: cannot write there (not a directory)\n"


class _FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are written."""

    def __init__(self, file, room=4096):
        self._file, self._room = file, room

    def write(self, data):
        self._room -= len(data)
        if self._room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


@pytest.fixture
def full_disk(monkeypatch):
    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _FullDisk(real(fd, *a, **k)))


def test_disk_full_names_the_file_and_keeps_the_previous_one(tmp_path, full_disk):
    target = tmp_path / "last.pth"
    target.write_bytes(b"previous")
    with pytest.raises(OSError, match=rf"^could not write {re.escape(str(target))}: no space left on device$") as err:
        atomic_torch_save({"w": torch.zeros(100_000)}, target)  # torch.save's zip writer hides the reason
    assert err.value.errno == errno.ENOSPC and "enforce fail" not in str(err.value)
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]
    with pytest.raises(OSError, match=r"could not write .*metrics.json: no space left on device"):
        write_json(list(range(10_000)), tmp_path / "metrics.json")
    with pytest.raises(OSError, match=r"could not write .*small.txt: no space left on device"):
        with atomic_open(tmp_path / "small.txt", "w") as f:
            f.write("x" * 5000)


def test_disk_full_during_infer_is_one_line(weights, tmp_path, capsys, full_disk):
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert main.main(["-mode", "infer", "--weights", str(weights), "--images", str(tmp_path / "a.png"),
                      "--output", str(out)]) == 2
    assert capsys.readouterr().err == f"error: could not write {out / 'a.png'}: no space left on device\n"


class NotAWeight:
    pass


def test_non_checkpoint_files_are_refused_without_unsafe_advice(tmp_path, capsys):
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": NotAWeight()}, tmp_path / "pickle.pth")
    (tmp_path / "text.pth").write_text("hello")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    for name, reason in (("pickle.pth", r"it holds a pickled Python object \(\S*NotAWeight\), which is not loaded "
                                        r"for safety"),
                         ("text.pth", r"not a PyTorch file \("), ("list.pth", "")):
        with pytest.raises(ValueError) as err:
            load_weights(tmp_path / name)
        message = str(err.value)
        assert re.match(rf"{re.escape(str(tmp_path / name))}: (cannot be loaded: )?.*{reason}", message), message
        assert "a valid weight file is a .pth written by `python -m utils.port_tf` or by training" in message
        assert "weights_only" not in message and "\n" not in message and err.value.__cause__ is None
    assert main.main(["-mode", "infer", "--weights", str(tmp_path / "pickle.pth"), "--images", str(tmp_path),
                      "--output", str(tmp_path / "o")]) == 2
    assert "weights_only" not in capsys.readouterr().err


def test_every_torch_load_is_weights_only():
    calls = []
    for path in ROOT.rglob("*.py"):
        if "tests" in path.parts:
            continue
        calls += [(path.name, call) for call in re.findall(r"torch\.load\([^)]*\)", path.read_text())]
    assert calls and all("weights_only=True" in call for _, call in calls), calls


def _tarball(path: Path, bad: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("efficientdet-d0/checkpoint")
        ok.size = 4
        tar.addfile(ok, io.BytesIO(b"data"))
        tar.addfile(bad, io.BytesIO(b"evil") if bad.isfile() else None)
    return path


def _member(name, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, 4 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("bad, words", [
    (_member("/tmp/efficientdet-evil"), "is a link to an absolute path|is an absolute path|absolute"),
    (_member("efficientdet-d0/../../evil"), "outside the destination"),
    (_member("efficientdet-d0/link", tarfile.SYMTYPE, "../../../etc/passwd"), "outside the destination"),
    (_member("efficientdet-d0/abs", tarfile.SYMTYPE, "/etc/passwd"), "absolute path"),
    (_member("efficientdet-d0/hard", tarfile.LNKTYPE, "../../etc/passwd"), "outside the destination"),
    (_member("efficientdet-d0/dev", tarfile.CHRTYPE), "special file"),
    (_member("efficientdet-d0/fifo", tarfile.FIFOTYPE), "special file"),
], ids=["absolute", "dotdot", "symlink-out", "symlink-absolute", "hardlink-out", "device", "fifo"])
def test_download_refuses_unsafe_tarballs(tmp_path, bad, words):
    archive = _tarball(tmp_path / "efficientdet-d0.tar.gz", bad)
    weights = tmp_path / "sub" / "weights"
    with pytest.raises(ValueError, match=r"efficientdet-d0.tar.gz: refused to unpack an unsafe member: ") as err:
        resolve_pretrained("efficientdet-d0", weights, download_missing=True, url=archive.as_uri())
    assert re.search(words, str(err.value)), str(err.value)
    assert list(weights.iterdir()) == []  # nothing unpacked, no temp folder left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["efficientdet-d0.tar.gz", "sub"]
    assert not Path("/tmp/efficientdet-evil").exists()
