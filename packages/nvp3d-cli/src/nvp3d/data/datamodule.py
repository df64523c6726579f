"""``NVP3DDataModule``: the spec's dataset splits as ``datasets3d`` datasets and resumable loaders, either stage.

Each split (``dataset.train|val|test``) becomes a :class:`datasets3d.PanopticReconstructionDataset`.

* ``stage="2d"``: samples get their multi-plane occupancy target (``occupancy_planes``) in the loader workers;
  the 3D volumes are dropped.
* ``stage="3d"``: samples hold the ``enable_3d`` targets (geometry, occupancy and 3D masks at three levels,
  weighting), the frustum mask, and for validation/test the PRQ evaluation segments (``eval_targets``). The
  multi-plane occupancy target is not built (the 2D network is frozen in the 3D stage).

The training loader uses :class:`~nvp3d.data.sampler.ResumableSampler` (sharded over DDP ranks, exact
mid-epoch resume); validation and test loaders shard frames over ranks without padding so that every frame
counts once.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from datasets3d import (
    DatasetConfig,
    PanopticReconstructionDataset,
    collate_samples,
    is_remote,
    resolve_dataset_path,
)
from datasets3d.augment import AugmentKey, augmentation_enabled
from datasets3d.errors import RemoteAccessError, RemoteSupportError
from torch.utils.data import DataLoader, Dataset, Sampler

from nvp3d.config.presets import get_preset
from nvp3d.data.augmentation import train_augmentation_fields
from nvp3d.data.sampler import ResumableSampler, apply_loader_position
from nvp3d.data.targets import mp_occ_planes

SPLITS = ("train", "val", "test")

#: spec dataset names -> datasets3d reader names (the toolkit's synthetic_* names use the 3D-FRONT layout)
READER_NAMES = {"front3d": "front3d", "matterport": "matterport", "synthetic": "synthetic",
                "synthetic_hospital": "front3d", "synthetic_warehouse": "front3d"}


class DataSpecError(ValueError):
    """A dataset key of the spec is missing or inconsistent (message names the key and the fix)."""


def local_dataset_path(location: str, key: str) -> Path:
    """A local path for a dataset location of the spec: plain paths as they are, ``file://`` URLs as their path,
    ``s3://``/``gs://``/... mirrored into the cache (:func:`datasets3d.resolve_dataset_path`: ``$NVP3D_CACHE``,
    only changed objects are downloaded). Remote failures become one-line data errors naming ``key``."""
    try:
        return Path(resolve_dataset_path(location))
    except (RemoteSupportError, RemoteAccessError) as exc:
        raise DataSpecError(f"{key}: {exc}") from None
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{key}: {exc}") from None


def _split_file(location: str, key: str) -> str:
    """A dataset file of the spec as the reader takes it: a URL mirrored to its local copy; a relative path
    that exists from the working directory made absolute (the toolkit opens these paths as given, e.g.
    ``data/synthetic/meta/train.json``); any other relative path is left to be read below ``base_dir``."""
    if is_remote(location):
        return str(local_dataset_path(location, key))
    path = Path(location)
    if not path.is_absolute() and path.is_file():
        return str(path.resolve())
    return location


def dataset_config(spec: Any, split: str, voxel_size: float | None = None, stage: str = "2d") -> DatasetConfig:
    """The ``datasets3d`` configuration of one split of the spec for the ``stage`` (``"2d"`` or ``"3d"``)."""
    ds = spec.dataset
    sp = getattr(ds, split)
    if not sp.base_dir:
        raise DataSpecError(f"dataset.{split}.base_dir is empty: set it to the dataset root folder")
    if not sp.json_path:
        raise DataSpecError(f"dataset.{split}.json_path is empty: set it to the split list, e.g. meta/{split}.json")
    root = local_dataset_path(sp.base_dir, f"dataset.{split}.base_dir")  # s3://... is mirrored into the cache
    if not root.is_dir():
        raise FileNotFoundError(f"dataset.{split}.base_dir={sp.base_dir} does not exist or is not a folder")
    json_path = _split_file(sp.json_path, f"dataset.{split}.json_path")
    label_map = _split_file(ds.label_map or "meta/colormap.json", "dataset.label_map")
    frustum = _split_file(ds.frustum_mask_path, "dataset.frustum_mask_path") if ds.frustum_mask_path else None
    cfg = DatasetConfig(
        name=READER_NAMES[ds.name], root=root, json_path=json_path, label_map=label_map,
        frustum_mask_path=frustum, split=split, contiguous_id=True if ds.name == "synthetic" else ds.contiguous_id,
        target_size=tuple(ds.target_size), reduced_target_size=tuple(ds.reduced_target_size),
        depth_size=tuple(ds.depth_size), depth_min=ds.depth_min, depth_max=ds.depth_max,
        voxel_size=voxel_size if voxel_size is not None else spec.model.projection.voxel_size,
        truncation_range=tuple(ds.truncation_range), occ_truncation_lvl=tuple(ds.occ_truncation_lvl),
        iso_value=ds.iso_value, downsample_factor=ds.downsample_factor,
        min_instance_pixels=ds.min_instance_pixels, ignore_label=ds.ignore_label, enable_3d=False,
        enable_mp_occ=ds.enable_mp_occ, num_thing_classes=ds.num_thing_classes,
        flip_frustum_mask=ds.flip_frustum_mask, skip_bad=ds.skip_bad,
    )
    if stage == "3d":
        cfg = dataclasses.replace(cfg, enable_3d=True, enable_mp_occ=False, eval_targets=split != "train",
                                  semantic_3d_target=spec.model.frustum3d.semantic_weight > 0)
    if split == "train":  # augmentation (nvp3d.data.augmentation) never touches validation or test frames
        cfg = dataclasses.replace(cfg, **train_augmentation_fields(spec))
    return cfg


class CachedFrames(Dataset):
    """A split's samples, each passed once through :meth:`prepare`; optional in-memory cache (small data,
    main-process loading). Each stage's dataset subclasses it and says in ``prepare`` what a sample holds."""

    def __init__(self, base: PanopticReconstructionDataset, cache: bool = False) -> None:
        self.base = base
        self.cache = cache
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.base)

    def prepare(self, sample: dict) -> dict:
        """The stage's per-sample targets; here the sample unchanged."""
        return sample

    def __getitem__(self, index: int | AugmentKey) -> dict:
        """Sample ``index``: an int, or an :class:`~datasets3d.augment.AugmentKey` (augmented training
        split: the draws depend on the epoch, so such samples are never cached)."""
        if isinstance(index, AugmentKey):
            return self.prepare(self.base[index])
        if index in self._cache:
            return self._cache[index]
        sample = self.prepare(self.base[index])
        if self.cache:
            self._cache[index] = sample
        return sample


