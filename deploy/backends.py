"""Inference backends: an exported model as the network of `eval.evaluator.Detector`.

A backend is a callable `images [N, 3, H, W] float32 -> (cls_outs, box_outs)`, lists over levels with the
plain model's layouts (`model.efficientdet.EfficientDet`), as float32 CPU tensors; our preprocessing and
post-processing run around it unchanged. Fixed-batch exports take any N (run in chunks, the last one
zero-padded). `open_backend` opens an export folder, or exports the weights on the fly into a cache folder.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from model import EfficientDet
from model.cpu import unsupported_precision, warn_if_emulated_bf16

from .export import FORMATS, export_model, require
from .quantize import DEFAULT_CALIBRATION_COUNT, Int8Options
from .sidecar import read_sidecar

BACKENDS = ("torch", "onnxruntime", "openvino")
BACKEND_FORMAT = {"onnxruntime": "onnx", "openvino": "openvino"}
OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: what NNCF left unquantized runs in f32


class ExportedNetwork:
    """Shared part: sidecar checks, batching, splitting the outputs into levels. Subclasses set `_run`
    (`np.ndarray [B, 3, H, W] -> list of np.ndarray` in the sidecar's output order)."""

    def __init__(self, folder: Path, sidecar: dict):
        if sidecar["with_nms"]:
            raise ValueError(f"{folder}: exported --with-nms (its outputs are detections); -mode eval / infer "
                             f"need an export of the plain network")
        self.folder, self.sidecar = Path(folder), sidecar
        self.image_hw = (sidecar["input"]["height"], sidecar["input"]["width"])
        batch = sidecar["input"]["batch"]
        self.batch = None if batch == "dynamic" else int(batch)
        self.num_levels = len(sidecar["outputs"]) // 2

    def check_precision(self, precision: str, backend: str) -> None:
        """An INT8 export runs as --precision int8 and only it does (its weights are quantized)."""
        if (precision == "int8") != (self.sidecar["precision"] == "int8"):
            raise ValueError(
                f"--exported {self.folder}: an INT8 export; run it with --precision int8"
                if precision != "int8" else
                f"--precision int8 with --backend {backend}: {self.folder} is a {self.sidecar['precision']} export; "
                f"export one with -mode export --precision int8 --calibration-images DIR, or pass "
                f"--calibration-images DIR here to make one")

    def __call__(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if tuple(images.shape[2:]) != self.image_hw:
            raise ValueError(f"{self.folder}: exported for {self.image_hw[0]}x{self.image_hw[1]} inputs, "
                             f"got {images.shape[2]}x{images.shape[3]}")
        array = images.detach().float().cpu().numpy()
        step = self.batch or len(array)
        chunks = []
        for start in range(0, len(array), step):
            chunk = array[start:start + step]
            pad = step - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            chunks.append([out[:len(out) - pad] for out in self._run(np.ascontiguousarray(chunk))])
        outputs = [torch.from_numpy(np.concatenate(parts)) for parts in zip(*chunks)]
        return outputs[:self.num_levels], outputs[self.num_levels:]


class OnnxRuntimeNetwork(ExportedNetwork):
    """An ONNX export on ONNX Runtime's CPU provider (fp32 only: it has no bf16 CPU kernels for this network)."""

    def __init__(self, folder: Path, sidecar: dict, precision: str = "fp32", threads: int | None = None):
        super().__init__(folder, sidecar)
        if sidecar["runtime"] != "onnx":
            raise ValueError(f"{folder}: holds a {sidecar['runtime']} model; --backend onnxruntime needs an "
                             f"ONNX export")
        if precision not in ("fp32", "int8"):
            raise ValueError(f"--precision {precision} with --backend onnxruntime: ONNX Runtime has no bf16 CPU "
                             f"kernels for this network; use --backend openvino for bf16, or fp32 or int8")
        self.check_precision(precision, "onnxruntime")
        require(("onnxruntime",), "--backend onnxruntime")
        import onnxruntime as ort
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.folder / sidecar["file"]), options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def _run(self, array: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: array})


class OpenVinoNetwork(ExportedNetwork):
    """An OpenVINO IR (or ONNX) export compiled for the CPU with `INFERENCE_PRECISION_HINT` f32 or bf16."""

    def __init__(self, folder: Path, sidecar: dict, precision: str = "fp32", threads: int | None = None):
        super().__init__(folder, sidecar)
        if precision not in OV_PRECISION:
            raise ValueError(f"--precision {precision} with --backend openvino: expected one of "
                             f"{', '.join(OV_PRECISION)}")
        reason = unsupported_precision(precision) if precision != "int8" else None  # int8: any x86-64 CPU
        if reason:
            raise ValueError(reason)
        self.check_precision(precision, "openvino")
        require(("openvino",), "--backend openvino")
        warn_if_emulated_bf16(precision)
        import openvino as ov
        config = {"INFERENCE_PRECISION_HINT": OV_PRECISION[precision]}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(self.folder / sidecar["file"])), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def _run(self, array: np.ndarray) -> list[np.ndarray]:
        results = self.request.infer({0: array})
        return [np.array(results[out]) for out in self.compiled.outputs]


