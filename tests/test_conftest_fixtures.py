"""`require_fixture` (tests/conftest.py): a missing reference fixture skips its test, naming the file, for a
newcomer without ../shared; under EFFICIENTDET_REQUIRE_FIXTURES=1 (CI) it fails it, so that a run which lost
the fixtures cannot pass with every parity test skipped."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REQUIRE_FIXTURES, ROOT, require_fixture

_TEST = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from pathlib import Path
from conftest import require_fixture

def test_parity():
    require_fixture(Path(__file__).parent / "absent", "model.index")
"""


@pytest.mark.parametrize("value", [None, "", "0"])
def test_a_missing_fixture_skips_with_its_name(tmp_path, monkeypatch, value):
    if value is None:
        monkeypatch.delenv(REQUIRE_FIXTURES, raising=False)
    else:
        monkeypatch.setenv(REQUIRE_FIXTURES, value)
    with pytest.raises(pytest.skip.Exception, match="official reference fixture not found: .*model.index"):
        require_fixture(tmp_path / "absent", "model.index")


def test_a_missing_fixture_fails_when_required(tmp_path, monkeypatch):
    monkeypatch.setenv(REQUIRE_FIXTURES, "1")
    with pytest.raises(BaseException) as stop:  # a skip must not escape: it would only skip this test
        require_fixture(tmp_path / "absent", "reference_outputs.npz")
    assert stop.type is pytest.fail.Exception
    assert str(stop.value).startswith(f"official reference fixture not found: {tmp_path / 'absent'}/")
    (tmp_path / "absent").mkdir()
    (tmp_path / "absent" / "reference_outputs.npz").touch()
    assert require_fixture(tmp_path / "absent", "reference_outputs.npz") == tmp_path / "absent"  # present: runs


@pytest.mark.parametrize("required, exit_code, outcome", [(None, 0, "1 skipped"), ("1", 1, "1 failed")])
def test_a_pytest_run_without_fixtures_exits_as_ci_needs(tmp_path, required, exit_code, outcome):
    """The whole chain, as .ci/run meets it: the exit status of a pytest run whose only test lacks its fixture."""
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -rs\n")
    (tmp_path / "test_parity.py").write_text(_TEST)
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_FIXTURES}
    if required:
        env[REQUIRE_FIXTURES] = required
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_parity.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == exit_code, done.stdout[-3000:]
    missing = tmp_path / "absent" / "model.index"
    assert outcome in done.stdout and f"official reference fixture not found: {missing}" in done.stdout
