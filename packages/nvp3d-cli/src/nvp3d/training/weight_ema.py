"""``train.ema_decay``: an exponential moving average of the trained weights, which the checkpoints hold.

A small model trained for a few hundred steps ends wherever its last steps left it: on the demo, float rounding
alone moved one seed's held-out things PQ by 5-8 points (README). An average of the weights over the last steps
is a flatter point of the same trajectory. With ``train.ema_decay`` > 0 the run keeps that average next to the
weights it trains and uses it wherever a trained model is used:

* in-fit validation runs on the average;
* every checkpoint's ``state_dict`` is the average, so ``evaluate``, ``inference``, ``export`` and a 3D stage's
  ``train.checkpoint_2d`` read it like any checkpoint; the weights being trained are kept beside it
  (``ema_current_state``) with the number of updates, so a resumed run continues both exactly;
* when training ends, the module holds the average (a checkpoint saved afterwards still holds both).

Early steps would drag a plain average towards the random initialisation, so update ``n`` (from 0) uses the
decay ``min(ema_decay, (1 + n) / (10 + n))``. Floating-point parameters and buffers (batch-norm running statistics)
are averaged; integer buffers are taken as they are.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

__all__ = ["CURRENT_STATE_KEY", "EMA_STATE_KEY", "WeightEMA", "ema_decay_at"]

#: checkpoint key of the weights being trained (``state_dict`` holds the average)
CURRENT_STATE_KEY = "ema_current_state"
#: checkpoint key of the average's own state (decay, updates)
EMA_STATE_KEY = "ema"


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (0-based): ``min(decay, (1 + n) / (10 + n))``."""
    return min(float(decay), (1.0 + updates) / (10.0 + updates))


class WeightEMA(Callback):
    """Keeps the moving average of a LightningModule's floating-point state (module docstring)."""

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) to average (0 turns it off), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self._last_step = -1
        self._names: list[str] = []
        self._tensors: list[torch.Tensor] = []  # the module's own parameter and buffer tensors, in _names order
        self._average: list[torch.Tensor] = []
        self._resumed: dict[str, torch.Tensor] | None = None
        self._ended = False  # after on_train_end the module holds the average and _average the trained weights

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = pl_module.state_dict(keep_vars=True)
        self._names = [n for n, t in state.items() if torch.is_floating_point(t)]
        self._tensors = [state[n].data for n in self._names]
        self._average = [t.detach().clone() for t in self._tensors]
        self._ended = False
        if self._resumed is not None:
            self._take_resumed()

    def _take_resumed(self) -> None:
        with torch.no_grad():
            for name, avg in zip(self._names, self._average):
                if name in self._resumed:
                    avg.copy_(self._resumed[name])
        self._resumed = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the loops' state is restored: a resumed run's global step is known only now
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step <= self._last_step:  # no optimizer step (accumulation, or a skipped step)
            return
        self._last_step = trainer.global_step
        weight = 1.0 - ema_decay_at(self.decay, self.updates)
        with torch.no_grad():
            torch._foreach_lerp_(self._average, self._tensors, weight)
        self.updates += 1

    def _swap(self) -> None:
        with torch.no_grad():
            for live, avg in zip(self._tensors, self._average):
                held = live.clone()
                live.copy_(avg)
                avg.copy_(held)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and self._average:
            self._swap()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and self._average:
            self._swap()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The module takes the average; the trained weights stay here, so a checkpoint saved after training still
        holds both (:meth:`on_save_checkpoint`)."""
        if self._average and not self._ended:
            self._swap()
            self._ended = True

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if not self._average:
            return
        module_state = checkpoint["state_dict"]
        other = dict(module_state)
        for name, held in zip(self._names, self._average):
            if name in other:
                other[name] = held.detach().to(module_state[name].device, copy=True)
        # while training the module holds the trained weights and this callback the average; after it, the reverse
        averaged, current = (module_state, other) if self._ended else (other, module_state)
        checkpoint[CURRENT_STATE_KEY] = current
        checkpoint["state_dict"] = averaged
        checkpoint[EMA_STATE_KEY] = {"decay": self.decay, "updates": self.updates}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """A resumed run: the module was loaded with the average; put the trained weights back and keep the
        average for :meth:`on_fit_start`. A checkpoint without an average starts one from its weights."""
        if CURRENT_STATE_KEY not in checkpoint:
            return
        self._resumed = dict(checkpoint["state_dict"])
        self.updates = int(checkpoint.get(EMA_STATE_KEY, {}).get("updates", 0))
        pl_module.load_state_dict(checkpoint[CURRENT_STATE_KEY])
        if self._average:  # restored after on_fit_start (strategies that restore after their setup)
            self._take_resumed()
