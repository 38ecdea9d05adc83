"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (what cluster schedulers send before
pre-empting a job).

The first signal is only remembered: the training loop finishes its current step, writes `last.pth`
atomically and raises `Interrupted`, which `main.py` turns into one line (`interrupted at step N; resume with
--resume`) and exit status 130 (SIGINT) / 143 (SIGTERM), the shell's 128 + signal number. A second signal
gets the default action, which ends the process at once (even inside a long native op).

Under `torchrun`, the agent forwards the signal it receives to every worker, and a Ctrl-C in a terminal also
reaches the workers directly: a worker may get the same SIGINT twice, so there a repeat is not an abort (the
agent kills workers that are still alive 30 s after its signal). The ranks agree on the stop through
`poll`, an all-reduce every step, so all of them stop after the same step.
"""
from __future__ import annotations

import os
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Training stopped on a signal after `step`, with `last.pth` saved; `exit_code` is 128 + the signal."""

    def __init__(self, step: int, signum: int, speak: bool = True):
        super().__init__(f"interrupted at step {step}; resume with --resume")
        self.step, self.exit_code, self.speak = step, 128 + signum, speak


class StopRequests:
    """`with StopRequests(dist, device) as stop:` installs the handlers (main thread only) for the block.

    `stop.poll(bad_images)` -> `(signum, bad_images summed over ranks)`; `signum` is 0, or the signal (SIGTERM
    when any rank got one, else SIGINT) when any rank was signalled. Every rank must call it at the same points.
    """

    def __init__(self, dist, device):
        """`dist`: `train.distributed.DistInfo`; `device`: the torch.device of the all-reduce."""
        self.dist, self.device = dist, device
        self.signum = 0
        self.pid = os.getpid()
        self.under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        except ValueError:  # not the main thread: signals stay as they are
            self._previous = {}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self.pid:  # a DataLoader worker forked from this process: the trainer decides
            return
        if self.signum:  # a repeat under torchrun (forwarded by the agent)
            return
        self.signum = signum
        if not self.under_torchrun:
            for s in SIGNALS:  # the next signal ends the process at once
                signal.signal(s, signal.SIG_DFL)
        name = signal.Signals(signum).name
        again = "" if self.under_torchrun else "; send it again to abort at once"
        os.write(2, f"\n{name}: finishing the current step, then saving last.pth{again}\n".encode())

    def poll(self, bad_images: int = 0) -> tuple[int, int]:
        from train.distributed import all_sum  # torch: imported by the trainer anyway, not by main.py
        sigint, sigterm, bad = all_sum([int(self.signum == signal.SIGINT), int(self.signum == signal.SIGTERM),
                                        bad_images], self.dist, self.device)
        return (signal.SIGTERM if sigterm else signal.SIGINT if sigint else 0), bad
