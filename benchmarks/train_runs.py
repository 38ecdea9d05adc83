"""Shared by the training benchmarks: run `main.py` as a user would, read its `metrics.jsonl`, print tables.

A run is a subprocess (what is timed is exactly the command a user types); its folder holds `metrics.jsonl`
and the `curves.png` the trainer draws (`train/curves.py`).

The tables of the training benchmarks live in docs/training.md.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from train.curves import read_metrics  # noqa: E402


def run_main(args: list[str]) -> float:
    """Run `python main.py ARGS` in the repository (echoing the command); returns its wall time in seconds."""
    print("$ python main.py", shlex.join(args), flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "main.py", *args], cwd=REPO, check=True)
    return time.perf_counter() - start


def median_rate(records: list[dict]) -> float:
    """Median training img/s over the logged steps."""
    rates = sorted(r["img_per_s"] for r in records if r.get("type") == "train")
    return rates[len(rates) // 2] if rates else float("nan")


def eval_rows(run_dir: Path) -> list[dict]:
    """One row per evaluation of a run: epoch, images seen, minutes since start, AP, AP@0.5, APs/m/l, and the
    mean training loss since the previous evaluation."""
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    rows, losses = [], []
    for r in records:
        if r.get("type") == "train":
            losses.append(r["loss"])
        elif r.get("type") == "eval":
            rows.append({"epoch": r["epoch"], "images": r["images"], "minutes": r["time"] / 60,
                         "loss": sum(losses) / len(losses) if losses else float("nan"),
                         **{k: r[k] for k in ("AP", "AP50", "APs", "APm", "APl")}})
            losses = []
    return rows


def print_eval_table(rows: list[dict]) -> None:
    """Markdown table of `eval_rows`."""
    print("| epoch | images seen | minutes | train loss | val AP | val AP@0.5 | APs | APm | APl |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['epoch']} | {r['images']} | {r['minutes']:.1f} | {r['loss']:.3f} | {r['AP']:.3f} | "
              f"{r['AP50']:.3f} | {r['APs']:.3f} | {r['APm']:.3f} | {r['APl']:.3f} |")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
