"""`--pretrained`: cached .pth, auto-port of an official checkpoint folder, download (file:// URL) and errors."""
import hashlib
import shutil
import tarfile

import pytest

from utils.pretrained import OFFICIAL_URL, resolve_pretrained
from utils.weights import load_weights

FILES = ("checkpoint", "model.index", "model.data-00000-of-00001")


def test_missing_weights_explain_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        resolve_pretrained("efficientdet-d3", tmp_path)
    message = str(e.value)
    assert message.splitlines()[0] == f"{tmp_path / 'efficientdet-d3.pth'}: pretrained weights not found. " \
                                      "Get the official checkpoint and port it:"
    assert OFFICIAL_URL.format(model="efficientdet-d3") in message
    assert "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco/efficientdet-d3.tar.gz" in message
    assert "python -m utils.port_tf --model efficientdet-d3" in message and "--download" in message


def test_official_folder_is_ported_once(fixture_dir, tmp_path):
    folder = tmp_path / "efficientdet-d0"
    folder.mkdir()
    for name in FILES:
        shutil.copy(fixture_dir / name, folder / name)
    pth = resolve_pretrained("efficientdet-d0", tmp_path)
    assert pth == tmp_path / "efficientdet-d0.pth"
    state, meta = load_weights(pth)
    assert meta["ema"] and meta["num_classes"] == 90 and len(state) > 700
    stamp = pth.stat().st_mtime_ns
    assert resolve_pretrained("efficientdet-d0", tmp_path) == pth and pth.stat().st_mtime_ns == stamp


def test_download_from_url(fixture_dir, tmp_path, capsys):
    archive = tmp_path / "efficientdet-d0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in FILES:
            tar.add(fixture_dir / name, arcname=f"efficientdet-d0/{name}")
    weights = tmp_path / "weights"
    pth = resolve_pretrained("efficientdet-d0", weights, download_missing=True, url=archive.as_uri())
    out = capsys.readouterr().out
    assert hashlib.sha256(archive.read_bytes()).hexdigest() in out
    assert load_weights(pth)[1]["source"] == archive.as_uri()
    assert sorted(p.name for p in (weights / "efficientdet-d0").iterdir()) == sorted(FILES)
    assert sorted(p.name for p in weights.iterdir()) == ["efficientdet-d0", "efficientdet-d0.pth"]  # no temp left


def test_download_of_a_bad_archive_leaves_nothing(tmp_path):
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"not a tarball")
    weights = tmp_path / "weights"
    with pytest.raises(ValueError, match="broken.tar.gz: not a readable .tar.gz checkpoint archive"):
        resolve_pretrained("efficientdet-d0", weights, download_missing=True, url=archive.as_uri())
    assert list(weights.iterdir()) == []
