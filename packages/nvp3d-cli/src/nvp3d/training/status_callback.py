"""Writes training progress and KPIs into the action's ``status.json`` (rank 0 only).

At each training epoch end a RUNNING record with the toolkit's fields (epoch, step, max_epoch, max_step,
time_per_epoch, time_per_step, eta) is written; KPIs collected after validation (``kpi`` argument of
:meth:`StatusCallback.set_kpi`, e.g. PQ and depth-aware PQ) are merged into the logger's persistent KPI
dict so that they appear on that and every later record. The final SUCCESS/FAILURE record is written by
the action (``nvp3d.status.status_run``), not here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from nvp3d.status import StatusLogger
from nvp3d.training.step_limit import configured_max_steps


class StatusCallback(Callback):
    """Epoch records and KPIs for ``status.json``."""

    def __init__(self, status: StatusLogger | None) -> None:
        self.status = status
        self._epoch_start = 0.0
        self._epoch_steps_start = 0
        self._pending_kpi: dict[str, Any] = {}
        self.records: list[dict[str, Any]] = []

    def set_kpi(self, kpi: Mapping[str, Any]) -> None:
        """Queue KPIs (e.g. from validation) to be written with the next epoch record."""
        self._pending_kpi.update(kpi)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_steps_start = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        elapsed = time.perf_counter() - self._epoch_start
        steps = max(1, trainer.global_step - self._epoch_steps_start)
        max_epoch = int(trainer.max_epochs or 0)
        remaining_epochs = max(0, max_epoch - trainer.current_epoch - 1)
        limit = configured_max_steps(trainer)  # train.optim.max_steps (StepLimit), else Lightning's
        by_epochs = trainer.num_training_batches * max_epoch
        max_step = int(by_epochs) if limit <= 0 else limit if by_epochs == float("inf") else int(min(limit, by_epochs))
        eta = remaining_epochs * elapsed
        if limit > 0:
            eta = min(eta, max(0, limit - trainer.global_step) * elapsed / steps)
        train_loss = trainer.callback_metrics.get("train_loss_epoch")
        kpi = dict(self._pending_kpi)
        if train_loss is not None:
            kpi["train_loss"] = float(train_loss)
        self._pending_kpi.clear()
        if self.status is None or not trainer.is_global_zero:
            return
        record = self.status.epoch_end(
            epoch=trainer.current_epoch, max_epoch=max_epoch, step=trainer.global_step, max_step=max_step,
            time_per_epoch=_fmt_seconds(elapsed), time_per_step=_fmt_seconds(elapsed / steps),
            eta=_fmt_seconds(eta), kpi=kpi or None,
        )
        self.records.append(record)


def _fmt_seconds(seconds: float) -> str:
    """``H:MM:SS.ss`` like ``datetime.timedelta`` (the toolkit's format)."""
    hours, rest = divmod(max(0.0, seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{int(hours)}:{int(minutes):02d}:{secs:05.2f}"
