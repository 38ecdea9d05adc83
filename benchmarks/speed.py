"""Speed, FLOP rate, roofline and peak memory of this repo's EfficientDet (PyTorch, ONNX Runtime, OpenVINO)
against effdet (rwightman's `tf_efficientdet_dN`) on CPU.

    pip install -r benchmarks/requirements.txt        # effdet, the peer (benchmark-only dependency)
    python benchmarks/speed.py      # D0: infer batch 1/8 fp32/bf16 on every engine, train batch 4 fp32/bf16
    python benchmarks/speed.py --variants d0 d1 d2 d3 --modes infer --batches 1 --precisions fp32 --backends torch

Every row starts one worker process per side (`benchmarks/speed_worker.py`), so that each side's peak RSS
is its own (`VmHWM` of the worker: Python + torch + runtime + model + activations). Both workers build
their model and warm up, then the parent asks them for one timed step at a time, alternating which side goes
first, so that a noisy neighbour slows both sides alike, and after a 0.1 s pause, so that no side's idle
threads still spin (ONNX Runtime's do for a while after a run); the table shows the median of `--runs` steps.

* infer: network + post-processing, under `torch.inference_mode()`. Ours, engine `torch`:
  `prepare_for_inference(model, precision)` then `model.postprocess` as `-mode infer` runs it (best class per
  anchor, top-5000, hard NMS, top-100); effdet: `DetBenchPredict` (its anchors decode, top-5000, batched
  hard NMS, top-100).
* Engines (`--backends`; default all three, a runtime that is not installed is one line above the table and
  no rows): ours as `-mode infer --backend onnxruntime|openvino` runs it. Our plain model is exported by
  `deploy.export.export_model` as `-mode export` does (static batch of the row, the row's precision) into a
  temporary folder by a child process of the worker, before the warm-up and untimed (the exporter's memory is
  not the worker's); `deploy.backends.open_backend` opens it with `--threads` intra-op threads; the timed step
  is that network (numpy in and out) + the same post-processing. ONNX Runtime runs fp32 and int8; OpenVINO
  fp32, int8 and, where `model.cpu` finds a bf16 path, bf16. int8 (engines only) = `-mode export --precision
  int8` with the tools' defaults (NNCF's mixed preset for OpenVINO, `quantize_static` QDQ for ONNX Runtime),
  calibrated on 16 generated photo-like images (`speed_worker.CALIBRATION_IMAGES`; what they show does not
  change the speed); its accuracy on trained weights is `benchmarks/int8.py`'s. A row that cannot run prints
  its reason above the table.
* train (PyTorch only): forward, `train.loss.detection_loss`, backward, `train.optim.build_optimizer`'s step
  (official L2, clipping, momentum SGD), `train.ema.ModelEMA.update`, on both sides; targets assigned once
  beforehand. bf16 = `torch.autocast("cpu", torch.bfloat16)` around the forward, as `train/trainer.py` does.
* The peer runs in float32 unless `--peer-precision same` (the targets compare against effdet fp32).
* Allocator: ours keeps freed memory for reuse, as `main.py` runs (`utils/allocator.py`: its training setting
  for train rows, its inference setting otherwise; `--malloc system` for glibc's defaults, `main.py
  --system-malloc`); effdet runs with glibc's defaults, as it ships, unless `--peer-malloc reuse` gives it
  the same setting.
* ratio: the median over the timed pairs of (effdet step time / ours), each pair run back to back.
* GFLOP/s: FLOPs per image x img/s. FLOPs = 2 x the multiply-adds of every convolution and matrix product of
  one forward pass at batch 1 (`utils.summary.forward_flops`: torch's flop counter on the meta device; D0 at
  512 px 4.98 GFLOP, the README's 2.49 GMACs; effdet's network counts the same); a training step counts 3 x
  that (the forward, and the backward's input and weight gradients, one product each per forward product).
  In brackets: the share of this CPU's GEMM peak in the row's precision (fp32 rows of the fp32 peak, bf16 rows
  of the bf16 peak), measured once per run in a worker with `--threads` threads: `torch.mm` of two 2048 x 2048
  matrices, median of 7 after 2 warm-up, printed above the table; int8 rows: of the int8 peak, `torch._int_mm`
  (int8 x int8 -> int32) of the same matrices, in GOP/s.
* roofline (ms/img), % of roofline, bound (ours): the least time per image this CPU allows the row,
  max(FLOPs / GEMM peak of the row's precision, bytes / memory bandwidth) (`benchmarks/roofline.py`); that time
  as a share of the measured time per image (100 % = on the roof); which term is the larger, "compute" or
  "memory".
  - bytes per image = (activations + weights) / batch of one forward pass at the row's batch, counted on the
    meta device by `utils.summary.forward_bytes`, a model of traffic: every aten op that computes reads each
    tensor input (activations, and weights each time an op reads them) and writes each output once; views
    count nothing; caches are ignored. Floating-point tensors count the row's element size
    (`benchmarks.roofline.ELEMENT_SIZE`: fp32 4 bytes, bf16 / fp16 2, int8 1: every tensor, as if the whole
    graph ran in int8). Infer rows count the fused module as
    `prepare_for_inference` builds it (BN folded; conv + bias + activation one op, as oneDNN runs it), a fair
    estimate of what it moves (D0 512 px fp32, batch 1: 487 MB of activations + 16.8 MB of weights; the input
    and output casts of bf16 rows are left out); engine rows too (ONNX Runtime and OpenVINO fold BN and fuse
    activations themselves; their other fusions are not modelled), and `--compile` rows (inductor's own
    fusions are not). `--no-fuse` rows count the plain eval module: an upper bound (each BN and activation a
    pass of its own). Train rows count the plain module's forward in training mode with autograd on (D0:
    1179 MB + 17.1 MB) x 3 (`TRAIN_BYTES_PER_FORWARD`, an approximation: the backward moves about twice the
    forward's bytes; the optimizer's and the EMA's passes over the weights are left out); in bf16 every
    tensor at 2 bytes, though autocast keeps BN and the weights in float32.
  - memory bandwidth: a STREAM triad `a = b + 3 c` (`torch.add(b, c, alpha=3, out=a)`) on three float32
    arrays of 256 MiB (8x the EPYC's L3), 3 x 256 MiB per triad (read b, read c, write a; STREAM's count,
    without the write-allocate read of a), in a worker with `--threads` threads, median of 7 after 2
    warm-up, printed above the table in GB/s (1e9 bytes/s).
* max |delta|: ours against the plain float32 NCHW `EfficientDet` with the same weights, on the timed input
  (infer: all head outputs; train: the head outputs of one training-mode forward with the weights after
  the timed steps). Weights are randomised (BN statistics, biases, fusion weights too) so that the outputs
  are not near-constant.

Its tables live in docs/speed.md (one per CPU; engines, allocator, larger variants, channels_last).
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.roofline import (ELEMENT_SIZE, TRAIN_BYTES_PER_FORWARD, bytes_per_image, rate,  # noqa: E402
                                 roofline_cells, triad_bytes)
from benchmarks.speed_worker import GEMM_SIDE, SETTLE_S, TRIAD_ELEMENTS  # noqa: E402
from model.config import VARIANTS  # noqa: E402
from utils.cli import number  # noqa: E402
from model.cpu import describe, unsupported_precision  # noqa: E402

WORKER = Path(__file__).resolve().parent / "speed_worker.py"
ENGINES = ("torch", "onnxruntime", "openvino")
KERNEL_RUNS = 7  # timed steps of the GEMM peaks and of the memory bandwidth
TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward (gradients of the input and of the weights)


class Worker:
    """One side of one cell (or the GEMM peak) in its own process."""

    def __init__(self, spec: dict):
        self.proc = subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.side = spec["side"]
        self.label = f"{self.side} ({spec['engine']})" if "engine" in spec else self.side

    def ask(self, command: str | None = None) -> dict:
        if command:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label} worker died (exit code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def run_cell(args, variant: str, mode: str, precision: str, batch: int, engine: str, peer: bool) -> dict:
    base = {"variant": variant, "mode": mode, "batch": batch, "size": args.size, "threads": args.threads,
            "seed": args.seed, "warmup": args.warmup, "no_fuse": args.no_fuse, "compile": args.compile,
            "no_channels_last": args.no_channels_last, "grad_checkpointing": args.grad_checkpointing}
    specs = [{**base, "side": "ours", "engine": engine, "precision": precision, "malloc": args.malloc}]
    if peer:
        specs.append({**base, "side": "effdet", "engine": "torch", "malloc": args.peer_malloc,
                      "precision": precision if args.peer_precision == "same" and precision != "int8" else "fp32"})
    # Workers start one after the other: two model builds and warm-ups at once would time each other.
    workers = []
    for spec in specs:
        workers.append(Worker(spec))
        workers[-1].ask()
    times = {w.side: [] for w in workers}
    for r in range(args.runs):
        for w in (workers if r % 2 == 0 else workers[::-1]):  # alternate who goes first
            time.sleep(SETTLE_S)
            times[w.side].append(w.ask("step")["time"])
    result = {"times": times}
    for w in workers:
        result[w.side] = w.ask("finish")
        w.close()
    return result


def kernel_seconds(args, spec: dict) -> float:
    """Median seconds of KERNEL_RUNS steps of a kernel worker (`spec` side "gemm" or "triad") with --threads
    threads, after 2 warm-up steps."""
    w = Worker({**spec, "threads": args.threads, "warmup": 2, "malloc": args.malloc})
    w.ask()
    times = [w.ask("step")["time"] for _ in range(KERNEL_RUNS)]
    w.ask("finish")
    w.close()
    return statistics.median(times)


def gemm_peak(args, precision: str) -> float:
    """GFLOP/s (int8: GOP/s) of `torch.mm` (int8: `torch._int_mm`) on two GEMM_SIDE-square matrices in
    `precision`."""
    return 2 * GEMM_SIDE ** 3 / kernel_seconds(args, {"side": "gemm", "precision": precision}) / 1e9


def memory_bandwidth(args) -> float:
    """GB/s (1e9 bytes/s) of the STREAM triad on float32 arrays of TRIAD_ELEMENTS."""
    return triad_bytes(TRIAD_ELEMENTS) / kernel_seconds(args, {"side": "triad"}) / 1e9


@functools.lru_cache(maxsize=None)
def flops_per_image(variant: str, size: int | None) -> int:
    """Forward FLOPs (2 x multiply-adds) of ours at batch 1, counted on the meta device."""
    import torch
    from model import build_model, get_config
    from utils.summary import forward_flops
    name = f"efficientdet-{variant}"
    side = size or get_config(name).image_size
    with torch.device("meta"):
        model = build_model(name).eval()
    return forward_flops(model, (1, 3, side, side))


@functools.lru_cache(maxsize=None)
def traffic(variant: str, size: int | None, mode: str, fused: bool, element_size: int, batch: int):
    """`utils.summary.Traffic` (bytes of activations, of weights) of one forward pass of ours at `batch` as the
    row runs it: the fused inference module (`fused`, infer) or the plain one in the row's mode."""
    from model import get_config
    from utils.summary import forward_bytes, meta_model
    name = f"efficientdet-{variant}"
    side = size or get_config(name).image_size
    fused = fused and mode == "infer"
    model = meta_model(name, fused=fused, training=mode == "train")
    return forward_bytes(model, (batch, 3, side, side), element_size, fused_activations=fused,
                         autograd=mode == "train")


