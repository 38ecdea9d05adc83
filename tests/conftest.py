"""Shared test fixtures: the official TF reference fixture (../shared) and a parity report.

Without ../shared the parity tests skip, naming the missing file: a clone alone still runs the rest. With
EFFICIENTDET_REQUIRE_FIXTURES=1 (set by .ci/run) a missing fixture fails its test instead, so a CI run that
lost the fixtures cannot pass by skipping every parity test.

Every parity test records the max |delta| of each tensor it compares; the table is printed at the end of
the run (so CI logs show how close the port is, not just that it passed).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"  # outputs of the official code (read-only, may be absent)
FIXTURE = SHARED_FIXTURES / "tf_reference_d0"
REQUIRE_FIXTURES = "EFFICIENTDET_REQUIRE_FIXTURES"  # "1": a missing reference fixture is a failure, not a skip
_DELTAS: dict[str, tuple[float, float]] = {}


def record_delta(name: str, ours, reference, tolerance: float) -> float:
    """Max |ours - reference| (numpy or torch), remembered for the end-of-run report."""
    ours = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    delta = float(np.abs(ours.astype(np.float64) - np.asarray(reference, dtype=np.float64)).max())
    _DELTAS[name] = (delta, tolerance)
    return delta


def pytest_terminal_summary(terminalreporter):
    if not _DELTAS:
        return
    terminalreporter.section("parity with the official TF implementation (max |delta|)")
    for name, (delta, tol) in _DELTAS.items():
        terminalreporter.write_line(f"{name:<40s} {delta:.3e}   (tolerance {tol:.0e})")
    worst = max(_DELTAS.items(), key=lambda kv: kv[1][0] / kv[1][1])
    terminalreporter.write_line(f"worst relative to its tolerance: {worst[0]} {worst[1][0]:.3e}")


def require_fixture(folder: Path, *files: str) -> Path:
    """`folder` when it holds each of `files`; otherwise the calling test stops, naming what is missing
    (see `missing_fixture`)."""
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        missing_fixture(f"official reference fixture not found: {folder / missing[0]} "
                        "(the shared/ folder beside the repo)")
    return folder


def missing_fixture(message: str) -> None:
    """Skip the calling test with `message`, or fail it under EFFICIENTDET_REQUIRE_FIXTURES=1: the one place
    that decides what an absent reference fixture means."""
    if os.environ.get(REQUIRE_FIXTURES, "") not in ("", "0"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny inputs (`pytestmark = pytest.mark.usefixtures("one_thread")`): they
    gain nothing from a second thread, and on a busy 2-core machine a 2-thread pool waits for a preempted
    thread at every op (training steps measured 10x slower); results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return require_fixture(FIXTURE, "model.index")


@pytest.fixture(scope="session")
def reference(fixture_dir):
    return dict(np.load(fixture_dir / "reference_outputs.npz"))


@pytest.fixture(scope="session")
def input_nchw(reference) -> torch.Tensor:
    return torch.from_numpy(reference["input_tensor"]).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="session")
def ported(fixture_dir):
    """D0 with the fixture checkpoint's EMA weights, ported by `utils.port_tf` (eval mode)."""
    from model import build_model
    from utils.port_tf import load_tf_state_dict
    model = build_model("efficientdet-d0")
    model.load_state_dict(load_tf_state_dict(fixture_dir, "efficientdet-d0"))
    return model.eval()


def nhwc(t: torch.Tensor) -> np.ndarray:
    """Our `[N, C, H, W]` -> the fixture's `[N, H, W, C]`."""
    return t.detach().permute(0, 2, 3, 1).numpy()
