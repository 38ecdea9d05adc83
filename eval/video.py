"""Video files and cameras for `-mode infer --video`: frames in with their times, an annotated copy out.

Decoding and encoding use PyAV (`av`, pinned in requirements.txt). Why PyAV rather than OpenCV: its wheels
ship their own FFmpeg (decoders for every common codec, libx264, v4l2 camera input) with no system
library to install; every failure is an exception with FFmpeg's reason (missing file, "Invalid data found
when processing input", "Decoder not found"), where OpenCV's `VideoCapture` only answers `isOpened() ==
False`; each frame carries its presentation time, so `time_s` is the stream's own, also for variable frame
rates; frames come out as RGB (OpenCV's are BGR); and it writes to a Python file object, so the output goes
through `data.atomic.atomic_open` like every other file the project writes.

* `open_video(spec)`: a file path, or a camera index (digits: `/dev/videoN` through v4l2 on Linux, device N
  of AVFoundation on macOS). Every failure is a `VideoError` (a ValueError) of one line, `--video SPEC: ...`.
* `VideoSource.frames()`: `Frame`s with uint8 RGB `[H, W, 3]` pixels and `time_s` from the first frame.
* `AnnotatedVideo`: an H.264 MP4 of the source's frame rate and size (4:2:0 when both sides are even, else
  4:4:4, which allows odd sides), written to a temp file and renamed into place only when complete.
* `StopOnSignal`: a camera runs until Ctrl-C (or SIGTERM): the first signal lets the loop finish its batch
  and close its files; a second one raises KeyboardInterrupt, and nothing is kept.
"""
from __future__ import annotations

import os
import signal
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from data.atomic import atomic_open


class VideoError(ValueError):
    """A video source that cannot be opened or decoded; the message is one line naming `--video SPEC`."""


@dataclass
class Frame:
    """One decoded frame: `index` from 0, `time_s` seconds after the first frame, `rgb` uint8 `[H, W, 3]`."""

    index: int
    time_s: float
    rgb: np.ndarray


def _reason(error: Exception) -> str:
    """FFmpeg's reason without PyAV's `[Errno N]` prefix."""
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def camera_input(index: int) -> tuple[str, str]:
    """`(device, FFmpeg input format)` of camera `index` on this system."""
    if sys.platform.startswith("linux"):
        return f"/dev/video{index}", "v4l2"
    if sys.platform == "darwin":
        return str(index), "avfoundation"
    raise VideoError(f"--video {index}: camera indices are read through v4l2 (Linux) or AVFoundation (macOS), "
                     f"not on {sys.platform}; give a video file")


class VideoSource:
    """An opened video file or camera (a context manager that closes it)."""

    def __init__(self, spec: str, container, is_camera: bool):
        self.spec, self.container, self.is_camera = spec, container, is_camera
        self.stream = container.streams.video[0]
        context = self.stream.codec_context
        self.width, self.height = context.width, context.height
        self.fps: Fraction | None = self.stream.average_rate or self.stream.guessed_rate or self.stream.base_rate
        if not self.fps:
            raise VideoError(f"--video {spec}: its frame rate is unknown")
        self.frame_count = self.stream.frames or None  # None: unknown (cameras, some containers)
        self.name = f"camera{spec}" if is_camera else Path(spec).stem

    def frames(self) -> Iterator[Frame]:
        """The frames in presentation order; a decoding error is a VideoError naming the frame."""
        index, first = 0, None
        try:
            for frame in self.container.decode(self.stream):
                time = frame.time if frame.time is not None else index / float(self.fps)
                first = time if first is None else first
                yield Frame(index, time - first, frame.to_ndarray(format="rgb24"))
                index += 1
        except av.error.FFmpegError as e:
            raise VideoError(f"--video {self.spec}: cannot decode frame {index} ({_reason(e)})") from None

    def __enter__(self) -> "VideoSource":
        return self

    def __exit__(self, *exc) -> None:
        self.container.close()


def open_video(spec: str) -> VideoSource:
    """Open `--video SPEC`: a camera index (digits) or a video file, with its first video stream."""
    is_camera = spec.isdigit()
    if is_camera:
        device, fmt = camera_input(int(spec))
        try:
            container = av.open(device, format=fmt)
        except (OSError, av.error.FFmpegError) as e:
            raise VideoError(f"--video {spec}: cannot open camera {spec} ({device}: {_reason(e)})") from None
    else:
        path = Path(spec)
        if not path.exists():
            raise VideoError(f"--video {spec}: no such file")
        if not path.is_file():
            raise VideoError(f"--video {spec}: not a file")
        try:
            container = av.open(str(path))
        except (OSError, av.error.FFmpegError) as e:
            raise VideoError(f"--video {spec}: cannot read it as a video ({_reason(e)})") from None
    try:
        if not container.streams.video:
            raise VideoError(f"--video {spec}: has no video stream")
        if container.streams.video[0].codec_context is None:
            raise VideoError(f"--video {spec}: its video codec is unknown (no decoder for it in PyAV's FFmpeg "
                             f"{av.ffmpeg_version_info}); convert it, e.g. to H.264")
        return VideoSource(spec, container, is_camera)
    except BaseException:
        container.close()
        raise


class AnnotatedVideo:
    """`with AnnotatedVideo(path, fps, width, height) as video: video.write(rgb)`: an H.264 MP4 at `fps`
    (constant frame rate), written atomically: an error or interrupt inside the block leaves no file."""

    def __init__(self, path: str | os.PathLike, fps: Fraction, width: int, height: int):
        self.path, self.fps, self.width, self.height = Path(path), fps, width, height
        self.frames = 0

    def __enter__(self) -> "AnnotatedVideo":
        with ExitStack() as stack:  # a failure before the block starts leaves no temp file either
            file = stack.enter_context(atomic_open(self.path))
            self.container = av.open(file, "w", format="mp4")
            stack.callback(self.container.close)  # runs first on exit: the muxer finishes before the rename
            self.stream = self.container.add_stream("libx264", rate=self.fps)
            self.stream.width, self.stream.height = self.width, self.height
            even = self.width % 2 == 0 and self.height % 2 == 0
            self.stream.pix_fmt = "yuv420p" if even else "yuv444p"  # libx264's 4:2:0 needs even sides
            self._stack = stack.pop_all()
        return self

    def write(self, rgb: np.ndarray) -> None:
        """Append one uint8 `[H, W, 3]` RGB frame of the video's size."""
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = self.frames
        self.container.mux(self.stream.encode(frame))
        self.frames += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.container.mux(self.stream.encode(None))  # flush the encoder's delayed frames
        except BaseException:  # a failed flush (disk full, encoder error) still closes and removes the file
            self._stack.__exit__(*sys.exc_info())
            raise
        self._stack.__exit__(exc_type, exc, tb)


class StopOnSignal:
    """`with StopOnSignal(active) as stop:` while `active`, the first SIGINT / SIGTERM only sets `stop.signum`
    (the caller finishes its batch and closes its files); the handlers are then restored, so a second
    signal acts as usual (Ctrl-C: KeyboardInterrupt). Inactive, or outside the main thread: no effect."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, active: bool):
        self.active, self.signum, self._previous = active, 0, {}

    def __enter__(self) -> "StopOnSignal":
        if self.active:
            try:
                self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
            except ValueError:  # not the main thread
                self._previous = {}
        return self

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        self._restore()
        os.write(2, f"\n{signal.Signals(signum).name}: finishing the current batch, then closing the video; "
                    f"send it again to abort (nothing kept)\n".encode())

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()
