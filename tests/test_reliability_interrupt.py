"""SIGINT / SIGTERM during training: the step finishes, last.pth is saved, one line, exit 130 / 143, and
--resume then logs the same losses as an uninterrupted run; a second SIGINT aborts at once. Also the
progress bar of a run that does not end on an epoch boundary."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import main
from conftest import ROOT
from data.shapes import make_shapes_dataset
from model_helpers import free_port
from train.trainer import Trainer
from utils.weights import load_weights

FLAGS = ["--image-size", "128", "--batch-size", "2", "--epochs", "2", "--log-every", "1", "--save-every", "100",
         "--device", "cpu"]  # the runs compared must run on the same device, whatever the host has


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", num_train=8, num_val=4, workers=1)


@pytest.fixture(scope="module")
def uninterrupted(shapes, tmp_path_factory):
    output = tmp_path_factory.mktemp("full") / "run"
    Trainer(main.parse_args(["-mode", "train", "--data", str(shapes), *FLAGS, "--workers", "0",
                             "--output", str(output)])).fit()
    return _losses(output)


def _losses(output):
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["cls_loss"], r["box_loss"], r["lr"]) for r in lines if r["type"] == "train"}


def _start(shapes, output, workers, stderr_file, size="128"):
    cmd = [sys.executable, str(ROOT / "main.py"), "-mode", "train", "--data", str(shapes), *FLAGS,
           "--workers", str(workers), "--output", str(output), "--image-size", size]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr_file, text=True)


def _wait_for(condition, process, timeout=600):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before it could be signalled"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _logged_steps(output):
    path = output / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_last_and_resume_gives_the_same_losses(shapes, uninterrupted, tmp_path, signum):
    output = tmp_path / "run"
    with open(tmp_path / "stderr.txt", "w") as err:
        process = _start(shapes, output, 0, err)  # as many workers as the runs compared (float rounding)
        _wait_for(lambda: _logged_steps(output) >= 2, process)  # mid-run: after step 2 of 8
        process.send_signal(signum)
        process.communicate(timeout=600)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 128 + signum, stderr[-2000:]
    last_line = stderr.strip().splitlines()[-1]
    step = int(re.fullmatch(r"interrupted at step (\d+); resume with --resume", last_line).group(1))
    assert 2 <= step < 8 and "Traceback" not in stderr
    assert f"{signal.Signals(signum).name}: finishing the current step, then saving last.pth" in stderr
    assert load_weights(output / "last.pth")[1]["step"] == step
    assert sorted(_losses(output)) == list(range(1, step + 1))
    assert [p.name for p in output.iterdir() if p.name.endswith(".tmp")] == []

    Trainer(main.parse_args(["-mode", "train", "--data", str(shapes), *FLAGS, "--workers", "0",
                             "--output", str(output), "--resume"])).fit()
    assert _losses(output) == uninterrupted


def test_a_second_sigint_aborts_at_once(shapes, tmp_path):
    output = tmp_path / "run"
    with open(tmp_path / "stderr.txt", "w") as err:
        # a DataLoader worker (a forked process with the trainer's handlers) too; slower steps: the abort
        # lands mid-step
        process = _start(shapes, output, 1, err, size="256")
        _wait_for(lambda: _logged_steps(output) >= 1, process)
        process.send_signal(signal.SIGINT)
        _wait_for(lambda: "SIGINT: finishing" in (tmp_path / "stderr.txt").read_text(), process)
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=600)
    assert process.returncode == -signal.SIGINT  # ended by the signal itself, not by a clean exit
    assert "interrupted at step" not in (tmp_path / "stderr.txt").read_text()


def test_progress_bar_counts_the_steps_of_this_run(shapes, tmp_path, capsys):
    def args(*extra):
        return main.parse_args(["-mode", "train", "--data", str(shapes), *FLAGS, "--workers", "0", "--epochs", "1.25",
                                "--output", str(tmp_path / "run"), *extra])

    def totals():
        return {int(t) for t in re.findall(r"\| *\d+/(\d+) \[", capsys.readouterr().err)}

    Trainer(args()).fit(max_steps=3)  # 1.25 epochs of 4 steps = 5 steps; this run does 3 of them
    assert totals() == {3}
    Trainer(args("--resume")).fit()  # the remaining 2, across the epoch boundary: one bar
    assert totals() == {2}


def _rank(rank, port, results):
    import os
    import torch.distributed as dist
    from train.distributed import DistInfo
    from train.interrupt import StopRequests
    os.environ.pop("TORCHELASTIC_RUN_ID", None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    info = DistInfo(rank, 2, rank)
    with StopRequests(info, torch.device("cpu")) as stop:
        before = stop.poll(bad_images=rank)  # nobody signalled yet; rank 1 saw one bad image
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is signalled
            time.sleep(0.1)  # let the handler run
        after = stop.poll()
    dist.destroy_process_group()
    results.put((rank, before, after))


def test_all_ranks_agree_on_the_stop():
    import torch.multiprocessing as mp
    context = mp.get_context("spawn")
    results, port = context.Queue(), free_port()
    processes = [context.Process(target=_rank, args=(rank, port, results)) for rank in range(2)]
    for p in processes:
        p.start()
    outcome = dict((rank, (before, after)) for rank, before, after in (results.get(timeout=600) for _ in processes))
    for p in processes:
        p.join(timeout=60)
    assert outcome == {0: ((0, 1), (signal.SIGTERM, 0)), 1: ((0, 1), (signal.SIGTERM, 0))}


def test_a_stop_at_an_epoch_end_evaluates_on_resume(shapes, tmp_path, monkeypatch):
    """The epoch-end evaluation a signal skips runs first on resume: same train and eval records as a run
    never stopped (the evaluation's DataLoader draws from the global RNG, so its place matters)."""
    from train.interrupt import Interrupted, StopRequests

    def args(output, *extra):
        return main.parse_args(["-mode", "trainval", "--data", str(shapes), *FLAGS, "--workers", "0", "--epochs",
                                "1.25", "--val-nms", "hard", "--output", str(output), *extra])  # 5 steps

    def records(output):
        lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("time", "img_per_s")} for r in lines]  # not timings

    Trainer(args(tmp_path / "full")).fit()
    trainer = Trainer(args(tmp_path / "cut"))
    real_poll = StopRequests.poll
    # a SIGTERM during the last step of epoch 1 (steps 1-4), seen right after it
    monkeypatch.setattr(StopRequests, "poll", lambda self, bad_images=0: (
        signal.SIGTERM if trainer.step == 3 else 0, real_poll(self, bad_images)[1]))
    with pytest.raises(Interrupted, match=r"^interrupted at step 4; resume with --resume$") as stopped:
        trainer.fit()
    assert stopped.value.exit_code == 143 and load_weights(tmp_path / "cut" / "last.pth")[1]["eval_pending"]
    assert [r["type"] for r in records(tmp_path / "cut")] == ["train"] * 4  # the evaluation was skipped
    monkeypatch.setattr(StopRequests, "poll", real_poll)
    Trainer(args(tmp_path / "cut", "--resume")).fit()
    assert records(tmp_path / "cut") == records(tmp_path / "full")
