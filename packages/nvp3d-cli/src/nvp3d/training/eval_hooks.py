"""The validation/test hooks and the train/eval mode rule shared by both stages' LightningModules."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from nvp3d.training.optim import align_fused_after_resume

__all__ = ["EvalHooksModule"]


class EvalHooksModule(pl.LightningModule):
    """The validation/test hooks of both stages' LightningModules.

    A subclass keeps one metric per mode in ``self.metrics`` (``"val"``, ``"test"``; each with ``reset()``)
    and implements ``_eval_step(batch, mode)`` and ``_finish_eval(mode)``; ``_start_eval(mode)`` runs at the
    start of each evaluation epoch (here: reset the mode's metric). Validation ends without ``_finish_eval``
    during Lightning's sanity check.

    Train/eval mode: Lightning never calls ``train()`` when fitting starts, and after a validation it restores
    every submodule's ``training`` flag from a snapshot; neither goes through the networks' own ``train()``
    overrides, which keep frozen parts (the 2D network in the 3D stage, a frozen aggregator) in eval mode.
    Without them the frozen 2D network would run the 3D stage with batch-norm batch statistics (and update
    its running statistics) and dropout. So fitting starts and every in-fit validation ends with
    ``self.train()``. Fitting also starts by setting AdamW's ``fused`` flag for this run's device and precision
    (:func:`nvp3d.training.optim.align_fused_after_resume`; a resumed optimizer state carries the saved one).
    """

    def on_train_start(self) -> None:
        self.train()
        spec = getattr(self, "spec", None)
        if spec is not None and self._trainer is not None:
            align_fused_after_resume(self.trainer.optimizers, spec.train.precision)

    def on_validation_model_train(self) -> None:
        if self.trainer.state.fn == "fit":
            self.train()

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
