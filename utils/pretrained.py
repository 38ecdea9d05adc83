"""Find, port or download the official COCO weights for `--pretrained`.

Order: `weights/<model>.pth` if present; else an official TF checkpoint folder `weights/<model>/` is ported
(and the `.pth` cached); else, with `download=True`, the official tarball is fetched, checked, unpacked
and ported; else a clear error says how to get it.
"""
from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from tqdm import tqdm

from utils.port_tf import port_tf_checkpoint

OFFICIAL_URL = "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco/{model}.tar.gz"
# The Lite checkpoints are .tgz (official README's table; its lite3x link has a stray '..gz').
OFFICIAL_LITE_URL = "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco/{model}.tgz"


def official_url(model_name: str) -> str:
    """URL of the official COCO checkpoint archive of `model_name`."""
    lite = "-lite" in model_name
    return (OFFICIAL_LITE_URL if lite else OFFICIAL_URL).format(model=model_name)


def _has_tf_checkpoint(folder: Path) -> bool:
    return (folder / "checkpoint").is_file() or any(folder.glob("*.index"))


def port_folder(model_name: str, folder: Path, output: Path, source: str | None = None) -> Path:
    """Port the TF checkpoint in `folder` (EMA weights) to `output` and return it."""
    port_tf_checkpoint(folder, model_name).save(output, source=source or str(folder))
    print(f"ported {source or folder} -> {output}")
    return output


def download(url: str, dest: Path) -> str:
    """Stream `url` to `dest` with a progress bar; return the SHA-256 of what was downloaded."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {Path(url).name}") as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()


def _safe_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's "data" extraction filter (refuses '..' and links leading out of `dest`, device files and
    fifos, absolute link targets), plus a refusal of absolute member names, which "data" would strip."""
    if member.name.startswith(("/", "\\")) or Path(member.name).is_absolute():
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


def _unpack_checkpoint(archive: Path, into: Path) -> Path:
    """Extract `archive` under `into` and return the folder that holds the TF checkpoint. Every member is
    checked before anything is written: an archive from the network cannot place files outside `into`."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                _safe_member(member, str(into))
            tar.extractall(into, members=members, filter=_safe_member)
    except tarfile.FilterError as e:
        raise ValueError(f"{archive}: refused to unpack an unsafe member: {e}") from e
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{archive}: not a readable .tar.gz checkpoint archive ({e})") from e
    folders = [p.parent for p in into.rglob("*.index")]
    if len(folders) != 1:
        raise ValueError(f"{archive}: expected one TF checkpoint (*.index) inside, found {len(folders)}")
    return folders[0]


def resolve_pretrained(model_name: str, weights_dir: str | Path = "weights", download_missing: bool = False,
                       url: str | None = None) -> Path:
    """Path of the `.pth` of `model_name`'s official COCO weights, porting/downloading as needed."""
    weights_dir = Path(weights_dir)
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
    weights_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=weights_dir, prefix=".download-") as tmp:
        archive = Path(tmp) / Path(url).name
        sha256 = download(url, archive)
        print(f"downloaded {url}\n  sha256 {sha256}")
        unpacked = _unpack_checkpoint(archive, Path(tmp) / "unpacked")
        port_folder(model_name, unpacked, pth, source=url)  # port first: a bad archive leaves no folder behind
        if not folder.exists():
            shutil.move(str(unpacked), folder)
    return pth
