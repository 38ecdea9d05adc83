"""README.md as a newcomer reads it: short, every link lands, every quick command runs as written.

* Every relative link in README.md, docs/*.md and benchmarks/README.md points to an existing file, and a
  `#fragment` into a markdown file to one of its headings (GitHub's anchor rule).
* Every shell command of README.md's ```bash blocks is accounted for: the set-up commands are the ones
  `.ci/run` runs; the quick ones (`QUICK`, each well under a minute) run here exactly as written, from the
  repository root, and must exit 0 and print what they promise; the others (`NOT_RUN`) say why not (minutes of
  training, a download, COCO, weights a newcomer does not have yet), and their flags must still parse. A command added to the README fails
  `test_every_readme_command_is_accounted_for` until it is put in one of the three.
* The quick commands must not write into the repository.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, SHARED_FIXTURES, require_fixture

README = ROOT / "README.md"
MARKDOWN = [README, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

SETUP = ["pip install -r requirements.txt", "python -m pytest -q tests"]

# command -> what its output must contain (all of it); run from the repository root as written
QUICK = {
    "python main.py -mode trainval --help": ["usage:", "--epochs", "--assigner"],
    "python main.py -mode summary -model all": ["efficientdet-d0", "3,880,067", "efficientdet-d7x",
                                                "77,147,166", "efficientdet-lite4"],
    "python -m parity.tf_parity ../shared/fixtures/tf_reference_d0 --json": ['"ok": true'],
}
NEEDS_FIXTURE = {"python -m parity.tf_parity ../shared/fixtures/tf_reference_d0 --json":
                 (SHARED_FIXTURES / "tf_reference_d0", "model.index", "reference_outputs.npz")}

_TRAINING = "trains for minutes to days (~9 min for the quick start on 2 cores)"
_WEIGHTS = "needs weights a fresh clone does not have (the official checkpoint or a trained run)"
NOT_RUN = {
    "python main.py -mode trainval -model efficientdet-d0 --data shapes --image-size 256 --batch-size 8 "
    "--epochs 2 --lr 0.08 --jitter 0.5 1.5 --val-nms hard --val-max-images 100 --output runs/shapes": _TRAINING,
    "python main.py -mode eval --weights runs/shapes/best.pth --data shapes": "needs the quick start's trained run",
    "python main.py -mode infer --weights runs/shapes/best.pth --images data/shapes/val2017 --output out/":
        "needs the quick start's trained run",
    "python main.py -mode eval -model efficientdet-d0 --pretrained --download --data data/coco":
        "downloads the official checkpoint and needs COCO val2017",
    "python main.py -mode infer -model efficientdet-d0 --pretrained --images photo.jpg more_photos/ --output out/":
        _WEIGHTS + " and the user's photos",
    "python main.py -mode trainval -model efficientdet-d0 --data data/coco --batch-size 8": _TRAINING + ", needs COCO",
    "python main.py -mode trainval -model efficientdet-d0 --train-ann my/train.json --train-images my/train/ "
    "--val-ann my/val.json --val-images my/val/ --pretrained --epochs 50": _TRAINING + ", needs the user's data",
    "torchrun --nproc_per_node 4 main.py -mode trainval -model efficientdet-d2 --data data/coco --sync-bn --amp":
        _TRAINING + ", needs COCO and 4 processes",
    "python main.py -mode export -model efficientdet-d0 --pretrained --format onnx --output export/d0": _WEIGHTS,
    "python main.py -mode infer --weights runs/shapes/best.pth --images photo.jpg --backend onnxruntime": _WEIGHTS,
    "python main.py -mode export --weights runs/shapes/best.pth --format openvino --precision int8 "
    "--calibration-images data/shapes/train2017 --output export/shapes-int8": "needs the quick start's trained run",
    "wget https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco2/efficientdet-d0.tar.gz":
        "downloads the official checkpoint",
    "tar -xzf efficientdet-d0.tar.gz -C weights/": "needs the downloaded checkpoint",
    "python -m utils.port_tf --model efficientdet-d0 --checkpoint weights/efficientdet-d0 "
    "--output weights/efficientdet-d0.pth": "needs the downloaded checkpoint",
}


def _strip_comment(line: str) -> str:
    """`cmd   # comment` -> `cmd` (the README's comments follow two or more spaces)."""
    return re.split(r"\s{2,}#", line, maxsplit=1)[0].rstrip()


def readme_commands() -> list[str]:
    """The commands of README.md's ```bash blocks, continuation lines joined, as the shell reads them."""
    commands, block, pending = [], False, ""
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            block = line.strip() == "```bash" and not block
            continue
        if not block or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].strip() + " "
            continue
        command = " ".join((pending + _strip_comment(line).strip()).split())
        pending = ""
        commands.append(command)
    return commands


