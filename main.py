"""EfficientDet command line: `python main.py -mode MODE [flags]`; `python main.py -mode MODE --help` lists
the flags of a mode with their defaults. Flags that a mode does not use are errors."""
from __future__ import annotations

import argparse
import importlib
import signal
import sys

from utils.allocator import reuse_freed_memory

# mode -> (module, function adding the mode's flags, function running it, description)
MODES = {
    "trainval": ("train.cli", "add_trainval_args", "run_train",
                 "train (official recipe) and evaluate the EMA weights on the val split after each epoch"),
    "train": ("train.cli", "add_train_only_args", "run_train", "train without validation"),
    "eval": ("eval.cli", "add_eval_args", "run_eval",
             "COCO evaluation (official soft-NMS path) of --pretrained or --weights on a COCO-format dataset"),
    "infer": ("eval.infer", "add_infer_args", "run_infer",
              "detect objects in images (drawn PNGs) or a video / camera (annotated MP4), and detections.json"),
    "summary": ("utils.summary", "add_summary_args", "run_summary", "parameter and FLOP counts of the variants"),
    "export": ("deploy.cli", "add_export_args", "run_export",
               "export --pretrained or --weights to ONNX or OpenVINO IR with a JSON sidecar"),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None/False (those helps say what happens instead)."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser(mode: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py", formatter_class=_HelpFormatter,
        description="EfficientDet D0-D7x, faithful to the official TF implementation. "
                    + ("; ".join(f"{m}: {spec[3]}" for m, spec in MODES.items()) if mode is None else MODES[mode][3]))
    parser.add_argument("-mode", required=True, choices=list(MODES), help="what to do")
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's default allocator behaviour: lower peak RSS, slower on CPU (by default "
                             "freed memory is kept for reuse, see utils/allocator.py)")
    if mode is not None:
        module, add_args, _, _ = MODES[mode]
        getattr(importlib.import_module(module), add_args)(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse in two steps: -mode first, then exactly the flags of that mode (anything else is an error)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-mode", choices=list(MODES))
    known, _ = pre.parse_known_args(argv)
    return build_parser(known.mode).parse_args(argv)


def main(argv=None) -> int:
    """Run a mode; returns the exit status: 0, or 2 for an error (said in one line). A training run stopped by
    SIGINT / SIGTERM raises SystemExit(130 / 143) (`train.cli.run_train`)."""
    args = parse_args(argv)
    if not args.system_malloc:
        reuse_freed_memory(training=args.mode in ("train", "trainval"))
    module, _, run, _ = MODES[args.mode]
    try:
        getattr(importlib.import_module(module), run)(args)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop: nothing to save
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except (ValueError, OSError, RuntimeError) as e:  # user-facing problems: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
