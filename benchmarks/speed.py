"""Speed and peak memory of this repo's EfficientDet against effdet (rwightman's `tf_efficientdet_dN`) on CPU.

    pip install -r benchmarks/requirements.txt        # effdet, the peer (benchmark-only dependency)
    python benchmarks/speed.py                          # D0: infer batch 1/8 fp32/bf16, train batch 4 fp32/bf16
    python benchmarks/speed.py --variants d0 d1 d2 d3 --modes infer --batches 1 --precisions fp32 bf16

Every (variant, mode, precision, batch) cell starts one worker process per side, so that each side's peak
RSS is its own (`ru_maxrss` of the worker: Python + torch + model + activations). Both workers build their
model and warm up, then the parent asks them for one timed step at a time, alternating which side goes
first, so that a noisy neighbour slows both sides alike; the table shows the median of `--runs` steps.

* infer: network + post-processing, under `torch.inference_mode()`. Ours: `prepare_for_inference(model,
  precision)` then `model.postprocess` as `-mode infer` runs it (best class per anchor, top-5000, hard NMS,
  top-100); effdet: `DetBenchPredict` (its anchors decode, top-5000, batched hard NMS, top-100).
* train: forward, `train.loss.detection_loss`, backward, `train.optim.build_optimizer`'s step (official L2,
  clipping, momentum SGD), `train.ema.ModelEMA.update`, on both sides; targets assigned once beforehand.
  bf16 = `torch.autocast("cpu", torch.bfloat16)` around the forward, as `train/trainer.py` does.
* The peer runs in float32 unless `--peer-precision same` (the targets compare against effdet fp32).
* Allocator: ours keeps freed memory for reuse, as `main.py` runs (`utils/allocator.py`; `--malloc system`
  for glibc's defaults, `main.py --system-malloc`); effdet runs with glibc's defaults, as it ships, unless
  `--peer-malloc reuse` gives it the same setting.
* ratio: the median over the timed pairs of (effdet step time / ours), each pair run back to back.
* max |delta|: ours against the plain float32 NCHW `EfficientDet` with the same weights, on the timed input
  (infer: all head outputs; train: the head outputs of one training-mode forward with the weights after
  the timed steps). Weights are randomised (BN statistics, biases, fusion weights too) so that the outputs
  are not near-constant.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils.cpu import describe  # noqa: E402


# ----------------------------------------------------------------------------------------------- worker side

def _randomise_(model, seed: int) -> None:
    """Non-trivial weights: a fresh model has BN at identity and zero biases, so its outputs barely vary."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            r = torch.rand(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(0.5 + 1.5 * r)
            elif name.endswith("edge_weights") or (t.dim() == 1 and name.endswith("weight")):
                t.copy_(0.5 + r)  # BN gamma, fusion weights
            elif t.dim() == 1:
                t.copy_(0.2 * (r - 0.5))  # biases, BN beta, running_mean
            if "predict.conv_pw.bias" in name and t.numel() % 90 == 0:
                t.sub_(4.6)  # keep the class prior


def _new_model(spec: dict):
    import torch
    from model import build_model
    torch.manual_seed(spec["seed"])
    if spec["side"] == "effdet":
        from effdet import create_model
        return create_model(f"tf_efficientdet_{spec['variant']}", pretrained_backbone=False)
    model = build_model(f"efficientdet-{spec['variant']}")
    _randomise_(model, spec["seed"])
    return model


