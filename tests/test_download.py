"""`--pretrained --download` end to end, from a local HTTP mirror (`EFFICIENTDET_CHECKPOINT_MIRROR`) into a
temporary weights folder (`EFFICIENTDET_WEIGHTS_DIR`): the eval and infer modes download, check, unpack and
port the official-layout archive once, then reuse the `.pth`; every broken download is one error line naming
the URL and leaves the weights folder as it was; the archive layouts the official loader accepts are found."""
from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import main
from conftest import FIXTURE, ROOT, require_fixture
from utils.pretrained import MIRROR_ENV, WEIGHTS_DIR_ENV, ArchiveError, _unpack_checkpoint, resolve_pretrained
from utils.weights import load_weights

FILES = ("checkpoint", "model.index", "model.data-00000-of-00001")
D0_PATH = "/coco2/efficientdet-d0.tar.gz"


def tarball(members: dict[str, bytes | Path | tuple[str, str]]) -> bytes:
    """A .tar.gz of `members`: name -> bytes, a file to add, or ("symlink", target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:  # level 1: the data file is 31 MB
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, content[1]
                tar.addfile(info)
                continue
            data = content.read_bytes() if isinstance(content, Path) else content
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def official_archive() -> bytes:
    """The official D0 archive's layout: `efficientdet-d0/` holding the fixture's TF checkpoint."""
    folder = require_fixture(FIXTURE, *FILES)
    return tarball({f"efficientdet-d0/{name}": folder / name for name in FILES})


class _Handler(BaseHTTPRequestHandler):
    """Serves `server.routes[path] = (body, announced Content-Length)`; counts requests in `server.hits`.
    A body shorter than its Content-Length is a transfer cut off: HTTP/1.0 closes the connection after it."""

    def do_GET(self):
        self.server.hits[self.path] += 1
        if self.path not in self.server.routes:
            self.send_error(404)
            return
        body, length = self.server.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def mirror():
    """A ThreadingHTTPServer on a free port of 127.0.0.1: `.routes`, `.hits`, `.base` (its URL)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.routes, server.hits = {}, Counter()
    server.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def weights(tmp_path, monkeypatch, mirror) -> Path:
    """An empty weights folder, and the settings pointing this process at it and at the mirror."""
    folder = tmp_path / "weights"
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(folder))
    monkeypatch.setenv(MIRROR_ENV, mirror.base + "/")  # a trailing slash is tolerated
    return folder


