"""Training-time augmentation: configuration checks, deterministic draws and the per-sample plan.

What each augmentation does to a sample lives in :mod:`datasets3d.augment2d` (image plane) and
:mod:`datasets3d.augment3d` (volumes); this module decides *whether* and *how* to augment one frame.

Determinism. Every random draw is a pure function of ``(augment_seed, epoch, frame index)``: each kind
of draw (flip, scale, crop, colour) has its own stream ``numpy.random.default_rng([seed, epoch, key,
stream])``, so switching one augmentation on does not change the draws of another, and no global RNG
state is read or written. A resumed run therefore rebuilds exactly the samples it would have built.

How the epoch reaches the dataset. ``dataset[i]`` with a plain int uses ``dataset.epoch`` (set by
``dataset.set_epoch``). That attribute lives in the process that calls ``set_epoch``; persistent
DataLoader workers keep the copy they were started with. So the epoch should travel with the index:
index the dataset with an :class:`AugmentKey` ``(index, epoch, group)``, e.g. through
:class:`EpochSampler` / :class:`EpochBatchSampler`, whose ``set_epoch`` runs in the main process
before each epoch's iterator is created (Lightning calls ``sampler.set_epoch`` itself). Under Lightning
DDP pass ``use_distributed_sampler=False`` and wrap the ``DistributedSampler`` yourself
(``EpochSampler(DistributedSampler(...))``): Lightning's own wrapper of a custom sampler sets the epoch of
the wrapper only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from torch.utils.data import Sampler

if TYPE_CHECKING:
    from .config import DatasetConfig

FLIP_DIRECTIONS = {"": None, "horizontal": 0, "vertical": 1}  # value: image/grid axis mirrored (0 = x, 1 = y)

# independent random streams, one per kind of draw (part of the seed, so never renumber them)
STREAM_FLIP, STREAM_SCALE, STREAM_CROP, STREAM_COLOR, STREAM_ZOOM = 1, 2, 3, 4, 5

#: tries to find a crop in which no single category covers more than ``single_category_max_area``
CROP_TRIES = 10


class AugmentKey(NamedTuple):
    """What a sampler hands to ``dataset[...]`` so that the draws of a frame depend on the epoch.

    ``group`` keys the scale draw (``train_min_size``): frames of one batch that share a group get the
    same size, as the toolkit's batch-seeded resize does. ``-1`` means the frame's own index.
    """

    index: int
    epoch: int = 0
    group: int = -1


def parse_key(item, default_epoch: int = 0) -> AugmentKey:
    """``dataset[item]`` argument -> :class:`AugmentKey`; a plain int takes ``default_epoch``."""
    if isinstance(item, AugmentKey):
        key = item
    elif isinstance(item, tuple):
        key = AugmentKey(*(int(v) for v in item))
    else:
        key = AugmentKey(int(item), int(default_epoch))
    if key.epoch < 0:
        raise ValueError(f"augmentation epoch must be >= 0, got {key.epoch}; pass the epoch counter from 0")
    return key


def stream(seed: int, key: AugmentKey, kind: int, by_group: bool = False) -> np.random.Generator:
    """The random stream of one kind of draw for one frame (see module docstring)."""
    who = key.group if by_group and key.group >= 0 else key.index
    return np.random.default_rng([int(seed), int(key.epoch), int(who) % (1 << 63), kind])


def augmentation_enabled(cfg: DatasetConfig) -> bool:
    """True when any augmentation field is set; False keeps ``build_sample`` on its unaugmented path."""
    return bool(cfg.random_flip and cfg.random_flip_prob > 0) or cfg.color_aug_ssd or cfg.enable_crop \
        or bool(cfg.train_min_size) or zooms(cfg)


def zooms(cfg: DatasetConfig) -> bool:
    """True when ``zoom_range`` asks for a random zoom (:mod:`datasets3d.augment_zoom`)."""
    return tuple(cfg.zoom_range) != (1.0, 1.0)


def resizes_or_crops(cfg: DatasetConfig) -> bool:
    return cfg.enable_crop or bool(cfg.train_min_size)


def validate(cfg: DatasetConfig) -> None:
    """Check the augmentation fields of a config; each problem is one error naming the key and the fix."""
    if cfg.random_flip not in FLIP_DIRECTIONS:
        raise ValueError(f"random_flip={cfg.random_flip!r} is not supported; use '', 'horizontal' or 'vertical'")
    if not 0.0 <= float(cfg.random_flip_prob) <= 1.0:
        raise ValueError(f"random_flip_prob must be in [0, 1], got {cfg.random_flip_prob}")
    if not 0.0 < float(cfg.single_category_max_area) <= 1.0:
        raise ValueError(f"single_category_max_area must be in (0, 1], got {cfg.single_category_max_area}")
    if any(int(s) <= 0 for s in cfg.train_min_size):
        raise ValueError(f"train_min_size must hold positive sizes, got {cfg.train_min_size}; use () for no resize")
    if cfg.train_max_size < 0:
        raise ValueError(f"train_max_size must be >= 0 (0 = no cap), got {cfg.train_max_size}")
    lo, hi = cfg.zoom_range
    if not (math.isfinite(lo) and math.isfinite(hi) and 1.0 <= lo <= hi <= 8.0):
        raise ValueError(f"zoom_range must be (min, max) with 1 <= min <= max <= 8, got {tuple(cfg.zoom_range)}; "
                         "a zoom below 1 would need image content outside the frame (use (1, 1) for no zoom)")
    if cfg.augment_seed < 0:
        raise ValueError(f"augment_seed must be >= 0, got {cfg.augment_seed}")
    if resizes_or_crops(cfg) and (cfg.enable_3d or cfg.eval_targets):
        what = "enable_crop" if cfg.enable_crop else "train_min_size"
        raise ValueError(
            f"{what} is a 2D-stage augmentation: a crop/resize changes the camera frustum and the 3D targets are "
            "not re-derived for it; turn it off (enable_crop=False, train_min_size=()) when enable_3d or "
            "eval_targets is set")


@dataclass(frozen=True)
class AugmentPlan:
    """The augmentation of one frame: the flip is drawn up front (the volumes need it before the sample
    is built); scale, crop and colour are drawn from their streams when the image plane is built."""

    seed: int
    key: AugmentKey
    flip_axis: int | None  # 0 = horizontal (image u / grid axis 0), 1 = vertical, None = no flip

    def rng(self, kind: int, by_group: bool = False) -> np.random.Generator:
        return stream(self.seed, self.key, kind, by_group)

    def record(self) -> dict:
        """What goes into ``sample["meta"]["augment"]`` (the 2D/3D steps add their results)."""
        return {"seed": self.seed, "epoch": self.key.epoch, "index": self.key.index,
                "flip": {None: "", 0: "horizontal", 1: "vertical"}[self.flip_axis]}


def make_plan(cfg: DatasetConfig, key: AugmentKey) -> AugmentPlan | None:
    """The plan for frame ``key`` or None when augmentation is off (samples then stay bit-identical)."""
    if not augmentation_enabled(cfg):
        return None
    axis = FLIP_DIRECTIONS[cfg.random_flip]
    flip = None
    if axis is not None and cfg.random_flip_prob > 0:
        flip = axis if stream(cfg.augment_seed, key, STREAM_FLIP).random() < cfg.random_flip_prob else None
    return AugmentPlan(int(cfg.augment_seed), key, flip)


def fields_from_toolkit(augmentation: dict, seed: int = 0) -> dict:
    """``DatasetConfig`` keyword arguments for a toolkit/nvp3d ``dataset.augmentation`` section.

    ``size_divisibility`` (batch padding, the model's job), ``test_*`` sizes, ``train_crop_size`` (unused by
    the toolkit) are not sample augmentations and are left out; ``gen_aug_weight > 0`` is refused because
    generated images are not supported.
    """
    if float(augmentation.get("gen_aug_weight", 0.0)) > 0:
        raise ValueError("dataset.augmentation.gen_aug_weight > 0 (generated images) is not supported by datasets3d; "
                         "set it to 0")
    out: dict = {"augment_seed": int(seed)}
    for name in ("random_flip", "random_flip_prob", "color_aug_ssd", "enable_crop", "single_category_max_area",
                 "train_max_size"):
        if name in augmentation:
            out[name] = augmentation[name]
    if "crop_size" in augmentation:
        out["crop_size"] = tuple(augmentation["crop_size"])
    if "train_min_size" in augmentation:
        out["train_min_size"] = tuple(augmentation["train_min_size"])
    if "random_zoom" in augmentation:  # nvp3d's own key (not the toolkit's): the 3D-consistent crop
        out["zoom_range"] = tuple(float(v) for v in augmentation["random_zoom"])
    return out


class EpochSampler(Sampler):
    """Wraps an index sampler and yields :class:`AugmentKey` ``(index, epoch)``; call ``set_epoch`` before
    each epoch (in the main process). ``set_epoch`` is forwarded to the wrapped sampler when it has one
    (e.g. ``DistributedSampler``)."""

    def __init__(self, sampler, epoch: int = 0) -> None:
        self.sampler = sampler
        self.epoch = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[AugmentKey]:
        epoch = self.epoch
        for i in self.sampler:
            yield AugmentKey(int(i), epoch)

    def __len__(self) -> int:
        return len(self.sampler)


class EpochBatchSampler(Sampler):
    """Wraps a batch sampler and yields lists of :class:`AugmentKey` whose ``group`` is the batch's number in
    the epoch, so all frames of a batch share one ``train_min_size`` draw (as in the toolkit).

    Build it as ``EpochBatchSampler(BatchSampler(EpochSampler(base), batch_size, drop_last))``: the keys
    then carry the epoch of the inner :class:`EpochSampler`, which is also exposed as ``.sampler`` because
    Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler`` (not on the batch sampler).
    Plain int indices from the wrapped batch sampler take this object's own ``epoch`` (``set_epoch``).
    """

    def __init__(self, batch_sampler, epoch: int = 0) -> None:
        self.batch_sampler = batch_sampler
        self.epoch = int(epoch)

    @property
    def sampler(self):
        return getattr(self.batch_sampler, "sampler", None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[AugmentKey]]:
        epoch = self.epoch
        for b, batch in enumerate(self.batch_sampler):
            yield [parse_key(i, epoch)._replace(group=b) for i in batch]

    def __len__(self) -> int:
        return len(self.batch_sampler)
