"""Curves a person can look at: curves.png of every run, `python -m train.curves`, --tensorboard, the note on
early evaluations."""
import json
import sys

import pytest
import torch
from PIL import Image

import main
import train.trainer as trainer_module
from data.shapes import make_shapes_dataset
from model import build_model
from train.curves import BOX_LOSS_WEIGHT, curves_figure, draw_curves, read_metrics
from train.curves import main as curves_main
from train.trainer import Trainer
from utils.weights import save_weights


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", num_train=8, num_val=4, workers=1)


def _args(shapes, output, *extra, mode="train"):
    return main.parse_args(["-mode", mode, "--data", str(shapes), "--image-size", "128", "--batch-size", "2",
                            "--epochs", "2", "--workers", "0", "--log-every", "1", "--output", str(output), *extra])


def _records(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_trainval_redraws_curves_after_each_evaluation_and_keeps_the_best(shapes, tmp_path, monkeypatch):
    drawn = []  # eval records in metrics.jsonl at each drawing

    def spy(run_dir):
        drawn.append(sum(r["type"] == "eval" for r in _records(run_dir)))
        return draw_curves(run_dir)

    monkeypatch.setattr(trainer_module, "draw_curves", spy)
    out = tmp_path / "run"
    args = _args(shapes, out, "--val-nms", "hard", "--val-max-images", "2", "--keep", "1", mode="trainval")
    args.epochs = 1.25  # 4 steps per epoch: evaluations after step 4 (epoch end) and step 5 (the last)
    Trainer(args).fit()
    assert drawn == [1, 2]
    records = _records(out)
    assert [r["images"] for r in records if r["type"] == "train"] == [2, 4, 6, 8, 10]
    with Image.open(out / "curves.png") as png:
        assert png.format == "PNG" and png.size == (960, 640)
    evals = [r for r in records if r["type"] == "eval"]
    best = max(evals, key=lambda r: (r["AP"], -r["epoch"]))
    kept = sorted(p.name for p in out.glob("best-epoch*.pth"))
    assert kept == [f"best-epoch{best['epoch']}-ap{best['AP']:.4f}.pth"]
    assert torch.load(out / kept[0], weights_only=True)["stats"]["AP"] == best["AP"]


def test_train_only_run_draws_curves_at_its_end(shapes, tmp_path):
    Trainer(_args(shapes, tmp_path / "run")).fit(max_steps=1)
    with Image.open(tmp_path / "run" / "curves.png") as png:
        assert png.format == "PNG"


def test_curves_show_the_logged_values(tmp_path):
    records = [{"type": "train", "step": s, "images": 8 * s, "loss": 3.0 / s, "cls_loss": 2.0 / s,
                "box_loss": 0.02 / s, "lr": 0.01 * s, "img_per_s": 10.0 + s} for s in range(1, 6)]
    records += [{"type": "eval", "step": 5, "images": 40, "AP": 0.25, "AP50": 0.5}]
    ax_loss, ax_ap, ax_lr, ax_speed = curves_figure(records, "run").axes
    lines = {line.get_label(): line for line in ax_loss.lines}
    assert list(lines["loss"].get_xdata()) == [8, 16, 24, 32, 40]
    assert list(lines["cls_loss"].get_ydata()) == [r["cls_loss"] for r in records[:5]]
    assert list(lines[f"{BOX_LOSS_WEIGHT:g} x box_loss"].get_ydata()) == pytest.approx(
        [50 * r["box_loss"] for r in records[:5]])
    assert list(ax_lr.lines[0].get_ydata()) == [r["lr"] for r in records[:5]]
    assert list(ax_speed.lines[0].get_ydata()) == [r["img_per_s"] for r in records[:5]]
    assert [(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in ax_ap.lines] == [
        ("AP", [40], [0.25]), ("AP@0.5", [40], [0.5])]
    assert ax_lr.get_xlabel() == "training images seen"
    # Logs without images seen (older runs) are drawn against steps.
    old = [{k: v for k, v in r.items() if k != "images"} for r in records]
    assert curves_figure(old, "run").axes[2].get_xlabel() == "step"


def test_curves_cli_redraws_any_run_folder(tmp_path, capsys):
    lines = [{"type": "train", "step": 1, "loss": 1.0, "cls_loss": 0.5, "box_loss": 0.01, "lr": 0.1, "img_per_s": 3.0}]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(lines[0]) + '\n{"type": "tra')  # a line cut short
    assert read_metrics(tmp_path / "metrics.jsonl") == lines
    curves_main([str(tmp_path)])
    assert capsys.readouterr().out.strip() == str(tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as png:
        assert png.format == "PNG"
    with pytest.raises(SystemExit) as e:
        curves_main([str(tmp_path / "nothing")])
    assert e.value.code == 2 and "no metrics.jsonl" in capsys.readouterr().err


def test_tensorboard_missing_is_one_line_before_any_work(shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what `import` sees when not installed
    out = tmp_path / "run"
    assert main.main(["-mode", "train", "--data", str(shapes), "--output", str(out), "--tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --tensorboard: the tensorboard package is not installed (pip install tensorboard)\n"
    assert not out.exists()  # nothing done


def test_tensorboard_events_hold_the_logged_scalars(shapes, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                            reason="tensorboard is not installed (optional)")
    Trainer(_args(shapes, tmp_path / "run", "--tensorboard")).fit(max_steps=1)
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = _records(tmp_path / "run")
    scalars = events.Scalars("train/loss")
    assert [s.step for s in scalars] == [2]  # images seen
    assert [s.value for s in scalars] == pytest.approx([logged[0]["loss"]])
    assert "train/lr" in events.Tags()["scalars"] and "train/images" not in events.Tags()["scalars"]


def test_early_evaluations_of_a_run_from_scratch_say_they_under_report(shapes, tmp_path, capsys):
    trainer = Trainer(_args(shapes, tmp_path / "scratch", "--val-nms", "hard", "--val-max-images", "2",
                            mode="trainval"))
    trainer.step = trainer.total_steps // 4  # 8 steps: an evaluation after step 2 is early
    trainer.evaluate()
    assert "early evaluation, AP under-reports: the EMA weights lag" in capsys.readouterr().out
    trainer.step = trainer.total_steps // 4 + 1
    assert trainer._early_note() == ""
    save_weights(tmp_path / "w.pth", build_model("efficientdet-d0", num_classes=5).state_dict(),
                 model_name="efficientdet-d0", num_classes=5)
    tuned = Trainer(_args(shapes, tmp_path / "tuned", "--weights", str(tmp_path / "w.pth"), mode="trainval"))
    assert tuned.step == 0 and tuned._early_note() == ""  # not from scratch
