"""Per-image post-processing time of each official path, on real head outputs; prints a table.

    python benchmarks/postprocess.py [--runs 7] [--threads 2]

Head outputs come from D0 on the reference photo with the reference fixture's weights when ../shared is there
(realistic score distributions), else from a randomly initialised D0 (every anchor near the 0.01 prior: the
worst case for soft-NMS, whose cost grows with the candidates above the 0.001 score threshold). Each in both
memory layouts: NCHW, as the plain model and the engines (ONNX Runtime, OpenVINO) return them, and
channels_last, as the fused inference module does.

Its table lives in docs/postprocessing.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import AnchorGenerator, build_model  # noqa: E402
from model.postprocess import postprocess  # noqa: E402
from utils.allocator import reuse_freed_memory  # noqa: E402
from model.cpu import describe  # noqa: E402

FIXTURE = REPO.parent / "shared" / "fixtures" / "tf_reference_d0"


def head_outputs(batch: int, weights: str):
    model = build_model("efficientdet-d0").eval()
    if weights == "fixture":
        from utils.port_tf import load_tf_state_dict
        model.load_state_dict(load_tf_state_dict(FIXTURE, "efficientdet-d0"))
        x = torch.from_numpy(np.load(FIXTURE / "reference_outputs.npz")["input_tensor"]).permute(0, 3, 1, 2)
    else:
        x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        cls_outs, box_outs = model(x.expand(batch, -1, -1, -1).contiguous())
    return cls_outs, box_outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--system-malloc", action="store_true", help="glibc's defaults (as main.py --system-malloc)")
    args = parser.parse_args()
    if not args.system_malloc:
        reuse_freed_memory()  # as main.py runs
    torch.set_num_threads(args.threads)
    anchors = AnchorGenerator.from_config(build_model("efficientdet-d0").config)((512, 512))
    sources = ["fixture", "random"] if (FIXTURE / "model.index").is_file() else ["random"]
    print(f"torch {torch.__version__}, {args.threads} threads, {describe()}\n")
    print(f"| weights | batch | path | NMS | NCHW ms / image | channels_last ms / image |  (median of {args.runs})")
    print("|---|---|---|---|---|---|")
    for source in sources:
        for batch in (1, 8):
            nchw = head_outputs(batch, source)
            layouts = (nchw, tuple([t.contiguous(memory_format=torch.channels_last) for t in outs] for outs in nchw))
            scales = torch.ones(batch)
            for mode, method in (("eval", "soft"), ("eval", "hard"), ("infer", "soft"), ("infer", "hard")):
                medians = []
                for outs in layouts:
                    postprocess(*outs, anchors, scales, (512, 512), mode, method)  # warm-up
                    times = []
                    for _ in range(args.runs):
                        start = time.perf_counter()
                        postprocess(*outs, anchors, scales, (512, 512), mode, method)
                        times.append((time.perf_counter() - start) / batch * 1000)
                    medians.append(statistics.median(times))
                print(f"| {source} | {batch} | {mode} | {method} | {medians[0]:.1f} | {medians[1]:.1f} |")


if __name__ == "__main__":
    main()
