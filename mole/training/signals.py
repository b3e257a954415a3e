"""Stop a run cleanly on a signal: SIGTERM (what SLURM sends before a time limit or on preemption), SIGINT
(Ctrl-C), and SIGUSR2 under submitit (its "time is nearly up" signal).

The first signal only sets a flag. The training loop reads it at the next step boundary (all processes
agree on it through one all-reduce, so every rank stops after the same step); the run then writes a
resumable checkpoint whether or not ``trainer.save_every`` is set, writes ``metrics.json`` with
``interrupted: true`` and the step, and raises :class:`RunInterrupted`. ``mole-train`` prints one line,
``mole-train: interrupted at step N; resume with trainer.resume=true``, and exits ``128 + signal``
(143 for SIGTERM, 130 for SIGINT). A second signal ends the process at once, without a checkpoint.

Under submitit the handler it had installed for the signal (submitit requeues the job on SIGUSR2) is
called after the checkpoint is written, so a requeued job finds it and resumes (:func:`requeued`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from types import FrameType

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

HANDLED = ("SIGTERM", "SIGINT", "SIGUSR2")


class RunInterrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt: a request to stop, not an error
    """The run stopped at a step boundary after a signal; its checkpoint and ``metrics.json`` are written.

    A ``BaseException`` (like :class:`KeyboardInterrupt`): ``except Exception`` blocks that record
    failures let it through, so an interrupted run is never recorded as failed.
    """

    def __init__(self, step: int, signum: int):
        super().__init__(step, signum)
        self.step, self.signum = step, signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    def line(self, prog: str) -> str:
        return f"{prog}: interrupted at step {self.step}; resume with trainer.resume=true"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


class StopRequest:
    """Signal handlers that ask the run to stop; a context manager that installs and restores them."""

    def __init__(self, prog: str = "mole-train"):
        self.prog = prog
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread (a threaded sweep job)
        for name in HANDLED:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            previous = signal.getsignal(signum)
            if name == "SIGUSR2" and not callable(previous):
                continue  # only where someone (submitit) handles it: its default action is to end the process
            self._previous[signum] = previous
            signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            # tqdm.write: on a line of its own, not after the progress bar
            tqdm.write(f"{self.prog}: {signal_name(signum)} again; stopping now without a checkpoint", file=sys.stderr)
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        log.warning("%s received: stopping after this step with a checkpoint (a second signal stops at once)",
                    signal_name(signum))

    def agreed(self, accelerator) -> int | None:
        """The signal any process received (``None`` if none): the same answer on every process.

        Several processes: one all-reduce (max) of a scalar; every process must call it at the same point.
        """
        local = self.signum or 0
        if accelerator is not None and accelerator.num_processes > 1:
            flag = torch.tensor([local], dtype=torch.int64, device=accelerator.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            local = int(flag.item())
        return local or None

    def chain(self) -> None:
        """After the checkpoint: call the handler that was installed before ours for the received signal
        (submitit's requeue on SIGUSR2), unless it is Python's own Ctrl-C handler."""
        previous = self._previous.get(self.signum) if self.signum else None
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.signum, None)


def requeued() -> bool:
    """Whether this is a SLURM job that was requeued (after a preemption or submitit's time-limit requeue):
    it then resumes from its newest checkpoint."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False