def test_readme_is_a_five_minute_read():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"


def test_every_readme_command_is_accounted_for():
    commands = readme_commands()
    assert commands, "no ```bash block found in README.md"
    unknown = [c for c in commands if c not in SETUP and c not in QUICK and c not in NOT_RUN]
    assert not unknown, ("README commands neither run by this test (QUICK) nor excused (NOT_RUN): "
                         + "; ".join(unknown))
    stale = [c for c in [*QUICK, *NOT_RUN] if c not in commands]
    assert not stale, "listed here but no longer in README.md: " + "; ".join(stale)


def test_setup_commands_are_the_ones_ci_runs():
    commands = readme_commands()
    assert commands[:len(SETUP)] == SETUP, "README.md's first commands must be the two set-up commands"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    positions = [ci.index(c) for c in SETUP if c in ci]
    assert len(positions) == len(SETUP) and positions == sorted(positions), \
        f".ci/run must run {SETUP} as written, in this order"


def _outputs() -> dict[str, float]:
    """The files where the repository's commands write by default (run folders, exports, weights, the generated
    dataset), with their mtimes, and the names at the top of the repository."""
    found = {str(p): 0.0 for p in ROOT.iterdir()}
    folders = [ROOT / name for name in ("runs", "out", "export", "weights")] + sorted(ROOT.glob("data/shapes*"))
    for base in folders:
        if base.is_dir():
            found.update({str(p): p.stat().st_mtime for p in base.rglob("*") if p.is_file()})
    return found


@pytest.mark.parametrize("command", list(QUICK))
def test_quick_readme_command_runs_as_written(command):
    if command in NEEDS_FIXTURE:
        folder, *files = NEEDS_FIXTURE[command]
        require_fixture(folder, *files)
    before = _outputs()
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120, executable="/bin/bash")
    assert result.returncode == 0, f"{command!r} exited {result.returncode}:\n{result.stderr[-2000:]}"
    for expected in QUICK[command]:
        assert expected in result.stdout, f"{command!r} did not print {expected!r}:\n{result.stdout[-2000:]}"
    if command.endswith("--json"):
        report = json.loads(result.stdout)
        assert report["ok"] is True and report["model"] == "efficientdet-d0" and report["checks"]
    after = _outputs()
    written = sorted(p for p in after if p not in before or after[p] != before[p])
    assert not written, f"{command!r} wrote into the repository: {written[:5]}"


class _Parsed(Exception):
    """Raised instead of running a command once its flags have parsed."""


@pytest.mark.parametrize("command", [c for c in NOT_RUN if "main.py" in c or "utils.port_tf" in c])
def test_readme_commands_not_run_still_parse(command, monkeypatch):
    """The commands too slow to run here (or needing data) still name real flags with valid values."""
    words = shlex.split(command)
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse_args(self, args, namespace)  # argparse exits (SystemExit 2) on an unknown flag or a bad value
        raise _Parsed

    if "main.py" in words:
        import main
        main.parse_args(words[words.index("main.py") + 1:])
    else:
        from utils import port_tf
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        with pytest.raises(_Parsed):
            port_tf.main(words[words.index("utils.port_tf") + 1:])


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)  # code blocks hold no links
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(path):
    assert path.is_file(), f"{path} is missing"
    broken = []
    for target in _links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... (not checked: no network)
            continue
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target} (no file {dest})")
        elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
            broken.append(f"{target} (no heading #{fragment} in {dest.name})")
    assert not broken, f"broken links in {path.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_links_every_docs_file():
    linked = {Path(t.partition("#")[0]).name for t in _links(README) if t.startswith("docs/")}
    docs = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert docs <= linked, f"docs files the README does not link: {sorted(docs - linked)}"


@pytest.mark.parametrize("path", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_docs_file_opens_with_a_title_and_an_intro(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# "), f"{path.name} must start with a title"
    assert lines[1] == "" and lines[2] and not lines[2].startswith(("#", "|", "```", "*")), \
        f"{path.name}: the title must be followed by a paragraph saying what the file holds"


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_benchmark_names_the_docs_file_of_its_table(path):
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    named = re.findall(r"docs/[\w.-]+\.md", docstring)
    assert named, f"{path.name}: its docstring must name the docs file its table lives in"
    for name in named:
        assert (ROOT / name).is_file(), f"{path.name} names {name}, which does not exist"
