"""File writes that fail clearly: atomic replacement, the user's umask, and the failing file named.

`atomic_open` writes to a temp file beside the target, then renames it over the target: readers never see a
half-written file, and an interrupted or failed write leaves the previous file intact. The result gets the
permissions a plain `open(path, "w")` would give (the existing file's mode, else 0666 minus the umask), not
the 0600 of a temp file. Any OSError while writing (disk full, quota, read-only folder, ...) becomes an
OSError that says which file could not be written and why, also when the writer (e.g. `torch.save`) hides
the original error behind its own.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


class WriteError(OSError):
    """`could not write PATH: <reason>`; `errno` is the original error's."""

    def __init__(self, path, cause: OSError):
        reason = (cause.strerror or str(cause)).lower() if isinstance(cause, OSError) else str(cause)
        super().__init__(f"could not write {path}: {reason}")
        self.errno = getattr(cause, "errno", None)


class _RecordingFile:
    """A file object that remembers the first OSError of its writes: some writers (torch.save's zip writer)
    replace it with a message of their own, without the reason."""

    def __init__(self, file):
        self._file, self.error = file, None

    def write(self, data):
        try:
            return self._file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self._file, name)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb"):
    """`with atomic_open(path, "w") as f: ...` writes `path` only if the block completes."""
    path = Path(path)
    tmp, recording = None, None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode) as f:
            recording = _RecordingFile(f)
            yield recording
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = recording.error if recording is not None and recording.error else e
        if isinstance(cause, OSError) and not isinstance(cause, WriteError):
            raise WriteError(path, cause) from e
        raise


def write_json(obj, path: str | os.PathLike, **kwargs) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, **kwargs)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append `line` and a newline to `path` (for logs), naming the file if that fails."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise WriteError(path, e) from e


def refuse_unwritable_output(path: str | os.PathLike, flag: str = "--output") -> None:
    """The error `check_writable_dir` would raise for folder `path`, found without creating anything: its
    nearest existing ancestor must be a folder this process may write in. A run checks its output before
    any work, but creates it only once its inputs are good: one that fails on them leaves no folder behind."""
    path = Path(path)
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    reason = None
    if not existing.is_dir():
        reason = "exists and is not a folder" if existing == path else os.strerror(errno.ENOTDIR)
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = os.strerror(errno.EROFS if os.statvfs(existing).f_flag & os.ST_RDONLY else errno.EACCES)
    if reason:
        raise OSError(f"{flag} {path}: cannot write there ({reason.lower()})")


def check_writable_dir(path: str | os.PathLike, flag: str = "--output") -> Path:
    """Create folder `path` if needed and check that files can be written in it; a clear OSError otherwise.

    Run it before any long work, so that a run does not fail at its first save.
    """
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise OSError(f"{flag} {path}: cannot write there ({(e.strerror or str(e)).lower()})") from e
    return path
