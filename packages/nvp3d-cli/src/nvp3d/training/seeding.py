"""Per-step reseeding, so that random choices inside a training step (point sampling in the losses and
the matcher, dropout) depend only on (seed, global step, rank) and a resumed run reproduces them exactly."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 32-bit seed for optimizer step ``step`` on ``rank``."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**32)


def seed_everything_for_step(seed: int, step: int, rank: int) -> None:
    """Seed torch (CPU and CUDA), numpy and ``random`` for one training step."""
    value = step_seed(seed, step, rank)
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


class StepSeed(Callback):
    """Reseeds every RNG at the start of each training batch from (seed, global_step, rank)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        seed_everything_for_step(self.seed, trainer.global_step, trainer.global_rank)
