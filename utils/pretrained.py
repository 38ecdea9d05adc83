"""Find, port or download the official COCO weights for `--pretrained`.

Order: `<weights>/<model>.pth` if present; else an official TF checkpoint folder `<weights>/<model>/` is
ported (and the `.pth` cached); else, with `download=True`, the official archive is fetched, checked,
unpacked and ported; else a clear error says how to get it.

Settings (environment variables, read at each call):

* `EFFICIENTDET_WEIGHTS_DIR=DIR`: the weights folder `<weights>` (default: `weights/` of this repository).
* `EFFICIENTDET_CHECKPOINT_MIRROR=BASE`: fetch the archives from BASE instead of the official bucket
  `https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet`, with the same layout below it:
  `BASE/coco2/efficientdet-d0.tar.gz` (D0-D7x), `BASE/coco/efficientdet-lite0.tgz` (Lite). BASE is an
  http://, https:// or file:// URL; a trailing slash is ignored.

The archives (official README, "Pretrained EfficientDet Checkpoints") are the ones whose COCO AP the
official tables quote. A download shows a progress bar and prints the archive's SHA-256; it must arrive whole
(its Content-Length), be a gzip tarball with no member that would land outside the unpack folder (absolute
name, '..', link out), and hold exactly one TF checkpoint, which must port to the model. Every failure is one
error naming the URL and what to do, and leaves the weights folder as it was: the download and the unpacking
happen in a temporary folder inside it, and the `.pth` is written (atomically) only once the port succeeded.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

from tqdm import tqdm

from data.atomic import WriteError, check_writable_dir
from utils.port_tf import port_tf_checkpoint

WEIGHTS_DIR_ENV = "EFFICIENTDET_WEIGHTS_DIR"
MIRROR_ENV = "EFFICIENTDET_CHECKPOINT_MIRROR"
OFFICIAL_BASE = "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet"
# coco2/ holds the D0-D7x checkpoints of the official table, those whose AP it quotes (coco/ has older ones).
OFFICIAL_URL = OFFICIAL_BASE + "/coco2/{model}.tar.gz"
# The Lite checkpoints are .tgz (official README's table; its lite3x link has a stray '..gz').
OFFICIAL_LITE_URL = OFFICIAL_BASE + "/coco/{model}.tgz"
# Seconds to connect, and to wait for each read. A refused connection fails at once whatever this is; it
# bounds how long an unreachable (silently dropping) host or a stalled transfer can hang a run.
TIMEOUT_S = 20
_CHUNK = 1 << 20


class DownloadError(OSError):
    """The archive could not be fetched whole (HTTP error, no connection, interrupted transfer)."""


class ArchiveError(ValueError):
    """The fetched archive is not a usable official checkpoint archive; nothing was kept."""


def default_weights_dir() -> Path:
    """`$EFFICIENTDET_WEIGHTS_DIR`, else the repository's `weights/` (independent of the working directory)."""
    return Path(os.environ.get(WEIGHTS_DIR_ENV) or Path(__file__).resolve().parents[1] / "weights")


def checkpoint_base() -> str:
    """`$EFFICIENTDET_CHECKPOINT_MIRROR` without trailing slashes, else the official bucket."""
    base = os.environ.get(MIRROR_ENV, "").strip()
    if not base:
        return OFFICIAL_BASE
    if urllib.parse.urlsplit(base).scheme.lower() not in ("http", "https", "file"):
        raise ValueError(f"{MIRROR_ENV}={base}: expected an http://, https:// or file:// URL of a folder laid out "
                         f"like {OFFICIAL_BASE} (coco2/, coco/), or unset it to use that one")
    return base.rstrip("/")


def official_url(model_name: str) -> str:
    """URL of the official COCO checkpoint archive of `model_name` (on the mirror if one is set)."""
    template = OFFICIAL_LITE_URL if "-lite" in model_name else OFFICIAL_URL
    return template.format(model=model_name).replace(OFFICIAL_BASE, checkpoint_base(), 1)


def _has_tf_checkpoint(folder: Path) -> bool:
    return (folder / "checkpoint").is_file() or any(folder.glob("*.index"))


