"""A deterministic, shardable, resumable training sampler.

The order of an epoch depends only on ``(seed, epoch)``, so a resumed run can skip exactly the samples that
were consumed before the checkpoint: the sampler is told ``resume(epoch, consumed)`` and its next iteration
over that epoch starts after them. Sharding over DDP ranks works like ``DistributedSampler`` (pad by wrapping
so every rank gets the same count), which is why Lightning's own distributed sampler is switched off.

:class:`LoaderPosition` is the Trainer callback that stores how many batches of which epoch were consumed in
every checkpoint; the data module applies it to the sampler (:func:`apply_loader_position`), so a resumed run
continues with the very next batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from datasets3d.augment import AugmentKey
from pytorch_lightning.callbacks import Callback
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Shuffled (or ordered) indices for one rank; ``set_epoch`` reseeds, ``resume`` skips consumed ones.

    With ``epoch_keys`` it yields datasets3d :class:`~datasets3d.augment.AugmentKey` ``(index, epoch)``
    instead of ints: an augmented sample's draws depend on (seed, epoch, index) only, and the key carries
    the epoch into persistent loader workers, so a resumed run rebuilds exactly the same augmented samples.
    """

    def __init__(
        self, dataset_len: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
        batch_size: int = 1, drop_last: bool = True, epoch_keys: bool = False,
    ) -> None:
        if dataset_len <= 0:
            raise ValueError("the dataset split is empty: check dataset.<split>.json_path lists frames")
        self.dataset_len = dataset_len
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.epoch_keys = epoch_keys
        self.epoch = 0
        # Seeds the DataLoader's worker seeds; reseeded per epoch so they do not depend on run history.
        self.generator = torch.Generator().manual_seed(seed)
        self._resume_epoch: int | None = None
        self._resume_skip = 0
        per_rank = -(-dataset_len // world_size)
        if drop_last:
            per_rank = (per_rank // batch_size) * batch_size
            if per_rank == 0:
                raise ValueError(
                    f"training split has {dataset_len} frames, fewer than batch_size x gpus = "
                    f"{batch_size * world_size}: lower dataset.train.batch_size"
                )
        self.per_rank = per_rank

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every training epoch."""
        self.epoch = epoch
        self.generator.manual_seed(self.seed * 100003 + epoch)

    def resume(self, epoch: int, consumed: int) -> None:
        """Skip the first ``consumed`` indices of ``epoch`` (once), as restored from a checkpoint."""
        self._resume_epoch = epoch
        self._resume_skip = consumed

    def epoch_indices(self, epoch: int) -> list[int]:
        """All indices this rank sees in ``epoch``, before any resume skip."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            order = torch.randperm(self.dataset_len, generator=gen).tolist()
        else:
            order = list(range(self.dataset_len))
        total = -(-self.dataset_len // self.world_size) * self.world_size
        order = (order * (-(-total // len(order))))[:total]
        return order[self.rank : total : self.world_size][: self.per_rank]

    def __iter__(self) -> Iterator[int | AugmentKey]:
        indices = self.epoch_indices(self.epoch)
        if self._resume_epoch is not None and self._resume_epoch == self.epoch:
            indices = indices[self._resume_skip :]
            self._resume_epoch = None
        if self.epoch_keys:
            return iter([AugmentKey(i, self.epoch) for i in indices])
        return iter(indices)

    def __len__(self) -> int:
        return self.per_rank


class LoaderPosition(Callback):
    """Remembers (epoch, batches consumed in it) in every checkpoint, for an exact mid-epoch resume."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batches = 0
        self.restored: dict[str, int] | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.epoch = trainer.current_epoch
        self.batches = batch_idx + 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restored = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}
        self.epoch, self.batches = self.restored["epoch"], self.restored["batches"]

    def apply(self, sampler: ResumableSampler, batches_per_epoch: int) -> None:
        """Prepare ``sampler`` for the first epoch after a restore (no-op on a fresh run)."""
        if self.restored is None:
            return
        epoch, batches = self.restored["epoch"], self.restored["batches"]
        if batches >= batches_per_epoch:
            sampler.set_epoch(epoch + 1)
        else:
            sampler.set_epoch(epoch)
            sampler.resume(epoch, batches * sampler.batch_size)
        self.restored = None


def apply_loader_position(trainer: pl.Trainer | None, sampler: ResumableSampler,
                          batch_limit: int | None = None) -> None:
    """Find the :class:`LoaderPosition` callback of ``trainer`` and apply its restored position.

    ``batch_limit`` is the epoch length when it is capped (``limit_train_batches`` / ``iters_per_epoch``).
    """
    if trainer is None:
        return
    per_epoch = len(sampler) // sampler.batch_size
    if batch_limit:
        per_epoch = min(per_epoch, int(batch_limit))
    for cb in trainer.callbacks:
        if isinstance(cb, LoaderPosition):
            cb.apply(sampler, per_epoch)
