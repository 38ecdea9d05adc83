"""`--tensorboard`: the records of `metrics.jsonl` also as TensorBoard scalars, in `RUN_DIR/tensorboard`.

Written through `torch.utils.tensorboard`, which needs the `tensorboard` package (not a dependency of the
project: `pip install tensorboard`). View with `tensorboard --logdir RUN_DIR`.
"""
from __future__ import annotations

from pathlib import Path

# Record keys that are positions or bookkeeping, not curves.
_NOT_SCALARS = ("type", "epoch", "step", "images", "time")


def summary_writer_class() -> type:
    """`torch.utils.tensorboard.SummaryWriter`, or a one-line RuntimeError when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise RuntimeError("--tensorboard: the tensorboard package is not installed (pip install tensorboard)") from e
    return SummaryWriter


class TensorBoardLog:
    """Scalars `<type>/<key>` (e.g. `train/loss`, `eval/AP50`) at x = training images seen (else step)."""

    def __init__(self, run_dir: str | Path):
        self.writer = summary_writer_class()(log_dir=str(Path(run_dir) / "tensorboard"))

    def add(self, record: dict) -> None:
        x = record.get("images", record["step"])
        for key, value in record.items():
            if key not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{record['type']}/{key}", value, global_step=x)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