def port_folder(model_name: str, folder: Path, output: Path, source: str | None = None) -> Path:
    """Port the TF checkpoint in `folder` (EMA weights) to `output` and return it."""
    port_tf_checkpoint(folder, model_name).save(output, source=source or str(folder))
    print(f"ported {source or folder} -> {output}")
    return output


def _fetch_hint(url: str, server_answered: bool) -> str:
    """What to do when `url` cannot be fetched: the mirror setting is the likely culprit when one is set; else
    the network, or (the server answered with an error) an official file that has moved."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if mirror:
        return f"check that the mirror {MIRROR_ENV}={mirror} serves it, or unset {MIRROR_ENV}"
    what = url.removeprefix(OFFICIAL_BASE + "/")
    if server_answered:
        return (f"see the official README's checkpoint table for its current address, or set {MIRROR_ENV} to a "
                f"mirror that serves {what}")
    return f"check the network and run again, or set {MIRROR_ENV} to a mirror that serves {what}"


def _open(url: str):
    """The response of `url`, or a DownloadError saying why not (HTTP status, refused, unknown host, ...)."""
    try:
        return urllib.request.urlopen(url, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        e.close()
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}; {_fetch_hint(url, True)}") from None
    except urllib.error.URLError as e:
        raise DownloadError(f"{url}: cannot fetch ({e.reason}); {_fetch_hint(url, False)}") from None
    # A timeout or reset before the response, a malformed status line, a malformed mirror URL.
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise DownloadError(f"{url}: cannot fetch ({e!r}); {_fetch_hint(url, False)}") from None


def download(url: str, dest: Path) -> str:
    """Stream `url` to `dest` with a progress bar; return the SHA-256 of what was downloaded.

    urllib does not notice a connection closed before the announced Content-Length (a read just returns
    less), so the byte count is checked against it: a cut-off transfer is an error, not a short archive.
    """
    digest, received = hashlib.sha256(), 0
    with _open(url) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {Path(url).name}") as bar, \
                open(dest, "wb") as f:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as e:  # reset, timeout, bad chunked encoding
                    raise DownloadError(f"{url}: download interrupted after {received} bytes ({e}); "
                                        f"run again") from None
                if not chunk:
                    break
                try:
                    f.write(chunk)
                except OSError as e:  # disk full: say where
                    raise WriteError(dest.parent, e) from None
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise DownloadError(f"{url}: download interrupted: received {received} of {total} bytes; run again")
    return digest.hexdigest()


def _safe_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's "data" extraction filter (refuses '..' and links leading out of `dest`, device files and
    fifos, absolute link targets), plus a refusal of absolute member names, which "data" would strip."""
    if member.name.startswith(("/", "\\")) or Path(member.name).is_absolute():
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


def _check_gzip(archive: Path, source: str) -> None:
    """Decompress `archive` once to the end: a non-gzip file (an HTML error page, ...) or a truncated or
    corrupt stream is an ArchiveError before anything is unpacked (tarfile stops at the end-of-archive
    marker, before the gzip trailer and its CRC)."""
    with open(archive, "rb") as f:
        head = f.read(16)
    if not head.startswith(b"\x1f\x8b"):
        raise ArchiveError(f"{source}: not a gzip archive (it starts with {head!r}); the server sent something "
                           f"else than the checkpoint archive: check the URL and {MIRROR_ENV}")
    try:
        with gzip.open(archive) as stream:
            while stream.read(_CHUNK):
                pass
    except (OSError, EOFError, zlib.error) as e:
        raise ArchiveError(f"{source}: truncated or corrupt gzip archive ({e}); run again to download it "
                           f"anew") from None


def _summary(names: list[str], limit: int = 5) -> str:
    more = f", ... ({len(names)} members)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "an empty archive"


