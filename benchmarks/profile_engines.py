"""Where the time goes: our fused PyTorch network against the same network exported to ONNX Runtime (fp32) or
OpenVINO (bf16), by kind of op.

    python benchmarks/profile_engines.py                 # D0, 512 px, batch 1, fp32, 2 threads
    python benchmarks/profile_engines.py --batch 8 --runs 5
    python benchmarks/profile_engines.py --precision bf16   # against OpenVINO bf16 (ONNX Runtime has no bf16)

Network only (no post-processing, which both engines share), one process with `main.py`'s inference allocator
setting (`utils/allocator.py`), the same randomised weights on both sides (`benchmarks/speed_worker.py`: BN statistics and biases too). Printed, with the CPU:

* the median wall time per image of `--runs` unprofiled calls, engines interleaved;
* one profiled call per engine (PyTorch: the last of three), its time split by kind of op, in ms per image. PyTorch: `torch.profiler` with
  every `model.fuse.FrozenConv` call marked as a 1x1 (GEMM or oneDNN), depthwise or dense conv (the activation
  is fused into it) and the other top-level ATen ops by name; ONNX Runtime: its own session profile (one event
  per graph node, after its graph optimisations), convs classed by weight shape. "not in any op" is the
  profiled wall time minus the ops: Python and dispatch on the PyTorch side, the session's scheduling on ONNX
  Runtime's; the op count says how many calls pay that per-op cost; OpenVINO: its per-node performance
  counters (`PERF_COUNT`, one node per fused kernel of its compiled graph), convs classed by the input shapes of
  the compiled graph's node, "not in any op" the wall time of the call minus the nodes;
* each engine's `--top` costliest convs (summed over the calls with the same input and weight shapes).

The profiled call runs slower than the medians (the profiler's own cost, mostly on the PyTorch side); compare
the kinds of op within a column, and the totals with the medians.

Its tables live in docs/speed.md (Where the time goes).
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("1x1 conv / GEMM", "depthwise conv", "dense conv (stem)", "SE (mean, FCs, gate)", "max-pool",
         "upsample", "add / activation", "layout / cast / copy", "other ops", "not in any op")
_ATEN_KIND = {  # top-level ATen ops outside the marked convs
    "aten::bmm": "1x1 conv / GEMM", "aten::baddbmm": "1x1 conv / GEMM", "aten::matmul": "1x1 conv / GEMM",
    "aten::sum": "SE (mean, FCs, gate)", "aten::mul_": "SE (mean, FCs, gate)", "aten::linear": "SE (mean, FCs, gate)",
    "aten::silu": "SE (mean, FCs, gate)", "aten::sigmoid": "SE (mean, FCs, gate)", "aten::mul": "SE (mean, FCs, gate)",
    "aten::max_pool2d": "max-pool", "aten::upsample_nearest2d": "upsample",
    "aten::add": "add / activation", "aten::add_": "add / activation", "aten::silu_": "add / activation",
    "aten::relu_": "add / activation", "aten::hardtanh_": "add / activation",
    "aten::to": "layout / cast / copy", "aten::contiguous": "layout / cast / copy", "aten::clone": "layout / cast / copy",
    "aten::permute": "layout / cast / copy", "aten::view": "layout / cast / copy", "aten::reshape": "layout / cast / copy",
}
_ORT_KIND = {
    "MatMul": "1x1 conv / GEMM", "Gemm": "1x1 conv / GEMM", "FusedMatMul": "1x1 conv / GEMM",
    "GlobalAveragePool": "SE (mean, FCs, gate)", "ReduceMean": "SE (mean, FCs, gate)",
    "MaxPool": "max-pool", "Resize": "upsample", "Upsample": "upsample",
    "Add": "add / activation", "Sum": "add / activation", "Mul": "add / activation", "Sigmoid": "add / activation",
    "Relu": "add / activation", "Clip": "add / activation", "Div": "add / activation",
    "ReorderInput": "layout / cast / copy", "ReorderOutput": "layout / cast / copy", "Transpose": "layout / cast / copy",
    "Reshape": "layout / cast / copy", "Pad": "layout / cast / copy", "Slice": "layout / cast / copy",
    "Concat": "layout / cast / copy", "QuickGelu": "add / activation",  # QuickGelu: x * sigmoid(x), a fused swish
}


def conv_kind(weight_shape: list[int]) -> str:
    """Kind of a conv from its weight `[O, I/groups, kh, kw]`."""
    if weight_shape[-2:] == [1, 1]:
        return "1x1 conv / GEMM"
    return "depthwise conv" if weight_shape[1] == 1 else "dense conv (stem)"


def profile_torch(network, images) -> tuple[dict[str, float], int, collections.Counter, collections.Counter]:
    """The last of three profiled calls of our fused network -> (ms per kind, op count, ms per unclassed op name,
    ms per conv shape)."""
    import torch
    from torch.autograd.profiler import record_function

    from model.fuse import FrozenConv
    open_ranges, handles = [], []

    def enter(module, inputs):
        w = list(module.weight.shape)
        open_ranges.append(record_function(f"kind:{conv_kind(w)}|x{list(inputs[0].shape)} w{w} s{module.stride}"))
        open_ranges[-1].__enter__()

    def leave(module, inputs, output):
        open_ranges.pop().__exit__(None, None, None)

    for m in network.modules():
        if isinstance(m, FrozenConv):
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for i in range(3):  # the last call is the one read: the profiler's own start-up cost is in the first
                with record_function(f"call{i}"):
                    network(images)
    finally:
        for h in handles:
            h.remove()
    times, count, other, convs = collections.Counter(), 0, collections.Counter(), collections.Counter()
    call = next(e for e in prof.events() if e.name == "call2")
    events = [e for e in prof.events() if e.time_range.start >= call.time_range.start
              and e.time_range.end <= call.time_range.end]
    for e in events:
        if e.name.startswith("kind:"):
            kind, shapes = e.name[5:].split("|")
            times[kind] += e.cpu_time_total
            convs[f"{kind}: {shapes}"] += e.cpu_time_total / 1000
            count += 1
        elif e.name.startswith("aten::") and e.cpu_parent is not None and e.cpu_parent.name == "call2":
            times[_ATEN_KIND.get(e.name, "other ops")] += e.cpu_time_total
            if e.name not in _ATEN_KIND:
                other[e.name] += e.cpu_time_total / 1000
            count += 1
    times["not in any op"] = call.cpu_time_total - sum(times.values())
    return {k: v / 1000 for k, v in times.items()}, count, other, convs


_OV_KIND = {"MaxPool": "max-pool", "Interpolate": "upsample", "ReduceMean": "SE (mean, FCs, gate)",
            "MatMul": "1x1 conv / GEMM", "FullyConnected": "1x1 conv / GEMM", "Eltwise": "add / activation",
            "Subgraph": "add / activation",  # a JIT-fused chain of element-wise ops (sums, swish, SE gate)
            "Reorder": "layout / cast / copy", "Transpose": "layout / cast / copy", "Reshape": "layout / cast / copy",
            "Convert": "layout / cast / copy", "Concatenation": "layout / cast / copy"}


def profile_openvino(model_file: Path, array, threads: int, precision: str
                     ) -> tuple[dict[str, float], int, collections.Counter, collections.Counter]:
    """One profiled call of the OpenVINO export (after a warm-up) -> (ms per kind, node count, ms per unclassed
    node type, ms per conv shape)."""
    import openvino as ov

    from deploy.backends import OV_PRECISION
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(model_file)), "CPU", {  # as OpenVinoNetwork, counters on
        "INFERENCE_PRECISION_HINT": OV_PRECISION[precision], "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True})
    request = compiled.create_infer_request()
    for _ in range(3):
        request.infer({0: array})
    start = time.perf_counter()
    request.infer({0: array})
    wall = (time.perf_counter() - start) * 1000
    shapes = {}  # compiled node name -> its input shapes (data, weight)
    for op in compiled.get_runtime_model().get_ordered_ops():
        shapes[op.get_friendly_name()] = [[d.get_length() for d in op.input(i).get_partial_shape()]
                                          for i in range(min(op.get_input_size(), 2))]
    times, count, other, convs = collections.Counter(), 0, collections.Counter(), collections.Counter()
    for node in request.get_profiling_info():
        if node.status != node.Status.EXECUTED:
            continue
        ms = node.real_time.total_seconds() * 1000
        if node.node_type in ("Convolution", "GroupConvolution"):
            x, w = shapes[node.node_name]
            # GroupConvolution weights are [groups, O/g, I/g, kh, kw]
            kind = "depthwise conv" if node.node_type == "GroupConvolution" else conv_kind(w)
            convs[f"{kind}: x{x} w{w}"] += ms
        else:
            kind = _OV_KIND.get(node.node_type, "other ops")
            if node.node_type not in _OV_KIND:
                other[node.node_type] += ms
        times[kind] += ms
        count += 1
    times["not in any op"] = wall - sum(times.values())
    return dict(times), count, other, convs


def profile_ort(model_file: Path, array, threads: int, folder: str
                ) -> tuple[dict[str, float], int, collections.Counter, collections.Counter]:
    """One profiled call of the ONNX export on ONNX Runtime (after a warm-up) -> (ms per kind, node count, ms per
    unclassed op name, ms per conv shape)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(folder) / "ort")
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: array}
    for _ in range(3):
        session.run(None, feed)
    trace = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in trace if e.get("name") == "model_run"]
    last = runs[-1]  # the last call: warmed up
    start, end = last["ts"], last["ts"] + last["dur"]
    times, count, other, convs = collections.Counter(), 0, collections.Counter(), collections.Counter()
    for e in trace:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or not start <= e["ts"] <= end:
            continue
        op = e["args"]["op_name"]
        if op in ("Conv", "FusedConv"):
            shapes = [list(s.values())[0] for s in e["args"].get("input_type_shape", [])]
            kind = conv_kind(shapes[1])
            convs[f"{kind}: x{shapes[0]} w{shapes[1]}"] += e["dur"] / 1000
        else:
            kind = _ORT_KIND.get(op, "other ops")
            if op not in _ORT_KIND:
                other[op] += e["dur"] / 1000
        times[kind] += e["dur"]
        count += 1
    times["not in any op"] = last["dur"] - sum(times.values())
    return {k: v / 1000 for k, v in times.items()}, count, other, convs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="d0")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the variant's)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32: against ONNX Runtime; bf16: against OpenVINO bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--top", type=int, default=8, help="list each engine's N costliest conv shapes")
    args = parser.parse_args()

    from utils.allocator import reuse_freed_memory
    reuse_freed_memory()  # ours as `-mode infer` runs it (freed memory kept for reuse; the engines pool their own)
    import torch

    from benchmarks.speed_worker import SETTLE_S, _name_size, _new_model, export_plain
    from deploy.backends import OnnxRuntimeNetwork, OpenVinoNetwork
    from deploy.sidecar import read_sidecar
    from model.inference import prepare_for_inference
    from model.cpu import describe

    torch.set_num_threads(args.threads)
    peer, engine, network = (("ONNX Runtime", "onnxruntime", OnnxRuntimeNetwork) if args.precision == "fp32"
                             else ("OpenVINO", "openvino", OpenVinoNetwork))
    spec = {"variant": args.variant, "size": args.size, "side": "ours", "seed": 0, "engine": engine,
            "batch": args.batch, "precision": args.precision}
    name, size = _name_size(spec)
    images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        export_plain(spec, tmp)
        peer_net = network(Path(tmp), read_sidecar(tmp), args.precision, threads=args.threads)
        ours = prepare_for_inference(_new_model(spec).eval(), args.precision)
        engines = {"PyTorch (fused)": ours, peer: peer_net}
        seconds = collections.defaultdict(list)
        with torch.inference_mode():
            for _ in range(3):
                for net in engines.values():
                    net(images)
            for _ in range(args.runs):
                for label, net in engines.items():
                    time.sleep(SETTLE_S)  # ONNX Runtime's idle threads spin for a while after a call
                    t = time.perf_counter()
                    net(images)
                    seconds[label].append(time.perf_counter() - t)
            model_file = Path(tmp) / peer_net.sidecar["file"]
            split = {"PyTorch (fused)": profile_torch(ours, images),
                     peer: (profile_ort(model_file, images.numpy(), args.threads, tmp) if engine == "onnxruntime"
                            else profile_openvino(model_file, images.numpy(), args.threads, args.precision))}

    print(describe())
    print(f"{name}, {size} px, batch {args.batch}, {args.precision}, {args.threads} threads, network only")
    labels = list(engines)
    print("| ms per image | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    print("| median of unprofiled calls | " +
          " | ".join(f"{statistics.median(seconds[k]) * 1000 / args.batch:.1f}" for k in labels) + " |")
    print("| one profiled call | " + " | ".join(f"{sum(split[k][0].values()) / args.batch:.1f}" for k in labels) + " |")
    for kind in KINDS:
        print(f"| {kind} | " + " | ".join(f"{split[k][0].get(kind, 0.0) / args.batch:.2f}" for k in labels) + " |")
    print("| op / node calls per batch | " + " | ".join(str(split[k][1]) for k in labels) + " |")
    for label in labels:
        other = ", ".join(f"{op} {ms / args.batch:.2f}" for op, ms in split[label][2].most_common(6))
        print(f"{label}, other ops (ms per image): {other or 'none'}")
    for label in labels:
        print(f"\n{label}, costliest convs (all calls of one input and weight shape; the engines' after their "
              f"layout changes), ms per image:")
        for conv, ms in split[label][3].most_common(args.top):
            print(f"  {ms / args.batch:6.2f}  {conv}")


if __name__ == "__main__":
    main()
