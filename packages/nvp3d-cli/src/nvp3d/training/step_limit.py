"""``train.optim.max_steps`` under every scheduler.

The trainer's ``max_steps`` was only set for WarmupPoly, so under MultiStep the key was silently ignored. It is
not passed to Lightning at all any more: a finite ``Trainer(max_steps=...)`` switches Lightning to
iteration-based restarts, in which a resume from an end-of-epoch checkpoint trained one step of the next epoch
and stopped (WarmupPoly runs did that). :class:`StepLimit` stops the fit instead (``trainer.should_stop``) once ``global_step`` reaches the limit,
also right at the start of a resumed run that is already there (which then reports "nothing to train").
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback


class StepLimit(Callback):
    """Stop training when ``trainer.global_step`` reaches ``max_steps``."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = int(max_steps)

    def _check(self, trainer: pl.Trainer) -> None:
        if self.max_steps > 0 and trainer.global_step >= self.max_steps:
            trainer.should_stop = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._check(trainer)


def configured_max_steps(trainer: pl.Trainer) -> int:
    """The step limit of a run: its :class:`StepLimit`'s, else ``trainer.max_steps`` (-1 = none)."""
    for cb in trainer.callbacks:
        if isinstance(cb, StepLimit) and cb.max_steps > 0:
            return cb.max_steps
    return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else -1
