"""Training monitors for the progress log (``metrics.csv``): per-GPU memory and throughput per epoch.

``gpu_mem_peak_gib``: the largest CUDA memory any rank allocated during the epoch (GiB), so multi-GPU runs
show their per-GPU footprint. ``step_time_s`` / ``samples_per_s``: the median time between the starts of
consecutive training steps of the epoch (data loading, forward, backward, gradient all-reduce and optimizer
step; not the epoch-end checkpoint or validation) and the global batch (batch x processes) divided by it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


class PeakGpuMemory(Callback):
    """Resets the CUDA peak counter at each epoch start; logs the peak over all ranks at its end (GiB)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type != "cuda":
            return
        peak = torch.tensor(torch.cuda.max_memory_allocated(pl_module.device) / 2**30, device=pl_module.device)
        peak = trainer.strategy.reduce(peak, reduce_op="max")
        pl_module.log("gpu_mem_peak_gib", float(peak), on_step=False, on_epoch=True, rank_zero_only=True)


class Throughput(Callback):
    """Median step time and global samples per second of each training epoch (needs >= 2 steps)."""

    def __init__(self) -> None:
        self._starts: list[float] = []
        self._batch = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._starts = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._starts.append(time.perf_counter())
        image = batch.get("image") if isinstance(batch, dict) else None
        self._batch = int(image.shape[0]) if torch.is_tensor(image) else 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gaps = [b - a for a, b in zip(self._starts, self._starts[1:], strict=False)]
        if not gaps:
            return
        step = statistics.median(gaps)  # each rank's own; the logged values are their mean over ranks
        pl_module.log("step_time_s", step, on_step=False, on_epoch=True, sync_dist=True)
        pl_module.log("samples_per_s", self._batch * trainer.world_size / step, on_step=False, on_epoch=True,
                      sync_dist=True)
