"""The training loop: exact resume, fine-tuning, run-folder safety, non-finite losses, 2-process DDP on CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

import main
from conftest import ROOT
from data.shapes import make_shapes_dataset
from model import build_model
from model_helpers import free_port
from train.trainer import Trainer
from utils.weights import load_weights, save_weights


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", num_train=8, num_val=4, workers=1)


def _args(shapes, output, *extra, mode="train"):
    return main.parse_args(["-mode", mode, "--data", str(shapes), "--image-size", "128", "--batch-size", "2",
                            "--epochs", "2", "--workers", "0", "--log-every", "1", "--save-every", "3",
                            "--output", str(output), *extra])


def _losses(output):
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["cls_loss"], r["box_loss"], r["lr"]) for r in lines if r["type"] == "train"}


def test_interrupted_and_resumed_run_gives_the_same_losses(shapes, tmp_path):
    Trainer(_args(shapes, tmp_path / "full")).fit()
    Trainer(_args(shapes, tmp_path / "cut")).fit(max_steps=5)  # "interrupted" mid-epoch after step 5
    assert load_weights(tmp_path / "cut" / "last.pth")[1]["step"] == 5
    Trainer(_args(shapes, tmp_path / "cut", "--resume")).fit()
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert sorted(full) == sorted(resumed) == list(range(1, 9))
    assert full == resumed
    final_full = torch.load(tmp_path / "full" / "last.pth", weights_only=True)["ema_state_dict"]
    final_cut = torch.load(tmp_path / "cut" / "last.pth", weights_only=True)["ema_state_dict"]
    assert all(torch.equal(final_full[k], final_cut[k]) for k in final_full)


def test_cpu_training_layout_channels_last_unless_nchw(shapes, tmp_path):
    def layouts(trainer):
        weight = trainer.model.backbone.stem.conv.weight
        return weight.is_contiguous(memory_format=torch.channels_last), weight.is_contiguous()
    assert layouts(Trainer(_args(shapes, tmp_path / "nhwc"))) == (True, False)
    trainer = Trainer(_args(shapes, tmp_path / "nchw", "--nchw"))
    assert layouts(trainer) == (False, True)
    trainer.fit(max_steps=1)  # and it trains


def test_fractional_epochs_evaluate_the_final_weights(shapes, tmp_path):
    args = _args(shapes, tmp_path / "run", "--val-nms", "hard", mode="trainval")
    args.epochs = 1.5  # 4 steps per epoch: an evaluation after step 4 (epoch end) and after the last, step 6
    Trainer(args).fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "eval"] == [4, 6]


def test_run_folder_is_never_overwritten_and_resume_checks_flags(shapes, tmp_path):
    Trainer(_args(shapes, tmp_path / "run")).fit(max_steps=1)
    with pytest.raises(FileExistsError, match="already holds a run"):
        Trainer(_args(shapes, tmp_path / "run"))
    with pytest.raises(ValueError, match=r"started with other flags: --lr None -> 0.5"):
        Trainer(_args(shapes, tmp_path / "run", "--resume", "--lr", "0.5"))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        Trainer(_args(shapes, tmp_path / "empty", "--resume"))
    assert not (tmp_path / "empty").exists()


def test_a_run_refused_on_its_inputs_leaves_no_run_folder(shapes, tmp_path):
    """The output folder is checked first but made only once the data, model and weights are good."""
    with pytest.raises(FileNotFoundError):
        Trainer(_args(tmp_path / "no-such-dataset", tmp_path / "run"))
    with pytest.raises(ValueError, match="--batch-size 64"):
        Trainer(_args(shapes, tmp_path / "run", "--batch-size", "64"))
    with pytest.raises(FileNotFoundError):
        Trainer(_args(shapes, tmp_path / "run", "--weights", str(tmp_path / "missing.pth")))
    assert not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="cannot write there"):
        Trainer(_args(shapes, tmp_path / "file" / "run"))


def test_fine_tuning_with_other_classes_keeps_all_but_the_class_predictor(shapes, tmp_path, capsys):
    torch.manual_seed(1)
    coco_model = build_model("efficientdet-d0", num_classes=90)
    save_weights(tmp_path / "coco.pth", coco_model.state_dict(), model_name="efficientdet-d0", num_classes=90)
    trainer = Trainer(_args(shapes, tmp_path / "ft", "--weights", str(tmp_path / "coco.pth")))
    assert "class-prediction layer re-initialised for 5 classes" in capsys.readouterr().out
    mine, theirs = trainer.model.state_dict(), coco_model.state_dict()
    assert torch.equal(mine["backbone.stem.conv.weight"], theirs["backbone.stem.conv.weight"])
    assert torch.equal(mine["class_net.predict.conv_dw.weight"], theirs["class_net.predict.conv_dw.weight"])
    assert mine["class_net.predict.conv_pw.bias"].shape == (45,)
    assert torch.allclose(mine["class_net.predict.conv_pw.bias"], torch.tensor(-4.59512), atol=1e-4)


def test_non_finite_losses_are_skipped_then_stop_the_run(shapes, tmp_path, monkeypatch):
    import train.trainer as trainer_module
    real = trainer_module.detection_loss

    def nan_loss(*args, **kwargs):
        losses = real(*args, **kwargs)
        return {**losses, "loss": losses["loss"] * float("nan")}

    monkeypatch.setattr(trainer_module, "detection_loss", nan_loss)
    trainer = Trainer(_args(shapes, tmp_path / "nan", "--epochs", "4"))
    with pytest.raises(RuntimeError, match="loss not finite for 6 steps in a row"):
        trainer.fit()
    assert trainer.step == 0 and trainer.non_finite == 6


def test_two_process_ddp_trainval_on_cpu(shapes, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(ROOT / "main.py"), "-mode", "trainval", "--data", str(shapes),
           "--image-size", "128", "--batch-size", "2", "--epochs", "1", "--workers", "0", "--log-every", "1",
           "--val-nms", "hard", "--output", str(tmp_path / "ddp"), "--device", "cpu"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("training efficientdet-d0 on 8 images") == 1  # rank 0 speaks, once
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["type"] == "train"]
    assert train_steps == [1, 2]  # 8 images / (2 processes x batch 2) = 2 steps
    evals = [r for r in records if r["type"] == "eval"]
    assert len(evals) == 1 and 0.0 <= evals[0]["AP"] <= 1.0
    assert (tmp_path / "ddp" / "best.pth").is_file() and (tmp_path / "ddp" / "last.pth").is_file()
