"""The worker process of `benchmarks/speed.py`: one side of one cell, the GEMM peak or the memory bandwidth, in
its own process.

    python benchmarks/speed_worker.py SPEC_JSON            # the line protocol of `worker`
    python benchmarks/speed_worker.py --export SPEC_JSON DIR   # ours, exported as `-mode export` does

A spec names its `side`: "ours" (this repo's model, run by `engine` "torch", "onnxruntime" or "openvino"),
"effdet" (the peer), "gemm" (`torch.mm` of two 2048 x 2048 matrices in `precision`, int8: `torch._int_mm`, for
the GEMM peak) or "triad" (the STREAM triad `a = b + 3 c` on three float32 arrays of 256 MiB, for the memory
bandwidth), with the cell's variant, mode, precision, batch, size, threads, seed, warm-up, allocator and the
torch path's options (a kernel side needs only threads, warm-up, allocator and, for "gemm", precision).

The tables of `benchmarks/speed.py` live in docs/speed.md.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Pause before each timed step: ONNX Runtime's pool threads spin for a while after a run (~15 ms of CPU
# within 0.1 s of returning, D0 256 px, 2 threads; none after 0.1 s; torch and OpenVINO ~0), which would
# be taken from the next timed call (another side's, another config's).
SETTLE_S = 0.1
GEMM_SIDE = 2048  # square torch.mm operands of the GEMM peak
# Elements of each float32 array of the triad: 256 MiB, 8x the 32 MiB L3 of the AMD EPYC of docs/speed.md, so that
# each pass streams from memory (STREAM asks for 4x the last-level cache).
TRIAD_ELEMENTS = 2 ** 26


def _new_model(spec: dict):
    import torch
    from model import build_model
    from utils.random_weights import randomise_
    torch.manual_seed(spec["seed"])
    if spec["side"] == "effdet":
        from effdet import create_model
        size = _name_size(spec)[1]  # effdet builds its feature-map sizes from its config's image size
        return create_model(f"tf_efficientdet_{spec['variant']}", pretrained_backbone=False, image_size=(size, size))
    model = build_model(f"efficientdet-{spec['variant']}")
    randomise_(model, spec["seed"], keep_class_prior=True)
    return model


def _name_size(spec: dict) -> tuple[str, int]:
    from model import get_config
    name = f"efficientdet-{spec['variant']}"
    return name, spec["size"] or get_config(name).image_size


def _info(name: str) -> dict:
    """The weight description `deploy` wants (as `utils.weights.detector_from_weights` gives it)."""
    from model import get_config
    return {"model_name": name, "num_classes": get_config(name).num_classes, "source": "random weights"}


CALIBRATION_IMAGES = 16  # INT8 rows: photo-like generated images (speed does not depend on what they show)


def _calibration_folder(folder: Path, size: int, seed: int) -> Path:
    """CALIBRATION_IMAGES smooth random RGB images (upsampled noise plus grain) of `size` px, as PNG files."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for i in range(CALIBRATION_IMAGES):
        coarse = Image.fromarray(rng.integers(0, 256, (size // 16 + 1, size // 16 + 1, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.int16)
        grain = rng.integers(-20, 21, smooth.shape)
        Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def export_plain(spec: dict, folder: str) -> None:
    """Ours as `-mode export --format {onnx|openvino} --batch-size B --precision P` writes it (plain network;
    int8 calibrated on CALIBRATION_IMAGES generated images, NNCF's / ONNX Runtime's defaults)."""
    from deploy.backends import BACKEND_FORMAT
    from deploy.export import export_model
    from deploy.quantize import Int8Options
    name, size = _name_size(spec)
    int8 = None
    if spec["precision"] == "int8":
        images = _calibration_folder(Path(folder) / "calibration", size, spec["seed"])
        int8 = Int8Options(images, CALIBRATION_IMAGES)
    export_model(_new_model(spec), _info(name), Path(folder), BACKEND_FORMAT[spec["engine"]], (size, size),
                 batch_size=spec["batch"], precision=spec["precision"], int8=int8)


def _engine(spec: dict, tmp: str):
    """The exported network on ONNX Runtime / OpenVINO, as `-mode infer --backend X` opens it. The export runs
    in a child process: its own memory (tracing, conversion) is not counted in this worker's peak RSS, which
    is that of a process serving the exported model."""
    from deploy.backends import open_backend
    name, size = _name_size(spec)
    # stdout to our stderr: the exporter's progress lines must not mix with the line protocol
    subprocess.run([sys.executable, __file__, "--export", json.dumps(spec), tmp], check=True, cwd=ROOT,
                   stdout=sys.stderr)
    return open_backend(spec["engine"], None, _info(name), (size, size), spec["precision"], exported=tmp,
                        threads=spec["threads"])


def _kernel(spec: dict):
    """step() of the GEMM peak ("gemm" side, in `precision`) or of the memory bandwidth ("triad" side)."""
    import torch
    if spec["side"] == "triad":
        # Filled here, so that their pages are mapped before the warm-up.
        a, b, c = (torch.full((TRIAD_ELEMENTS,), float(i)) for i in range(3))
        return lambda: torch.add(b, c, alpha=3, out=a)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    if spec["precision"] == "int8":  # int8 x int8 -> int32 products, the GEMM of a quantised conv
        a, b = (torch.randint(-128, 128, (GEMM_SIDE, GEMM_SIDE), generator=g, dtype=torch.int8) for g in gens)
        return lambda: torch._int_mm(a, b)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["precision"]]
    a, b = (torch.randn(GEMM_SIDE, GEMM_SIDE, generator=g).to(dtype) for g in gens)
    return lambda: torch.mm(a, b)


def _build(spec: dict, tmp: str):
    """One side of one cell -> (step() returning the head outputs, images, trained model or None)."""
    import torch
    from model import AnchorGenerator, get_config
    if spec["side"] in ("gemm", "triad"):
        return _kernel(spec), None, None
    name, size = _name_size(spec)
    images = torch.randn(spec["batch"], 3, size, size, generator=torch.Generator().manual_seed(spec["seed"]))
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec["precision"])  # int8: engines only

    if spec["mode"] == "infer":
        if spec["side"] == "effdet":
            from effdet import DetBenchPredict
            bench = DetBenchPredict(_new_model(spec)).eval()  # network, anchors decode, top-5000, batched NMS

            def step():
                with torch.inference_mode(), torch.autocast("cpu", autocast or torch.bfloat16, enabled=bool(autocast)):
                    return bench(images)
            return step, images, None
        from model.postprocess import postprocess
        from utils.threads import torch_threads
        if spec["engine"] == "torch":
            from model.inference import prepare_for_inference
            # a deployment keeps only the prepared module; the delta check rebuilds the original
            network = prepare_for_inference(_new_model(spec).eval(), spec["precision"], fuse=not spec["no_fuse"],
                                            channels_last=not spec["no_channels_last"], compile=spec["compile"])
        else:
            network = _engine(spec, tmp)
        anchors = AnchorGenerator.from_config(get_config(name))((size, size))
        scales = torch.ones(spec["batch"])

        # an engine's rows: torch's part on one thread, as `eval.evaluator.Detector` runs it (utils/threads.py)
        threads = 1 if spec["engine"] != "torch" else None

        def step():  # -> head outputs, after running the `-mode infer` post-processing on them
            with torch.inference_mode(), torch_threads(threads):
                outputs = network(images)
                postprocess(*outputs, anchors, scales, (size, size), mode="infer", method="hard")
            return outputs
        return step, images, None

    from train.assign import TargetAssigner
    from train.ema import ModelEMA
    from train.loss import detection_loss
    from train.optim import build_optimizer
    model = _new_model(spec).train()
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
        with torch.autocast("cpu", autocast or torch.bfloat16, enabled=autocast is not None):
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
    if model is None:  # infer: the prepared module or engine vs a rebuild of the model it came from
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


def peak_rss_mb() -> float:
    """This process's peak resident set (Linux `VmHWM`). Not `ru_maxrss`: Linux carries the parent's peak over
    fork + exec into it, so every worker would report at least the parent's peak (~0.7-0.8 GB with torch,
    effdet and the engines imported)."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(spec: dict) -> None:
    """Line protocol on stdin/stdout: after "ready", each "step" -> {"time"}; "finish" -> {"rss_mb", "delta"}."""
    if spec["malloc"] == "reuse":
        from utils.allocator import reuse_freed_memory
        if not reuse_freed_memory(training=spec.get("mode") == "train"):  # as main.py sets it per mode
            raise RuntimeError("--malloc reuse needs glibc (Linux)")
    import torch
    torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory(prefix="speed-export-") as tmp:  # an engine's export, until the end
        step, images, model = _build(spec, tmp)
        for _ in range(spec["warmup"]):
            step()
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            if line.strip() == "step":
                t = time.perf_counter()
                step()
                print(json.dumps({"time": time.perf_counter() - t}), flush=True)
            elif line.strip() == "finish":
                rss_mb = peak_rss_mb()  # before the delta check
                delta = _max_delta(spec, step, images, model) if spec["side"] == "ours" else None
                print(json.dumps({"rss_mb": rss_mb, "delta": delta}), flush=True)
                return


if __name__ == "__main__":
    if sys.argv[1] == "--export":
        export_plain(json.loads(sys.argv[2]), sys.argv[3])
    else:
        worker(json.loads(sys.argv[1]))
