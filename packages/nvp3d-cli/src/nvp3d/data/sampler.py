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

    With ``epoch_keys`` it yields datasets3d :class:`~datasets3d.augment.AugmentKey` ``(index, draw)``
    instead of ints: an augmented sample's draws depend on (seed, draw, index) only, and the key carries
    the draw number into persistent loader workers, so a resumed run rebuilds exactly the same augmented samples.

    ``passes``: how many shuffled passes over the split one epoch holds (``train.iters_per_epoch`` longer than
    one pass). Each pass has its own order and augmentation draws (draw ``epoch * passes + pass``). Why: a loader
    refills its pipeline at every epoch start, so on a small split with a large batch the epoch boundaries, not
    the steps, set the pace (one boundary per 11 steps in the learning benchmark).
    """

    def __init__(
        self, dataset_len: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
        batch_size: int = 1, drop_last: bool = True, epoch_keys: bool = False, passes: int = 1,
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
        if passes < 1:
            raise ValueError(f"ResumableSampler: passes must be >= 1, got {passes}")
        self.passes = passes
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
        self.per_pass = per_rank
        self.per_rank = per_rank * passes

    @classmethod
    def passes_for(cls, dataset_len: int, batch_size: int, world_size: int, iters_per_epoch: int | None) -> int:
        """Passes one epoch needs to hold ``iters_per_epoch`` batches per rank (1 when it is unset or shorter)."""
        if not iters_per_epoch:
            return 1
        per_pass = -(-dataset_len // world_size) // batch_size  # 0: too few frames, which the sampler reports
        return max(1, -(-int(iters_per_epoch) // per_pass)) if per_pass > 0 else 1

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every training epoch."""
        self.epoch = epoch
        self.generator.manual_seed(self.seed * 100003 + epoch)

    def resume(self, epoch: int, consumed: int) -> None:
        """Skip the first ``consumed`` indices of ``epoch`` (once), as restored from a checkpoint."""
        self._resume_epoch = epoch
        self._resume_skip = consumed

    def _pass_indices(self, draw: int) -> list[int]:
        """This rank's indices of one pass over the split, shuffled by ``draw``."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100003 + draw)
            order = torch.randperm(self.dataset_len, generator=gen).tolist()
        else:
            order = list(range(self.dataset_len))
        total = -(-self.dataset_len // self.world_size) * self.world_size
        order = (order * (-(-total // len(order))))[:total]
        return order[self.rank : total : self.world_size][: self.per_pass]

    def epoch_draws(self, epoch: int) -> list[int]:
        """The draw number of every index of ``epoch`` (its pass: ``epoch * passes + pass``)."""
        return [epoch * self.passes + p for p in range(self.passes) for _ in range(self.per_pass)]

    def epoch_indices(self, epoch: int) -> list[int]:
        """All indices this rank sees in ``epoch``, before any resume skip."""
        return [i for p in range(self.passes) for i in self._pass_indices(epoch * self.passes + p)]

    def __iter__(self) -> Iterator[int | AugmentKey]:
        indices = self.epoch_indices(self.epoch)
        draws = self.epoch_draws(self.epoch)
        if self._resume_epoch is not None and self._resume_epoch == self.epoch:
            indices, draws = indices[self._resume_skip :], draws[self._resume_skip :]
            self._resume_epoch = None
        if self.epoch_keys:
            return iter([AugmentKey(i, d) for i, d in zip(indices, draws)])
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
