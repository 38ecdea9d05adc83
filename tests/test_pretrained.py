"""`--pretrained`: the official URLs and the mirror setting, cached .pth, auto-port of an official checkpoint
folder, download (file:// URL) and errors. The download over HTTP, end to end: test_download.py."""
import hashlib
import shutil
import tarfile
from pathlib import Path

import pytest

from model.config import VARIANTS
from utils.pretrained import (MIRROR_ENV, OFFICIAL_URL, WEIGHTS_DIR_ENV, default_weights_dir, official_url,
                              resolve_pretrained)
from utils.weights import load_weights

# The official README's table ("Pretrained EfficientDet Checkpoints"), verbatim but for lite3x, whose link
# there ends in '..gz': the file is .tgz like the other Lite archives.
OFFICIAL_URLS = [
    "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco2/efficientdet-d0.tar.gz",
    "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco2/efficientdet-d1.tar.gz",
    "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco2/efficientdet-d2.tar.gz",
    "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco2/efficientdet-d3.tar.gz",
    "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco2/efficientdet-d4.tar.gz",
    "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco2/efficientdet-d5.tar.gz",
    "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco2/efficientdet-d6.tar.gz",
    "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco2/efficientdet-d7.tar.gz",
    "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco2/efficientdet-d7x.tar.gz",
    "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco/efficientdet-lite0.tgz",
    "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco/efficientdet-lite1.tgz",
    "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco/efficientdet-lite2.tgz",
    "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco/efficientdet-lite3.tgz",
    "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco/efficientdet-lite3x.tgz",
    "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco/efficientdet-lite4.tgz",
]


def test_each_variant_has_its_official_url(monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    by_name = {url.rsplit("/", 1)[1].split(".")[0]: url for url in OFFICIAL_URLS}  # one URL per variant
    assert len(by_name) == len(OFFICIAL_URLS) == 15 and set(by_name) == set(VARIANTS)
    assert {name: official_url(name) for name in VARIANTS} == by_name


@pytest.mark.parametrize("base", ["http://127.0.0.1:8000", "http://127.0.0.1:8000/", "file:///srv/mirror//"])
def test_mirror_replaces_the_bucket(monkeypatch, base):
    monkeypatch.setenv(MIRROR_ENV, base)
    root = base.rstrip("/")
    assert official_url("efficientdet-d0") == f"{root}/coco2/efficientdet-d0.tar.gz"
    assert official_url("efficientdet-lite3x") == f"{root}/coco/efficientdet-lite3x.tgz"


@pytest.mark.parametrize("base", ["ftp://mirror/efficientdet", "127.0.0.1:8000", "/srv/mirror"])
def test_mirror_that_is_not_a_url_is_a_one_line_error(monkeypatch, base, tmp_path):
    monkeypatch.setenv(MIRROR_ENV, base)
    with pytest.raises(ValueError) as e:
        resolve_pretrained("efficientdet-d0", tmp_path, download_missing=True)
    assert str(e.value).startswith(f"{MIRROR_ENV}={base}: expected an http://, https:// or file:// URL")
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []


def test_weights_dir_setting(monkeypatch, tmp_path):
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    assert default_weights_dir() == Path(__file__).resolve().parents[1] / "weights"
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    assert default_weights_dir() == tmp_path

FILES = ("checkpoint", "model.index", "model.data-00000-of-00001")


def test_missing_weights_explain_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as e:
        resolve_pretrained("efficientdet-d3", tmp_path)
    message = str(e.value)
    assert message.splitlines()[0] == f"{tmp_path / 'efficientdet-d3.pth'}: pretrained weights not found. " \
                                      "Get the official checkpoint and port it:"
    assert OFFICIAL_URL.format(model="efficientdet-d3") in message
    assert "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco2/efficientdet-d3.tar.gz" in message
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
    with pytest.raises(ValueError, match=f"{archive.as_uri()}: not a gzip archive"):
        resolve_pretrained("efficientdet-d0", weights, download_missing=True, url=archive.as_uri())
    assert list(weights.iterdir()) == []


def test_download_of_a_missing_file_names_it(tmp_path, monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    url = (tmp_path / "missing.tar.gz").as_uri()
    with pytest.raises(OSError) as e:
        resolve_pretrained("efficientdet-d0", tmp_path / "weights", download_missing=True, url=url)
    assert str(e.value).startswith(f"{url}: cannot fetch ([Errno 2] No such file or directory: ")
    assert f"check the network and run again, or set {MIRROR_ENV} to a mirror" in str(e.value)
    assert list((tmp_path / "weights").iterdir()) == []