NETWORKS = {"onnxruntime": OnnxRuntimeNetwork, "openvino": OpenVinoNetwork}


def _file_id(path: Path) -> str:
    stat = Path(path).resolve().stat()
    return f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def cache_key(info: dict, image_hw: tuple[int, int], fmt: str, int8: Int8Options | None = None) -> str:
    """What decides an on-the-fly export: the weight file (path, size, modification time), variant, size,
    format and the exporter's version; for INT8 also the options and each calibration file."""
    text = f"{_file_id(info['source'])}|{info['model_name']}|{image_hw}|{fmt}|{torch.__version__}"
    if int8:
        text += f"|{int8}|" + "|".join(_file_id(f) for f in int8.files)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def open_backend(backend: str, model: EfficientDet, info: dict, image_hw: tuple[int, int], precision: str = "fp32",
                 exported: str | Path | None = None, cache: str | Path = "runs/export-cache",
                 threads: int | None = None, int8: Int8Options | None = None):
    """The network for `--backend`: None for "torch" (the Detector runs `prepare_for_inference`), else an
    `ExportedNetwork` of the folder `exported`, or of an export of `model` (dynamic batch; INT8 calibrated as
    `int8` says) in `cache`, made if missing. The export must be of this variant, size and classes."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        if exported is not None or precision == "int8" or int8:
            raise ValueError(("--exported" if exported is not None else "--precision int8" if precision == "int8"
                              else "--calibration-images") + ": only used with --backend onnxruntime or openvino")
        return None
    if int8 and (precision != "int8" or exported is not None):
        raise ValueError("--calibration-images: only used with --precision int8 and without --exported (an "
                         "exported INT8 model is calibrated already)")
    if precision == "int8" and exported is None and int8 is None:
        raise ValueError(f"--precision int8 with --backend {backend}: needs --exported DIR (a -mode export "
                         f"--precision int8 folder) or --calibration-images DIR (training images) to make one")
    fmt = BACKEND_FORMAT[backend]
    if exported is None:
        require(("onnxruntime",) if backend == "onnxruntime" else ("openvino",), f"--backend {backend}")
        key = cache_key(info, image_hw, fmt, int8)
        name = f"{info['model_name']}-{image_hw[0]}x{image_hw[1]}-{fmt}{'-int8' if int8 else ''}-{key}"
        folder = Path(cache) / name
        if not (folder / "model.json").is_file():
            print(f"exporting {info['model_name']} ({info['source']}) to {fmt}{' INT8' if int8 else ''} in {folder} "
                  f"(once; reused after)")
            export_model(model, info, folder, fmt, image_hw, batch_size=None, precision=precision if int8 else "fp32",
                         int8=int8)
    else:
        folder = Path(exported)
    sidecar = read_sidecar(folder)
    if sidecar["file"] not in FORMATS.values():
        raise ValueError(f"{folder}: unknown model file {sidecar['file']}")
    names = [c["name"] for c in sidecar["classes"]]
    expected = info.get("class_names") or [f"class_{i}" for i in range(info["num_classes"])]
    if sidecar["model"] != info["model_name"] or names != list(expected):
        raise ValueError(f"--exported {folder}: an export of {sidecar['model']} with {len(names)} classes, but the "
                         f"weights are {info['model_name']} with {info['num_classes']} classes")
    if (sidecar["input"]["height"], sidecar["input"]["width"]) != tuple(image_hw):
        raise ValueError(f"--exported {folder}: exported for {sidecar['input']['height']}x"
                         f"{sidecar['input']['width']} inputs, but the image size is {image_hw[0]}x{image_hw[1]}")
    return NETWORKS[backend](folder, sidecar, precision, threads)


def network_from_args(args, model: EfficientDet, info: dict):
    """`open_backend` for the --backend / --exported / --precision / --calibration-images / --calibration-count /
    --compile / --device flags of `-mode eval` and `-mode infer` (None for the torch backend)."""
    if args.backend != "torch":
        if args.compile:
            raise ValueError(f"--compile: only used with --backend torch, not {args.backend}")
        if args.device not in ("auto", "cpu"):
            raise ValueError(f"--device {args.device}: --backend {args.backend} runs on the CPU")
    from model.config import parse_image_size
    images = getattr(args, "calibration_images", None)
    count = getattr(args, "calibration_count", None) or DEFAULT_CALIBRATION_COUNT
    int8 = Int8Options(images, count) if images else None
    return open_backend(args.backend, model, info, parse_image_size(info["image_size"]), args.precision,
                        args.exported, int8=int8)
