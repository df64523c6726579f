"""The validation/test hooks shared by both stages' LightningModules."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

__all__ = ["EvalHooksModule"]


class EvalHooksModule(pl.LightningModule):
    """The validation/test hooks of both stages' LightningModules.

    A subclass keeps one metric per mode in ``self.metrics`` (``"val"``, ``"test"``; each with ``reset()``)
    and implements ``_eval_step(batch, mode)`` and ``_finish_eval(mode)``; ``_start_eval(mode)`` runs at the
    start of each evaluation epoch (here: reset the mode's metric). Validation ends without ``_finish_eval``
    during Lightning's sanity check.
    """

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _start_eval(self, mode: str) -> None:
        self.metrics[mode].reset()

    def on_validation_epoch_start(self) -> None:
        self._start_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval("test")

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")