@functools.lru_cache(maxsize=None)
def skip_reason(engine: str, mode: str, precision: str, variant: str, size: int | None) -> str | None:
    """Why the row (engine, mode, precision) cannot run here, or None."""
    if precision == "int8" and engine == "torch":
        return "int8 runs on the engines (-mode export --precision int8: NNCF, for OpenVINO and ONNX Runtime)"
    if engine != "torch":
        if mode == "train":
            return "the engines run inference only; training rows are PyTorch's (--backends torch)"
        from deploy.backends import BACKEND_FORMAT
        from deploy.export import EXPORT_PRECISIONS, check_export, require
        from model import get_config
        fmt = BACKEND_FORMAT[engine]
        config = get_config(f"efficientdet-{variant}")
        side = size or config.image_size
        try:
            require((engine,), f"--backends {engine}")
            if precision not in EXPORT_PRECISIONS[fmt]:
                return f"{engine} runs {' / '.join(EXPORT_PRECISIONS[fmt])} only (deploy.export)"
            check_export(config, fmt, (side, side), precision)  # the exporter's packages, the size
        except (RuntimeError, ValueError) as e:
            return str(e)
    return None if precision == "int8" else unsupported_precision(precision)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["d0"], metavar="VARIANT",
                        choices=[name.removeprefix("efficientdet-") for name in VARIANTS], help="d0 ... d7x, lite0 ...")
    parser.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    parser.add_argument("--backends", nargs="+", default=list(ENGINES), choices=ENGINES,
                        help="engines that run ours: a row each per precision and batch (train: torch only)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"],
                        choices=["fp32", "bf16", "fp16", "int8"], help="int8: engine rows only")
    parser.add_argument("--batches", nargs="+", type=number(int, 1), default=None,
                        help="default: 1 and 8 for infer, 4 for train")
    parser.add_argument("--size", type=number(int, 1), default=None, help="square input side (default: the variant's)")
    parser.add_argument("--runs", type=number(int, 1), default=5, help="timed steps per side (median reported)")
    parser.add_argument("--warmup", type=number(int, 0), default=2)
    parser.add_argument("--threads", type=number(int, 1), default=2,
                        help="torch / engine intra-op threads in every worker")
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
    args = parser.parse_args(argv)

    import torch
    peer = not args.no_peer
    if peer:
        try:
            import effdet  # noqa: F401
        except ImportError:
            print("effdet is not installed: `pip install -r benchmarks/requirements.txt` to compare against it; "
                  "running this repo's side alone.\n")
            peer = False
    peer_precision = "fp32" if args.peer_precision == "fp32" else None  # None: the row's
    rows, skipped = [], {}
    for variant in args.variants:
        for mode in args.modes:
            for precision in args.precisions:
                for batch in args.batches or ([1, 8] if mode == "infer" else [4]):
                    engines = dict.fromkeys(args.backends if mode == "infer" or "torch" not in args.backends
                                            else ["torch"])
                    for engine in engines:
                        reason = skip_reason(engine, mode, precision, variant, args.size)
                        if reason:
                            labels = skipped.setdefault(reason, [])
                            label = f"{variant.upper()} {mode} {engine} {precision}"
                            labels += [label] if label not in labels else []
                        else:
                            rows.append((variant, mode, precision, batch, engine))

    print(f"command: python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {args.threads} threads, {describe()}, "
          f"median of {args.runs} runs after {args.warmup} warm-up, A/B alternated")
    for reason, labels in skipped.items():
        print(f"skipped {', '.join(labels)}: {reason}")
    if not rows:
        raise SystemExit("nothing to run: every row was skipped (reasons above)")
    peaks = {}
    for precision in dict.fromkeys(["fp32", "bf16", "int8", *args.precisions]):
        reason = (None if hasattr(torch, "_int_mm") else "this torch has no torch._int_mm") if precision == "int8" \
            else unsupported_precision(precision)
        if reason:
            print(f"{precision} GEMM peak: not measured ({reason})")
        else:
            peaks[precision] = gemm_peak(args, precision)
    rates = ", ".join(f"{p} {g:.0f} G{'OP' if p == 'int8' else 'FLOP'}/s" for p, g in peaks.items())
    print(f"GEMM peak (torch.mm {GEMM_SIDE}x{GEMM_SIDE}, int8 torch._int_mm, {args.threads} threads, median of "
          f"{KERNEL_RUNS}): {rates}")
    bandwidth = memory_bandwidth(args)
    print(f"memory bandwidth (triad a = b + 3c, 3 x {TRIAD_ELEMENTS * 4 >> 20} MiB float32, {args.threads} threads, "
          f"median of {KERNEL_RUNS}): {bandwidth:.1f} GB/s\n")

    effdet_precision = "fp32" if peer_precision else "row's precision"
    columns = ["variant", "mode", "engine", "precision", "batch", "ours img/s", f"effdet img/s ({effdet_precision})",
               "ratio", "ours GFLOP/s (% of fp32 \\| bf16 GEMM peak)", "effdet GFLOP/s (% of GEMM peak)",
               "ours roofline (ms/img)", "ours % of roofline", "ours bound",
               "ours peak RSS (MB)", "effdet peak RSS (MB)", "RSS ratio", "max \\|delta\\| vs plain fp32"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for variant, mode, precision, batch, engine in rows:
        r = run_cell(args, variant, mode, precision, batch, engine, peer)
        flops = flops_per_image(variant, args.size) * (TRAIN_FLOPS_PER_FORWARD if mode == "train" else 1)
        ours = batch / statistics.median(r["times"]["ours"])
        cells = [variant.upper(), mode, engine, precision, str(batch), f"{ours:.2f}"]
        ours_rate = rate(ours, flops, peaks.get(precision))
        moved = traffic(variant, args.size, mode, engine != "torch" or not args.no_fuse, ELEMENT_SIZE[precision],
                        batch)
        nbytes = ((TRAIN_BYTES_PER_FORWARD if mode == "train" else 1)
                  * bytes_per_image(moved.activations / batch, moved.weights, batch))
        roof = roofline_cells(flops, nbytes, peaks.get(precision), bandwidth, 1 / ours)  # ours: img/s
        if peer:
            theirs = batch / statistics.median(r["times"]["effdet"])
            # Ratio of each back-to-back pair, then the median: a neighbour's load that comes and goes over
            # minutes cancels out of a pair, not always out of two separate medians.
            paired = statistics.median(t / o for o, t in zip(r["times"]["ours"], r["times"]["effdet"]))
            rss = r["effdet"]["rss_mb"]
            cells += [f"{theirs:.2f}", f"{paired:.2f}x", ours_rate,
                      rate(theirs, flops, peaks.get(peer_precision or precision)), *roof,
                      f"{r['ours']['rss_mb']:.0f}", f"{rss:.0f}", f"{r['ours']['rss_mb'] / rss:.2f}"]
        else:
            cells += ["-", "-", ours_rate, "-", *roof, f"{r['ours']['rss_mb']:.0f}", "-", "-"]
        cells.append(f"{r['ours']['delta']:.1e}")
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