class TrainingFrames(CachedFrames):
    """A split plus the per-sample 2D-stage targets (``occupancy_planes``); optional in-memory cache."""

    def __init__(self, base: PanopticReconstructionDataset, bins: int, cache: bool = False) -> None:
        super().__init__(base, cache=cache)
        self.bins = bins

    def prepare(self, sample: dict) -> dict:
        cfg = self.base.config
        if "mp_occ" in sample:
            sample["occupancy_planes"] = mp_occ_planes(
                sample.pop("mp_occ"), sample["frustum_mask"], sample["camera_to_grid"], sample["intrinsic_reduced"],
                tuple(cfg.reduced_target_size), tuple(cfg.depth_size), self.bins, cfg.depth_min, cfg.depth_max,
            )
        sample.pop("frustum_mask", None)  # 3D volumes are not needed by the 2D stage
        return sample


class ShardSampler(Sampler[int]):
    """Frames ``rank, rank + world, ...`` in order (no padding: every frame is evaluated once)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableDataLoader(DataLoader):
    """A DataLoader that tells Lightning it can resume mid-epoch.

    The position itself travels in the :class:`~nvp3d.data.sampler.LoaderPosition` callback
    state and is applied to the :class:`ResumableSampler` when the loader is built; this ``state_dict`` only
    records it for inspection.
    """

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        return {"epoch": getattr(sampler, "epoch", 0)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to do: see the class docstring."""