def _extract(archive: Path, into: Path, source: str) -> list[str]:
    """Extract the tarball `archive` under `into`, every member checked before anything is written (an
    archive from the network cannot place files outside `into`); returns the member names."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _safe_member(member, str(into))
            tar.extractall(into, members=members, filter=_safe_member)
    except tarfile.FilterError as e:
        raise ArchiveError(f"{source}: refused to unpack an unsafe member: {e}; this is not an official "
                           f"checkpoint archive: check the URL and {MIRROR_ENV}") from None
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ArchiveError(f"{source}: not a readable tar archive ({e}); run again to download it "
                           f"anew") from None
    return [m.name for m in members]


def _checkpoint_folder(root: Path, names: list[str], source: str) -> Path:
    """The one folder under `root` holding the TF checkpoint, as the official loader finds one: a folder
    with a `checkpoint` state file (`tf.train.latest_checkpoint`), or a bare prefix (one `*.index` with its
    data files) at the archive root or in a folder. Several checkpoints, or none, is an ArchiveError."""
    indexes = sorted(root.rglob("*.index"))
    folders = sorted({p.parent for p in indexes})
    if len(folders) == 1 and ((folders[0] / "checkpoint").is_file() or len(indexes) == 1):
        return folders[0]
    if not indexes:
        found = "no TF checkpoint (*.index file)"
    elif len(folders) == 1:
        found = f"{len(indexes)} checkpoints in one folder and no 'checkpoint' file naming one"
    else:
        found = f"TF checkpoints in {len(folders)} folders"
    listed = ", ".join(str(p.relative_to(root)) for p in indexes[:5])
    raise ArchiveError(f"{source}: expected one TF checkpoint inside, found {found}"
                       + (f" ({listed})" if listed else "")
                       + f"; its members: {_summary(names)}. Check the URL and {MIRROR_ENV}")


def _unpack_checkpoint(archive: Path, into: Path, source: str | None = None) -> Path:
    """Check and extract `archive` under `into`; return the folder that holds the TF checkpoint.
    Errors name `source` (the URL), since `archive` is a temporary file."""
    source = source or str(archive)
    _check_gzip(archive, source)
    names = _extract(archive, into, source)
    return _checkpoint_folder(into, names, source)


def _fetch_and_port(model_name: str, url: str, weights_dir: Path, pth: Path, folder: Path) -> None:
    """Download, check, unpack and port `url` to `pth`, keeping the checkpoint as `folder`. All the work
    happens in a temporary folder inside `weights_dir` (same file system: the final moves are renames), which
    is removed whatever happens: a failure leaves nothing a later run would take for weights."""
    check_writable_dir(weights_dir, "weights folder")  # before a long download, not after it
    with tempfile.TemporaryDirectory(dir=weights_dir, prefix=".download-") as tmp:
        archive = Path(tmp) / Path(urllib.parse.urlsplit(url).path).name
        sha256 = download(url, archive)
        print(f"downloaded {url}\n  sha256 {sha256}")
        unpacked = _unpack_checkpoint(archive, Path(tmp) / "unpacked", url)
        archive.unlink()  # the archive is no longer needed: free its space before the port writes the .pth
        try:
            port_folder(model_name, unpacked, pth, source=url)  # port first: a bad archive leaves no folder
        except ValueError as e:
            raise ArchiveError(f"{url}: its checkpoint does not port to {model_name}; check the URL and "
                               f"{MIRROR_ENV} ({e})") from None
        if not folder.exists():
            shutil.move(str(unpacked), folder)


def resolve_pretrained(model_name: str, weights_dir: str | Path | None = None, download_missing: bool = False,
                       url: str | None = None) -> Path:
    """Path of the `.pth` of `model_name`'s official COCO weights, porting/downloading as needed.
    `weights_dir` defaults to `default_weights_dir()`, `url` to `official_url(model_name)`."""
    weights_dir = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    pth = weights_dir / f"{model_name}.pth"
    if pth.is_file():
        return pth
    folder = weights_dir / model_name
    if folder.is_dir() and _has_tf_checkpoint(folder):
        return port_folder(model_name, folder, pth)
    url = url or official_url(model_name)
    if not download_missing:
        raise FileNotFoundError(
            f"{pth}: pretrained weights not found. Get the official checkpoint and port it:\n"
            f"  wget {url}\n"
            f"  tar -xzf {Path(url).name} -C {weights_dir}/ && python -m utils.port_tf --model {model_name} "
            f"--checkpoint {folder} --output {pth}\n"
            f"or run again with --download to do this automatically.")
    _fetch_and_port(model_name, url, weights_dir, pth, folder)
    return pth
