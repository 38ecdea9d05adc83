"""`-mode infer --video`: per-frame detections equal to the frames run as images, the annotated video of the
source's size, rate and length, one-line errors that leave nothing behind, and a camera stopped by Ctrl-C.

The clip is made here: the fixture photo (451 x 300, odd width) shifted 8 px further right in each of 12
frames, written with FFV1 (lossless) in AVI (exact timestamps) through PyAV, the library `eval.video` reads
with, so the decoded frames are exactly the written ones. The camera is FFmpeg's `testsrc` generator (an
endless live source, as a camera is) in place of `/dev/videoN`. Network at 128 px for speed."""
from __future__ import annotations

import json
import re
import signal
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

import eval.video
import main
from test_predictor import save_ported

FPS = 25
COMMON = ["--threshold", "0", "--image-size", "128", "--device", "cpu"]


def write_clip(path: Path, frames: list[np.ndarray], fps: int = FPS, codec: str = "ffv1") -> Path:
    container = av.open(str(path), "w")
    stream = container.add_stream(codec, rate=Fraction(fps))
    stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "bgr0"
    for rgb in frames:
        container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
    container.mux(stream.encode(None))
    container.close()
    return path


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.fixture(scope="module")
def weights(ported, tmp_path_factory) -> Path:
    return save_ported(ported, tmp_path_factory.mktemp("video"))


@pytest.fixture(scope="module")
def clip(fixture_dir, tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    photo = np.asarray(Image.open(fixture_dir / "image.png").convert("RGB"))
    frames = [np.roll(photo, 8 * k, axis=1) for k in range(12)]
    path = write_clip(tmp_path_factory.mktemp("clip") / "clip.avi", frames)
    assert all(np.array_equal(a, b) for a, b in zip(decode(path), frames, strict=True))  # lossless
    return path, frames


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


def test_video_detections_equal_the_frames_as_images(weights, clip, tmp_path, capsys):
    """Batches of 4 over 12 frames, as `--images` over the frames saved as PNGs with the same batches:
    the same detections for each frame, in the same order; `frame` and `time_s` from the stream."""
    path, frames = clip
    video_out, images_out, images = tmp_path / "video", tmp_path / "images", tmp_path / "frames"
    images.mkdir()
    for k, rgb in enumerate(frames):
        Image.fromarray(rgb).save(images / f"frame_{k:02d}.png")
    assert main.main(["-mode", "infer", "--weights", str(weights), "--video", str(path), "--output", str(video_out),
                      "--batch-size", "4", *COMMON]) == 0
    assert f"wrote {video_out / 'clip.mp4'}: 12 frames, 451x300 at 25 fps" in capsys.readouterr().out
    assert main.main(["-mode", "infer", "--weights", str(weights), "--images", str(images), "--output",
                      str(images_out), "--batch-size", "4", *COMMON]) == 0
    from_video = json.loads((video_out / "detections.json").read_text())
    from_images = json.loads((images_out / "detections.json").read_text())
    assert len(from_video) == len(from_images) > 12 * 50
    for d in from_video:
        assert d["file_name"] == str(path) and d["image_id"] == d["frame"] and d["time_s"] == d["frame"] / FPS
    strip = ("file_name", "image_id", "frame", "time_s")
    assert [{k: v for k, v in d.items() if k not in strip} for d in from_video] == \
           [{k: v for k, v in d.items() if k not in strip} for d in from_images]
    assert [d["frame"] for d in from_video] == [int(Path(d["file_name"]).stem[-2:]) for d in from_images]
    assert sorted(p.name for p in video_out.iterdir()) == ["clip.mp4", "detections.json"]
    with av.open(str(video_out / "clip.mp4")) as annotated:
        stream = annotated.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height, stream.average_rate) == (451, 300, FPS)
        drawn = [frame.to_ndarray(format="rgb24") for frame in annotated.decode(stream)]
    assert len(drawn) == 12
    # H.264 is lossy (measured: mean |error| 7.5 of 255 on a frame full of labels, 41.7 from the plain frame):
    # the video's frame 7 is the PNG drawn from frame 7, far nearer to it than to the frame without boxes.
    png = np.asarray(Image.open(images_out / "frame_07.png"), dtype=np.float32)
    assert np.abs(drawn[7] - png).mean() < 0.25 * np.abs(drawn[7] - frames[7].astype(np.float32)).mean()


def _unknown_codec(folder: Path, clip: Path) -> Path:
    """The clip with its FFV1 fourcc replaced by one no decoder knows."""
    data = clip.read_bytes()
    assert data.count(b"FFV1") == 2  # the stream header's handler and the bitmap header's compression
    (folder / "unknown.avi").write_bytes(data.replace(b"FFV1", b"ZZZZ"))
    return folder / "unknown.avi"


