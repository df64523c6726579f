"""Stopping a training run cleanly on SIGTERM (a scheduler's or ``kill``'s stop) and SIGINT (Ctrl-C).

Lightning's own SIGTERM handling only raises a ``SystemExit`` without a code at the end of the epoch, which
the runner took for a successful finish (exit 0, status SUCCESS after 1 of 3 epochs), and its Ctrl-C handling
exits with 1. :class:`GracefulStop` replaces both while the training loop runs: the signal only sets a flag;
at the end of the current step the callback writes a resumable checkpoint (atomically, through
:class:`~nvp3d.training.checkpointing.PeriodicCheckpoint`, which also moves the latest pointer) and raises
:class:`TrainingInterrupted`, which the runner turns into a FAILURE record naming the step and exit code
143 (SIGTERM) or 130 (SIGINT). A second Ctrl-C stops at once. Rerunning the same command resumes.
In DDP runs the flag is OR-reduced over the ranks every step, so all of them save and stop together.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from nvp3d.errors import ExitCode

log = logging.getLogger("nvp3d.train")

HANDLED = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; carries the exit code 143 or 130."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        self.exit_code = ExitCode.INTERRUPTED if signum == signal.SIGINT else ExitCode.TERMINATED
        #: extra fields of the FAILURE record in status.json
        self.status_fields = {"interrupted": signal.Signals(signum).name, "step": step,
                              "checkpoint": str(checkpoint) if checkpoint else None}
        saved = f"saved {checkpoint}" if checkpoint else "no checkpoint could be written"
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; {saved}: rerun the same "
                         "command to resume")


class GracefulStop(Callback):
    """Turns SIGTERM/SIGINT during ``fit`` into checkpoint-then-:class:`TrainingInterrupted` at a step boundary."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum
        log.warning("received %s: stopping after this step with a checkpoint (Ctrl-C again to stop at once)",
                    signal.Signals(signum).name)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning registered its own handlers: ours replace them while the loop runs
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in HANDLED:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handler)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        from nvp3d.training.checkpointing import PeriodicCheckpoint

        saved: Path | None = None
        for cb in trainer.callbacks:
            if isinstance(cb, PeriodicCheckpoint):
                saved = cb.saved[-1] if cb.saved and cb._last_saved_step == trainer.global_step else cb.save(trainer)
        raise TrainingInterrupted(self.received or signal.SIGTERM, trainer.global_step, saved)


def lightning_exit_as_interrupt(trainer: pl.Trainer, exc: SystemExit) -> BaseException:
    """What to raise for a ``SystemExit`` out of ``trainer.fit``.

    Lightning handles a Ctrl-C outside our handlers (data setup, validation) with ``sys.exit(1)``, and its own
    SIGTERM handling with a code-less ``SystemExit`` that read as success: both become interruptions
    (exit 130 / 143, status FAILURE). Any other exit is passed on unchanged.
    """
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    if isinstance(exc, SIGTERMException) or getattr(trainer, "received_sigterm", False):
        return TrainingInterrupted(signal.SIGTERM, trainer.global_step, None)
    if trainer.interrupted and exc.code == 1:
        return KeyboardInterrupt()
    return exc
