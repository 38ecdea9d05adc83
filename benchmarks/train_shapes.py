"""Train EfficientDet-D0 from scratch on the built-in shapes dataset with the documented commands; print tables.

    python benchmarks/train_shapes.py                      # both recipes, one after the other
    python benchmarks/train_shapes.py --recipe quick       # the quick start only
    python benchmarks/train_shapes.py --recipe full -- --amp   # anything after -- goes to main.py

Each recipe is `main.py -mode trainval` exactly as README.md (quick start) and docs/training.md (12 epochs)
give it (a subprocess, so what is timed is the command a user runs; per-epoch evaluation of the EMA weights on
the first 100 val images with hard NMS), then `main.py -mode eval` of its best.pth on the whole val split with
the official soft-NMS path. Printed: the CPU, each run's per-evaluation table (images seen, minutes, loss, AP,
AP@0.5, APs/m/l) and a summary table. The learning curve of each run is `RUN/curves.png` (loss terms, lr,
img/s and val AP against images seen).

Its tables live in docs/training.md (Training on the shapes dataset).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.train_runs import eval_rows, median_rate, print_eval_table, read_json, run_main  # noqa: E402
from train.curves import read_metrics  # noqa: E402
from model.cpu import describe  # noqa: E402

COMMON = ["-mode", "trainval", "-model", "efficientdet-d0", "--data", "shapes", "--val-nms", "hard",
          "--val-max-images", "100"]
RECIPES = {  # "quick": the README's quick start; "full": its 12-epoch (24k images) recipe, with ATSS
    "quick": ["--image-size", "256", "--batch-size", "8", "--epochs", "2", "--lr", "0.08", "--jitter", "0.5", "1.5"],
    "full": ["--image-size", "256", "--batch-size", "8", "--epochs", "12", "--lr", "0.08", "--jitter", "0.5", "1.5",
             "--assigner", "atss"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=[*RECIPES, "both"], default="both")
    parser.add_argument("--output", default="runs/bench-shapes", help="parent of the run folders (replaced)")
    parser.add_argument("extra", nargs="*", help="more main.py flags, after --")
    args = parser.parse_args()
    summary = []
    for name in RECIPES if args.recipe == "both" else [args.recipe]:
        run = REPO / args.output / name
        shutil.rmtree(run, ignore_errors=True)
        seconds = run_main([*COMMON, *RECIPES[name], "--output", str(run), *args.extra])
        run_main(["-mode", "eval", "--weights", str(run / "best.pth"), "--data", "shapes", "--output",
                  str(run / "eval")])
        stats = read_json(run / "eval" / "metrics_val.json")["stats"]
        rows = eval_rows(run)
        print(f"\n{name}: per evaluation (first 100 val images, hard NMS, EMA weights); curve: {run / 'curves.png'}")
        print_eval_table(rows)
        summary.append((name, seconds, median_rate(read_metrics(run / "metrics.jsonl")), rows[-1]["images"], stats))

    print(f"\n{describe()}")
    print("| recipe | images seen | train wall time | img/s (median) | val AP | val AP@0.5 | val AP@0.75 |")
    print("|---|---|---|---|---|---|---|")
    for name, seconds, rate, images, stats in summary:
        print(f"| {name} | {images} | {seconds / 60:.1f} min | {rate:.1f} | {stats['AP']:.3f} | {stats['AP50']:.3f} | "
              f"{stats['AP75']:.3f} |")
    print("(val: whole split, official soft-NMS path, best.pth)")


if __name__ == "__main__":
    main()