@pytest.mark.parametrize("case, message", [
    ("missing", r"no such file"),
    ("unreadable", r"cannot read it as a video \(Invalid data found when processing input\)"),
    ("unknown codec", r"its video codec is unknown \(no decoder for it in PyAV's FFmpeg [\w.-]+\); "
                      r"convert it, e\.g\. to H\.264"),
    ("truncated", r"cannot decode frame 5 \(Invalid data found when processing input\)"),
    ("camera", r"cannot open camera 63 \(/dev/video63: No such file or directory\)"),
    ("overwrite", r"the annotated video would overwrite it; choose another --output"),
])
def test_bad_videos_are_one_line_errors_that_leave_nothing(weights, clip, tmp_path, capsys, case, message):
    """Exit 2 and one line `error: --video SPEC: ...`. A truncated file fails mid-way, after a batch of frames
    was encoded: the annotated video was a temp file, removed; no detections.json. An input that the output
    `OUTPUT/<name>.mp4` would replace (FFmpeg reads the AVI by its content, whatever its name) is kept."""
    path, _ = clip
    out = tmp_path / "out"
    spec = {"missing": str(tmp_path / "gone.mp4"), "unreadable": str(tmp_path / "text.mp4"),
            "unknown codec": str(tmp_path / "unknown.avi"), "truncated": str(tmp_path / "cut.avi"), "camera": "63",
            "overwrite": str(out / "clip.mp4")}
    (tmp_path / "text.mp4").write_text("not a video")
    _unknown_codec(tmp_path, path)
    (tmp_path / "cut.avi").write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    out.mkdir()
    if case == "overwrite":
        (out / "clip.mp4").write_bytes(path.read_bytes())
    if case == "camera" and Path("/dev/video63").exists():
        pytest.skip("this machine has a /dev/video63")
    assert main.main(["-mode", "infer", "--weights", str(weights), "--video", spec[case], "--output", str(out),
                      "--batch-size", "4", *COMMON]) == 2
    assert re.fullmatch(f"error: --video {re.escape(spec[case])}: {message}", _one_error_line(capsys))
    assert [p.name for p in out.iterdir()] == (["clip.mp4"] if case == "overwrite" else [])
    if case == "overwrite":
        assert (out / "clip.mp4").read_bytes() == path.read_bytes()


@pytest.fixture
def fake_camera(monkeypatch):
    """Camera N is FFmpeg's test pattern generator (96 x 64, 10 fps, endless)."""
    monkeypatch.setattr(eval.video, "camera_input", lambda index: ("testsrc=size=96x64:rate=10", "lavfi"))


def _signal_at(monkeypatch, indices: set[int]) -> None:
    """SIGINT to this process as each frame of `indices` is read, as a Ctrl-C then would send."""
    read = eval.video.VideoSource.frames

    def frames(self):
        for frame in read(self):
            if frame.index in indices:
                signal.raise_signal(signal.SIGINT)
            yield frame
    monkeypatch.setattr(eval.video.VideoSource, "frames", frames)


def test_camera_stops_at_ctrl_c_after_its_batch(weights, fake_camera, tmp_path, capfd, monkeypatch):
    """Ctrl-C while frame 5 is read (batch 4): frames 4-7 finish, then both files are closed (exit 0); the
    video holds exactly the 8 frames detections.json speaks of, and the usual Ctrl-C handler is back."""
    _signal_at(monkeypatch, {5})
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGINT)
    assert main.main(["-mode", "infer", "--weights", str(weights), "--video", "0", "--output", str(out),
                      "--batch-size", "4", *COMMON]) == 0
    captured = capfd.readouterr()  # the signal handler writes to file descriptor 2 directly
    assert "SIGINT: finishing the current batch, then closing the video" in captured.err
    assert f"wrote {out / 'camera0.mp4'}: 8 frames, 96x64 at 10 fps (stopped by SIGINT)" in captured.out
    assert signal.getsignal(signal.SIGINT) is before
    detections = json.loads((out / "detections.json").read_text())
    assert sorted({d["frame"] for d in detections}) == list(range(8))
    assert {d["file_name"] for d in detections} == {"0"}
    assert all(abs(d["time_s"] - d["frame"] / 10) < 1e-6 for d in detections)
    assert len(decode(out / "camera0.mp4")) == 8


def test_a_second_ctrl_c_aborts_and_keeps_nothing(weights, fake_camera, tmp_path, capsys, monkeypatch):
    _signal_at(monkeypatch, {5, 6})
    out = tmp_path / "out"
    assert main.main(["-mode", "infer", "--weights", str(weights), "--video", "0", "--output", str(out),
                      "--batch-size", "4", *COMMON]) == 128 + signal.SIGINT
    assert capsys.readouterr().err.endswith("interrupted\n")
    assert list(out.iterdir()) == []  # the annotated video was a temp file; no detections.json


def test_a_failed_encoder_flush_leaves_no_file(tmp_path):
    """The flush at the end of the block (delayed H.264 frames) can fail too (disk full, encoder error): the
    container is still closed and the temporary file removed, so nothing half-written is left."""
    class FailingFlush:
        def __init__(self, stream):
            self.stream = stream

        def encode(self, frame):
            if frame is None:
                raise OSError("no space left on device")
            return self.stream.encode(frame)

    with pytest.raises(OSError, match="no space left"):
        with eval.video.AnnotatedVideo(tmp_path / "out.mp4", Fraction(10), 32, 32) as video:
            video.write(np.zeros((32, 32, 3), np.uint8))
            video.stream = FailingFlush(video.stream)
    assert list(tmp_path.iterdir()) == []
