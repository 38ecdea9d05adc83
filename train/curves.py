"""`curves.png` of a run folder, drawn from its `metrics.jsonl`: loss terms, learning rate, training speed and
val AP / AP@0.5 against the number of training images seen.

The trainer redraws it (rank 0) after every evaluation, and at the end of a run without validation; any run
folder can be redrawn with `python -m train.curves RUN_DIR`. Drawn by matplotlib's Agg canvas through the
object API, so the process-wide pyplot backend is left alone; written atomically.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from data.atomic import atomic_open

BOX_LOSS_WEIGHT = 50.0  # official box_loss_weight: box_loss is drawn as the share it has in `loss`


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a `metrics.jsonl`; a line cut short (a run killed while writing it) is left out."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _x(records: list[dict]) -> tuple[list[float], str]:
    """x values: images seen (`images`, logged by the trainer), else steps for logs without it."""
    if all("images" in r for r in records):
        return [r["images"] for r in records], "training images seen"
    return [r["step"] for r in records], "step"


def curves_figure(records: list[dict], title: str) -> Figure:
    """A 2 x 2 figure of `metrics.jsonl` records: axes (in `fig.axes` order) loss terms (log scale), val AP and
    AP@0.5 (and the VOC mAP of a VOC val set), learning rate, img/s; x = training images seen."""
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    fig = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(fig)
    (ax_loss, ax_ap), (ax_lr, ax_speed) = fig.subplots(2, 2, sharex=True)
    fig.suptitle(title)
    if train:
        x, label = _x(train)
        ax_loss.plot(x, [r["loss"] for r in train], label="loss", lw=1)
        ax_loss.plot(x, [r["cls_loss"] for r in train], label="cls_loss", lw=1)
        ax_loss.plot(x, [BOX_LOSS_WEIGHT * r["box_loss"] for r in train], label=f"{BOX_LOSS_WEIGHT:g} x box_loss",
                     lw=1)
        ax_loss.set_yscale("log")
        ax_lr.plot(x, [r["lr"] for r in train], color="tab:purple")
        ax_speed.plot(x, [r["img_per_s"] for r in train], color="tab:gray")
        for ax in (ax_lr, ax_speed):
            ax.set_xlabel(label)
    if evals:
        x, _ = _x(evals)
        ax_ap.plot(x, [r["AP"] for r in evals], "o-", label="AP")
        ax_ap.plot(x, [r["AP50"] for r in evals], "s-", label="AP@0.5")
        if all("voc_mAP" in r for r in evals):  # a VOC val set
            ax_ap.plot(x, [r["voc_mAP"] for r in evals], "^-", label="VOC mAP")
        ax_ap.set_ylim(0, 1)
    else:
        ax_ap.text(0.5, 0.5, "no evaluation", ha="center", va="center", transform=ax_ap.transAxes)
    for ax, name in ((ax_loss, "training loss (logged steps)"), (ax_ap, "val AP (EMA weights)"),
                     (ax_lr, "learning rate"), (ax_speed, "training speed (img/s)")):
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return fig


def draw_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw `run_dir/metrics.jsonl` into `out` (default `run_dir/curves.png`, 960 x 640); returns the path."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a training run folder)")
    fig = curves_figure(read_metrics(metrics), run_dir.resolve().name)
    out = Path(out) if out is not None else run_dir / "curves.png"
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=80)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="(Re)draw curves.png of a training run folder")
    parser.add_argument("run_dir", help="run folder holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output PNG (default RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    try:
        print(draw_curves(args.run_dir, args.out))
    except FileNotFoundError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