def _build(spec: dict):
    """One side of one cell -> (step() returning the head outputs, images, model or None)."""
    import torch
    from model import AnchorGenerator, get_config
    name = f"efficientdet-{spec['variant']}"
    size = spec["size"] or get_config(name).image_size
    model = _new_model(spec)
    images = torch.randn(spec["batch"], 3, size, size, generator=torch.Generator().manual_seed(spec["seed"]))
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["precision"]]

    if spec["mode"] == "infer":
        if spec["side"] == "effdet":
            from effdet import DetBenchPredict
            bench = DetBenchPredict(model).eval()  # network, anchors decode, top-5000, batched hard NMS

            def step():
                with torch.inference_mode(), torch.autocast("cpu", dtype or torch.bfloat16, enabled=bool(dtype)):
                    return bench(images)
            return step, images, None
        from model.inference import prepare_for_inference
        from model.postprocess import postprocess
        module = prepare_for_inference(model.eval(), spec["precision"], fuse=not spec["no_fuse"],
                                       channels_last=not spec["no_channels_last"], compile=spec["compile"])
        del model  # a deployment keeps only the prepared module; the delta check rebuilds the original
        anchors = AnchorGenerator.from_config(get_config(name))((size, size))
        scales = torch.ones(spec["batch"])

        def step():  # -> head outputs, after running the `-mode infer` post-processing on them
            with torch.inference_mode():
                outputs = module(images)
                postprocess(*outputs, anchors, scales, (size, size), mode="infer", method="hard")
            return outputs
        return step, images, None

    from train.assign import TargetAssigner
    from train.ema import ModelEMA
    from train.loss import detection_loss
    from train.optim import build_optimizer
    model.train()
    if spec["side"] == "ours" and spec["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    if spec["side"] == "ours" and not spec["no_channels_last"]:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    assigner = TargetAssigner.from_generator(AnchorGenerator.from_config(get_config(name)), (size, size))
    gen = torch.Generator().manual_seed(spec["seed"])
    yx = torch.rand(spec["batch"], 8, 2, generator=gen) * size * 0.6
    hw = (torch.rand(spec["batch"], 8, 2, generator=gen) * 0.4 + 0.05) * size
    targets = assigner(torch.cat([yx, yx + hw], -1), torch.randint(0, 90, (spec["batch"], 8), generator=gen))
    optimizer = build_optimizer(model, lr=1e-3)
    ema = ModelEMA(model)

    def step():
        with torch.autocast("cpu", dtype or torch.bfloat16, enabled=dtype is not None):
            cls_outs, box_outs = model(images)
        loss = detection_loss(cls_outs, box_outs, *targets)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)
        return cls_outs, box_outs
    return step, images, model


def _max_delta(spec: dict, step, images, model) -> float:
    """Ours against the plain float32 model with the same weights, on the same images."""
    import copy
    import torch
    if model is None:  # infer: the prepared module vs a rebuild of the model it was prepared from
        outputs, reference = step(), _new_model(spec).eval()
        with torch.no_grad():
            expected = reference(images.contiguous())
    else:  # train: one training-mode forward as timed vs the plain module, same weights and BN batch stats
        reference = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=spec["precision"] == "bf16"):
            torch.manual_seed(spec["seed"])  # same drop-connect draws (D1+) on both sides
            outputs = model(images)
        with torch.no_grad():
            torch.manual_seed(spec["seed"])
            expected = reference(images.contiguous())
    pairs = zip(outputs[0] + outputs[1], expected[0] + expected[1])
    return max(float((a.float() - b).abs().max()) for a, b in pairs)


def worker(spec: dict) -> None:
    """Line protocol on stdin/stdout: after "ready", each "step" -> {"time"}; "finish" -> {"rss_mb", "delta"}."""
    if spec["malloc"] == "reuse":
        from utils.allocator import reuse_freed_memory
        if not reuse_freed_memory():
            raise RuntimeError("--malloc reuse needs glibc (Linux)")
    import torch
    torch.set_num_threads(spec["threads"])
    step, images, model = _build(spec)
    for _ in range(spec["warmup"]):
        step()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            t = time.perf_counter()
            step()
            print(json.dumps({"time": time.perf_counter() - t}), flush=True)
        elif line.strip() == "finish":
            rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the delta check
            delta = _max_delta(spec, step, images, model) if spec["side"] == "ours" else None
            print(json.dumps({"rss_mb": rss_mb, "delta": delta}), flush=True)
            return


# ----------------------------------------------------------------------------------------------- parent side

