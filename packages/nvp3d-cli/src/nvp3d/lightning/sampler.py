"""A deterministic, shardable, resumable training sampler.

The order of an epoch depends only on ``(seed, epoch)``, so a resumed run can skip exactly the samples that
were consumed before the checkpoint: the sampler is told ``resume(epoch, consumed)`` and its next iteration
over that epoch starts after them. Sharding over DDP ranks works like ``DistributedSampler`` (pad by wrapping
so every rank gets the same count), which is why Lightning's own distributed sampler is switched off.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Shuffled (or ordered) indices for one rank; ``set_epoch`` reseeds, ``resume`` skips consumed ones."""

    def __init__(
        self, dataset_len: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
        batch_size: int = 1, drop_last: bool = True,
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

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices(self.epoch)
        if self._resume_epoch is not None and self._resume_epoch == self.epoch:
            indices = indices[self._resume_skip :]
            self._resume_epoch = None
        return iter(indices)

    def __len__(self) -> int:
        return self.per_rank