class NVP3DDataModule(pl.LightningDataModule):
    """Data of either stage from an experiment spec (``dataset`` section; ``train.seed`` for shuffling).

    ``stage`` defaults to the spec's (``dataset.enable_3d``); ``occupancy_bins`` (2D stage) to the preset's.
    """

    def __init__(self, spec: Any, *, stage: str | None = None, occupancy_bins: int | None = None,
                 cache: bool = False, splits: tuple[str, ...] = ("train", "val")) -> None:
        super().__init__()
        self.spec = spec
        self.stage = stage or ("3d" if spec.dataset.enable_3d else "2d")
        if self.stage not in ("2d", "3d"):
            raise ValueError(f"stage must be '2d' or '3d', got {self.stage!r}")
        self.bins = occupancy_bins or get_preset(spec.model.preset).occupancy_bins
        self.cache = cache
        self.splits = splits
        self.datasets: dict[str, CachedFrames] = {}

    def setup(self, stage: str | None = None) -> None:
        for split in self.splits:
            if split not in self.datasets:
                base = PanopticReconstructionDataset(dataset_config(self.spec, split, stage=self.stage))
                cache = self.cache and not augmentation_enabled(base.config)  # augmented: new draws per epoch
                self.datasets[split] = (TrainingFrames(base, self.bins, cache=cache) if self.stage == "2d"
                                        else CachedFrames(base, cache=cache))

    @property
    def labels(self) -> Any:
        """The label space (train ids, names, thing/stuff) of the first split."""
        return next(iter(self.datasets.values())).base.labels

    def classes(self) -> dict[int, tuple[str, bool]]:
        """class id -> (name, isthing), the rows of the PRQ tables."""
        lab = self.labels
        things = set(lab.thing_ids)
        return {int(c): (lab.names.get(c, str(c)), c in things) for c in lab.train_ids}

    @property
    def thing_ids(self) -> tuple[int, ...]:
        return next(iter(self.datasets.values())).base.thing_ids

    @property
    def stuff_ids(self) -> tuple[int, ...]:
        return next(iter(self.datasets.values())).base.stuff_ids

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def _loader(self, split: str, sampler: Sampler, batch_size: int, generator: torch.Generator | None = None
                ) -> DataLoader:
        sp = getattr(self.spec.dataset, split)
        workers = 0 if self.datasets[split].cache else sp.num_workers
        collate = partial(collate_samples, ignore_label=self.spec.dataset.ignore_label)
        loader_cls = ResumableDataLoader if split == "train" else DataLoader
        return loader_cls(
            self.datasets[split], batch_size=batch_size, sampler=sampler, num_workers=workers,
            collate_fn=collate, drop_last=split == "train", generator=generator,
            persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        bs = self.spec.dataset.train.batch_size
        frames = self.datasets["train"]
        passes = ResumableSampler.passes_for(len(frames), bs, world, self.spec.train.iters_per_epoch)
        sampler = ResumableSampler(len(frames), shuffle=True, seed=self.spec.train.seed, rank=rank,
                                   world_size=world, batch_size=bs,
                                   epoch_keys=augmentation_enabled(frames.base.config), passes=passes)
        apply_loader_position(self.trainer, sampler, self.spec.train.iters_per_epoch)
        return self._loader("train", sampler, bs, sampler.generator)

    def _eval_loader(self, split: str) -> DataLoader:
        rank, world = self._rank_world()
        bs = getattr(self.spec.dataset, split).batch_size
        return self._loader(split, ShardSampler(len(self.datasets[split]), rank, world), bs)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