class Worker:
    """One side of one cell in its own process."""

    def __init__(self, spec: dict):
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.side = spec["side"]

    def ask(self, command: str | None = None) -> dict:
        if command:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.side} worker died (exit code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def run_cell(args, variant: str, mode: str, precision: str, batch: int, peer: bool) -> dict:
    base = {"variant": variant, "mode": mode, "batch": batch, "size": args.size, "threads": args.threads,
            "seed": args.seed, "warmup": args.warmup, "no_fuse": args.no_fuse, "compile": args.compile,
            "no_channels_last": args.no_channels_last, "grad_checkpointing": args.grad_checkpointing}
    specs = [{**base, "side": "ours", "precision": precision, "malloc": args.malloc}]
    if peer:
        specs.append({**base, "side": "effdet", "malloc": args.peer_malloc,
                      "precision": precision if args.peer_precision == "same" else "fp32"})
    # Workers start one after the other: two model builds and warm-ups at once would time each other.
    workers = []
    for spec in specs:
        workers.append(Worker(spec))
        workers[-1].ask()
    times = {w.side: [] for w in workers}
    for r in range(args.runs):
        for w in (workers if r % 2 == 0 else workers[::-1]):  # alternate who goes first
            times[w.side].append(w.ask("step")["time"])
    result = {"times": times}
    for w in workers:
        result[w.side] = w.ask("finish")
        w.close()
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["d0"], help="d0 ... d7x")
    parser.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batches", nargs="+", type=int, default=None,
                        help="default: 1 and 8 for infer, 4 for train")
    parser.add_argument("--size", type=int, default=None, help="square input side (default: the variant's)")
    parser.add_argument("--runs", type=int, default=5, help="timed steps per side (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-peer", action="store_true", help="run this repo's side only")
    parser.add_argument("--peer-precision", choices=["fp32", "same"], default="fp32",
                        help="effdet in fp32 (default) or in the row's precision (autocast)")
    parser.add_argument("--malloc", choices=["reuse", "system"], default="reuse",
                        help="ours: keep freed memory for reuse as main.py does (utils/allocator.py), or glibc's "
                             "defaults (main.py --system-malloc)")
    parser.add_argument("--peer-malloc", choices=["system", "reuse"], default="system",
                        help="effdet: glibc's defaults (as effdet runs; default) or the same allocator setting")
    parser.add_argument("--no-fuse", action="store_true", help="ours: plain module instead of the fused one")
    parser.add_argument("--no-channels-last", action="store_true", help="ours: NCHW (unfused infer, train)")
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile (infer)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="ours: recompute activations (train)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))

    import torch
    peer = not args.no_peer
    if peer:
        try:
            import effdet  # noqa: F401
        except ImportError:
            print("effdet is not installed: `pip install -r benchmarks/requirements.txt` to compare against it; "
                  "running this repo's side alone.\n")
            peer = False
    print(f"command: python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {args.threads} threads, {describe()}, "
          f"median of {args.runs} runs after {args.warmup} warm-up, A/B alternated\n")
    columns = ["variant", "mode", "precision", "batch", "ours img/s", "effdet img/s", "ratio",
               "ours peak RSS (MB)", "effdet peak RSS (MB)", "RSS ratio", "max \\|delta\\| vs plain fp32"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for variant in args.variants:
        for mode in args.modes:
            for precision in args.precisions:
                for batch in args.batches or ([1, 8] if mode == "infer" else [4]):
                    r = run_cell(args, variant, mode, precision, batch, peer)
                    ours = batch / statistics.median(r["times"]["ours"])
                    cells = [variant.upper(), mode, precision, str(batch), f"{ours:.2f}"]
                    if peer:
                        theirs = batch / statistics.median(r["times"]["effdet"])
                        # Ratio of each back-to-back pair, then the median: a neighbour's load that comes and
                        # goes over minutes cancels out of a pair, not always out of two separate medians.
                        paired = statistics.median(t / o for o, t in zip(r["times"]["ours"], r["times"]["effdet"]))
                        cells += [f"{theirs:.2f}", f"{paired:.2f}x"]
                    else:
                        cells += ["-", "-"]
                    cells.append(f"{r['ours']['rss_mb']:.0f}")
                    if peer:
                        rss = r["effdet"]["rss_mb"]
                        cells += [f"{rss:.0f}", f"{r['ours']['rss_mb'] / rss:.2f}"]
                    else:
                        cells += ["-", "-"]
                    cells.append(f"{r['ours']['delta']:.1e}")
                    print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
