"""Train EfficientDet-D0 from scratch on the embedded shapes dataset, then evaluate it; print a table.

    python benchmarks/train_shapes.py                  # the README's recipe
    python benchmarks/train_shapes.py --epochs 2 -- --amp   # anything after -- goes to main.py

Runs `main.py -mode trainval` in a subprocess (so what is timed is exactly the command a user runs), then
`main.py -mode eval` of the best EMA weights on the whole val split with the official soft-NMS path.
Target (issue 3): mAP@0.5 >= 0.70 within 15 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from utils.cpu import describe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--lr", type=float, default=0.08)
    parser.add_argument("--output", default="runs/bench-shapes", help="run folder (replaced)")
    parser.add_argument("extra", nargs="*", help="more main.py flags, after --")
    args = parser.parse_args()
    output = REPO / args.output
    shutil.rmtree(output, ignore_errors=True)
    train_cmd = [sys.executable, "main.py", "-mode", "trainval", "-model", "efficientdet-d0", "--data", "shapes",
                 "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--epochs",
                 str(args.epochs), "--lr", str(args.lr), "--jitter", "0.5", "1.5", "--val-nms", "hard",
                 "--val-max-images", "100", "--output", str(output), *args.extra]
    print("$", " ".join(train_cmd[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(train_cmd, cwd=REPO, check=True)
    train_seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    rates = [r["img_per_s"] for r in records if r["type"] == "train"]

    eval_cmd = [sys.executable, "main.py", "-mode", "eval", "--weights", str(output / "best.pth"), "--data",
                "shapes", "--output", str(output / "eval")]
    print("$", " ".join(eval_cmd[1:]), flush=True)
    subprocess.run(eval_cmd, cwd=REPO, check=True)
    stats = json.loads((output / "eval" / "metrics_val.json").read_text())["stats"]

    print(f"\n{describe()}")
    print("| model | image | epochs | train wall time | train img/s (median) | val mAP | val mAP@0.5 |")
    print("|---|---|---|---|---|---|---|")
    rate = sorted(rates)[len(rates) // 2] if rates else float("nan")
    print(f"| efficientdet-d0 | {args.image_size} | {args.epochs:g} | {train_seconds / 60:.1f} min | {rate:.1f} | "
          f"{stats['AP']:.3f} | {stats['AP50']:.3f} |")


if __name__ == "__main__":
    main()