def listing(folder: Path) -> list[str]:
    """Everything under `folder`, hidden files included (a temp folder left behind would show)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def tiny_coco(folder: Path) -> tuple[Path, Path]:
    """A one-image dataset whose category carries COCO's id and name (so the 90-class label space of the
    official weights) and that image; returns `(dataset root, image)`."""
    image = folder / "val2017" / "a.png"
    image.parent.mkdir(parents=True)
    Image.new("RGB", (128, 96), (120, 90, 60)).save(image)
    (folder / "annotations").mkdir()
    (folder / "annotations" / "instances_val2017.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "height": 96, "width": 128}],
        "categories": [{"id": 1, "name": "person"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600,
                         "iscrowd": 0}]}))
    return folder, image


def run_cli(mode: str, tmp_path: Path, weights: Path, base: str) -> subprocess.CompletedProcess:
    """`python main.py -mode MODE --pretrained --download ...` at 128 px on CPU, in `tmp_path`."""
    root = tmp_path / "coco"
    image = root / "val2017" / "a.png"
    if not root.exists():
        tiny_coco(root)
    flags = (["--data", str(root), "--workers", "0"] if mode == "eval" else ["--images", str(image)])
    command = [sys.executable, str(ROOT / "main.py"), "-mode", mode, "--pretrained", "--download", *flags,
               "--image-size", "128", "--device", "cpu", "--output", str(tmp_path / mode)]
    env = {**os.environ, WEIGHTS_DIR_ENV: str(weights), MIRROR_ENV: base}
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def assert_downloaded(done: subprocess.CompletedProcess, url: str, archive: bytes, weights: Path) -> None:
    """The run succeeded through a download: progress bar, SHA-256, port, the checkpoint kept beside the .pth."""
    assert done.returncode == 0, done.stderr
    assert "downloading efficientdet-d0.tar.gz" in done.stderr and "100%" in done.stderr  # the progress bar
    assert f"downloaded {url}\n  sha256 {hashlib.sha256(archive).hexdigest()}" in done.stdout
    assert f"ported {url} -> {weights / 'efficientdet-d0.pth'}" in done.stdout
    assert listing(weights) == sorted(["efficientdet-d0", *(f"efficientdet-d0/{n}" for n in FILES),
                                       "efficientdet-d0.pth"])
    assert load_weights(weights / "efficientdet-d0.pth")[1]["source"] == url


def test_cli_eval_downloads_once_then_infer_reuses_the_pth(official_archive, mirror, tmp_path):
    mirror.routes[D0_PATH] = (official_archive, len(official_archive))
    weights = tmp_path / "weights"
    assert_downloaded(run_cli("eval", tmp_path, weights, mirror.base), mirror.base + D0_PATH, official_archive,
                      weights)
    assert json.loads((tmp_path / "eval" / "metrics_val.json").read_text())["images"] == 1
    again = run_cli("infer", tmp_path, weights, mirror.base)
    assert again.returncode == 0, again.stderr
    assert "downloading" not in again.stderr and "ported" not in again.stdout
    assert mirror.hits == {D0_PATH: 1} and (tmp_path / "infer" / "detections.json").is_file()


def test_cli_infer_downloads_into_an_empty_weights_folder(official_archive, mirror, tmp_path):
    mirror.routes[D0_PATH] = (official_archive, len(official_archive))
    weights = tmp_path / "weights"
    assert_downloaded(run_cli("infer", tmp_path, weights, mirror.base), mirror.base + D0_PATH, official_archive,
                      weights)
    assert mirror.hits == {D0_PATH: 1} and (tmp_path / "infer" / "detections.json").is_file()


def test_cli_refused_connection_is_one_line_at_once(tmp_path):
    with socket.socket() as probe:  # a free port, closed again: nobody listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    done = run_cli("infer", tmp_path, tmp_path / "weights", f"http://127.0.0.1:{port}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith(
        f"error: http://127.0.0.1:{port}{D0_PATH}: cannot fetch ([Errno 111] Connection refused); check that the "
        f"mirror {MIRROR_ENV}=http://127.0.0.1:{port} serves it")
    assert time.monotonic() - start < 60  # the start-up of python and torch, no connection timeout
    assert listing(tmp_path / "weights") == []


def _cut(data: bytes) -> tuple[bytes, int]:
    """Half of `data`, announced whole: the transfer stops in the middle."""
    return data[:len(data) // 2], len(data)


def _whole(data: bytes) -> tuple[bytes, int]:
    return data, len(data)


# case -> (what the server sends for the D0 archive, None for a 404; the expected message after "URL: ")
FAILURES = {
    "404": (None, "HTTP 404 Not Found; check that the mirror"),
    "interrupted": (lambda archive: _cut(archive), "download interrupted: received "),
    "truncated": (lambda archive: _whole(archive[:len(archive) // 2]), "truncated or corrupt gzip archive"),
    "not gzip": (lambda _: _whole(b"<!DOCTYPE html><html>Service unavailable</html>"),
                 "not a gzip archive (it starts with b'<!DOCTYPE html><'); the server sent something else"),
    "no checkpoint": (lambda _: _whole(tarball({"efficientdet-d0/README": b"x", "efficientdet-d0/model.meta": b""})),
                      "expected one TF checkpoint inside, found no TF checkpoint (*.index file); its members: "
                      "efficientdet-d0/README, efficientdet-d0/model.meta."),
    "dot-dot member": (lambda _: _whole(tarball({"efficientdet-d0/../../evil": b"x"})),
                       "refused to unpack an unsafe member: "),
    "absolute member": (lambda _: _whole(tarball({"/tmp/evil-efficientdet": b"x"})),
                        "refused to unpack an unsafe member: "),
    "link out": (lambda _: _whole(tarball({"efficientdet-d0/model.index": ("symlink", "../../../evil")})),
                 "refused to unpack an unsafe member: "),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_failed_download_is_one_line_and_leaves_the_weights_folder_as_it_was(case, official_archive, mirror,
                                                                              weights, tmp_path, capsys):
    serve, message = FAILURES[case]
    if serve is not None:
        mirror.routes[D0_PATH] = serve(official_archive)
    weights.mkdir()
    (weights / "notes.txt").write_text("kept")
    status = main.main(["-mode", "eval", "--pretrained", "--download", "--output", str(tmp_path / "out"),
                        "--system-malloc"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 2 and "Traceback" not in err and len(errors) == 1
    assert errors[0].startswith(f"error: {mirror.base}{D0_PATH}: {message}"), errors[0]
    assert listing(weights) == ["notes.txt"] and mirror.hits == {D0_PATH: 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]  # nothing unpacked beside, no --output made
    with pytest.raises(FileNotFoundError, match="pretrained weights not found"):  # a later run finds nothing
        resolve_pretrained("efficientdet-d0")


def test_bare_checkpoint_prefix_at_the_archive_root_is_ported(official_archive, mirror, weights):
    folder = require_fixture(FIXTURE, *FILES)
    archive = tarball({"model.index": folder / "model.index",
                       "model.data-00000-of-00001": folder / "model.data-00000-of-00001"})
    mirror.routes[D0_PATH] = _whole(archive)
    pth = resolve_pretrained("efficientdet-d0", download_missing=True)
    assert pth == weights / "efficientdet-d0.pth" and load_weights(pth)[1]["num_classes"] == 90
    assert listing(weights) == ["efficientdet-d0", "efficientdet-d0.pth", "efficientdet-d0/model.data-00000-of-00001",
                                "efficientdet-d0/model.index"]
    assert resolve_pretrained("efficientdet-d0", download_missing=True) == pth and mirror.hits == {D0_PATH: 1}


_DATA = "model.data-00000-of-00001"


# archive members -> the folder (relative to the unpack folder) expected to hold the checkpoint
@pytest.mark.parametrize("members, expected", [
    ({"efficientdet-lite0/checkpoint": b"", "efficientdet-lite0/model.index": b"",
      f"efficientdet-lite0/{_DATA}": b"", "efficientdet-lite0/model.meta": b""}, "efficientdet-lite0"),
    ({"model.index": b"", _DATA: b""}, "."),
    ({"ckpt/model.index": b"", f"ckpt/{_DATA}": b"", "ckpt/model.meta": b""}, "ckpt"),
    ({"run/checkpoint": b"", "run/model.ckpt-1.index": b"", "run/model.ckpt-2.index": b""}, "run"),
], ids=["folder with a checkpoint file", "bare prefix at the root", "bare prefix in a folder",
        "checkpoint file naming one of several"])
def test_accepted_archive_layouts(members, expected, tmp_path):
    archive = tmp_path / "a.tgz"
    archive.write_bytes(tarball(members))
    assert _unpack_checkpoint(archive, tmp_path / "u", "URL") == tmp_path / "u" / expected


@pytest.mark.parametrize("members, found", [
    ({"a/README": b""}, "found no TF checkpoint (*.index file); its members: a/README."),
    ({"a.index": b"", "b.index": b""}, "found 2 checkpoints in one folder and no 'checkpoint' file naming one "
                                       "(a.index, b.index); its members: a.index, b.index."),
    ({"x/model.index": b"", "y/model.index": b"", "y/checkpoint": b""},
     "found TF checkpoints in 2 folders (x/model.index, y/model.index); its members: x/model.index, "),
], ids=["none", "several prefixes", "several folders"])
def test_archive_without_exactly_one_checkpoint_says_what_it_found(members, found, tmp_path):
    archive = tmp_path / "a.tgz"
    archive.write_bytes(tarball(members))
    with pytest.raises(ArchiveError) as e:
        _unpack_checkpoint(archive, tmp_path / "u", "URL")
    assert str(e.value).startswith(f"URL: expected one TF checkpoint inside, {found}")
