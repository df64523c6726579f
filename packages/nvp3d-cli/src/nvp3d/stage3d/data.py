"""Data of the 3D stage: the spec's splits with the 3D training targets (train) and PRQ segments (val/test).

Reuses the 2D stage's :class:`nvp3d.lightning.datamodule.NVP3DDataModule` (resumable sharded training
sampler, evaluation sharding without padding) and only changes what each sample holds: ``enable_3d`` targets
(geometry, occupancy and 3D masks at three levels, weighting), the frustum mask, and for validation/test the
evaluation segments (``eval_targets``). The multi-plane occupancy target of the 2D stage is not needed (the 2D
network is frozen) and is not built.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from datasets3d import PanopticReconstructionDataset

from nvp3d.lightning.datamodule import CachedFrames, NVP3DDataModule, dataset_config

__all__ = ["Frames3D", "NVP3DDataModule3D", "dataset_config_3d"]


def dataset_config_3d(spec: Any, split: str) -> Any:
    """``datasets3d`` config of a split with the 3D targets (and evaluation segments outside training)."""
    cfg = dataset_config(spec, split)
    return dataclasses.replace(cfg, enable_3d=True, enable_mp_occ=False, eval_targets=split != "train")


class Frames3D(CachedFrames):
    """A split's samples as the reader builds them (optionally cached in memory: small data, main-process
    loading); the 2D stage's :class:`~nvp3d.lightning.datamodule.CachedFrames` with no extra targets."""


class NVP3DDataModule3D(NVP3DDataModule):
    """The 2D data module with 3D samples (module docstring)."""

    def setup(self, stage: str | None = None) -> None:
        for split in self.splits:
            if split not in self.datasets:
                base = PanopticReconstructionDataset(dataset_config_3d(self.spec, split))
                self.datasets[split] = Frames3D(base, cache=self.cache)

    @property
    def labels(self) -> Any:
        """The label space (train ids, names, thing/stuff) of the first split."""
        return next(iter(self.datasets.values())).base.labels

    def classes(self) -> dict[int, tuple[str, bool]]:
        """class id -> (name, isthing) for PRQ."""
        lab = self.labels
        things = set(lab.thing_ids)
        return {int(c): (lab.names.get(c, str(c)), c in things) for c in lab.train_ids}
