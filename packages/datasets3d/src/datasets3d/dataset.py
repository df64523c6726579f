"""``torch.utils.data.Dataset`` over one split of processed 3D-FRONT / Matterport3D / synthetic data.

Construction reads the split JSON and the colormap, and (``check_files=True``) checks that every frame's
required files exist. Bad frames are never dropped silently: by default construction fails with the
list of bad frames; with ``skip_bad=True`` they are removed and recorded in ``dataset.skipped``. A frame
that turns out to be corrupt only when it is read raises with the file named, or, with ``skip_bad``,
is replaced by the next good frame and reported in the sample's ``meta["skipped"]`` (worker processes
cannot update the parent's counters, so the record travels with the sample).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch.utils.data import Dataset

from .archives import prepare_scene_folders
from .augment import AugmentKey, make_plan, parse_key
from .augment3d import flip_volumes
from .augment_zoom import maybe_zoom
from .colormap import LabelSpace, load_label_space
from .config import DatasetConfig
from .errors import BadFramesError, DatasetFormatError, MissingDataError
from .frame import FrameReader, RawFrame, frame_paths, missing_files
from .io import BufferPool, read_json
from .layouts import FrameEntry, parse_entry, split_matterport_id
from .sample import build_sample

log = logging.getLogger(__name__)


def load_split(config: DatasetConfig) -> list[FrameEntry]:
    """Parse ``json_path`` into validated entries; an empty split is an error."""
    config = config.localized()
    path = config.resolve(config.json_path)
    raw = read_json(path, "split file")
    if not isinstance(raw, list):
        raise DatasetFormatError(f"split file {path} must hold a JSON list of frame entries, got {type(raw).__name__}")
    if not raw:
        raise DatasetFormatError(f"split file {path} is empty: it lists no frames")
    entries = [parse_entry(item, i, path) for i, item in enumerate(raw)]
    if not config.is_front3d_layout:
        for i, e in enumerate(entries):
            split_matterport_id(e.image_id, f"{path} entry {i}")
    return entries


class PanopticReconstructionDataset(Dataset):
    """One split; ``dataset[i]`` is the sample dict described in :mod:`datasets3d.sample`."""

    def __init__(self, config: DatasetConfig | None = None, **kwargs):
        if config is None:
            config = DatasetConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a DatasetConfig or keyword arguments, not both")
        config = config.localized()  # remote URLs -> local copies in the cache (no-op for local data)
        self.config = config
        if not config.root.is_dir():
            raise MissingDataError(f"dataset root {config.root} does not exist or is not a folder")
        self.labels: LabelSpace = load_label_space(
            config.resolve(config.label_map), config.contiguous_id, config.num_thing_classes
        )
        entries = load_split(config)
        # scene folders shipped as data/images.tar.gz (or other tars under data/) are extracted once here
        prepare_scene_folders(config.root, (e.scene_id for e in entries))
        self.skipped: list[tuple[str, str]] = []
        if config.check_files:
            entries = self._check_entries(entries)
        self.entries: list[FrameEntry] = entries
        self.reader = FrameReader(config, self.labels)
        self._pool = BufferPool()  # reused by __getitem__ only: each frame is consumed before the next read
        self.epoch = 0  # default epoch of dataset[int] for augmentation draws (see set_epoch)

    @property
    def split_name(self) -> str:
        return self.config.split or str(self.config.json_path)

    @property
    def stuff_ids(self) -> tuple[int, ...]:
        return self.labels.stuff_ids

    @property
    def thing_ids(self) -> tuple[int, ...]:
        return self.labels.thing_ids

    def _check_entries(self, entries: Sequence[FrameEntry]) -> list[FrameEntry]:
        good, bad = [], []
        for e in entries:
            miss = missing_files(self.config, frame_paths(self.config, e))
            if miss:
                bad.append((e.key, "missing " + "; ".join(miss)))
            else:
                good.append(e)
        if bad and not self.config.skip_bad:
            raise BadFramesError(self.split_name, bad, len(entries))
        if bad:
            log.warning("skipping %d of %d frames of split %s with missing files (first: %s: %s)",
                        len(bad), len(entries), self.split_name, *bad[0])
            self.skipped.extend(bad)
        if not good:
            raise BadFramesError(self.split_name, bad, len(entries))
        return good

    def __len__(self) -> int:
        return len(self.entries)

    def read_frame(self, index: int, reuse_buffers: bool = False) -> RawFrame:
        """The raw numpy frame (volumes already flipped into camera convention).

        ``reuse_buffers=True`` inflates the large volumes into this dataset's reusable buffers (faster,
        but the arrays are overwritten by the next such read; ``__getitem__`` uses it).
        """
        return self.reader.read(self.entries[index], self._pool if reuse_buffers else None)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by ``dataset[int]`` for the augmentation draws. It only reaches the process it is called
        in (and workers started afterwards); with persistent workers index the dataset with
        :class:`datasets3d.augment.AugmentKey` instead, e.g. through :class:`datasets3d.augment.EpochSampler`."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def _build(self, index: int, key: AugmentKey) -> dict:
        frame = self.read_frame(index, reuse_buffers=True)
        plan = make_plan(self.config, key._replace(index=index))
        if plan is None:
            return build_sample(frame, self.config, self.labels, index)
        record: dict = {}
        frame, zoom = maybe_zoom(frame, self.reader, plan, self.config)
        if plan.flip_axis is not None:
            frame, record = flip_volumes(frame, self.reader, plan.flip_axis, self.config.truncation_range[1])
        if zoom is not None:
            record["zoom"] = zoom
        return build_sample(frame, self.config, self.labels, index, plan, record)

    def __getitem__(self, item: int | AugmentKey) -> dict:
        """Sample of frame ``item``: an int, or an :class:`~datasets3d.augment.AugmentKey` ``(index, epoch,
        group)`` that carries the epoch for the augmentation draws (see :mod:`datasets3d.augment`)."""
        key = parse_key(item, self.epoch)
        index = key.index
        if not self.config.skip_bad:
            return self._build(index, key)
        skipped: list[tuple[str, str]] = []
        for step in range(len(self.entries)):
            i = (index + step) % len(self.entries)
            try:
                sample = self._build(i, key)
            except (DatasetFormatError, MissingDataError) as exc:
                skipped.append((self.entries[i].key, str(exc)))
                log.warning("skipping bad frame %s: %s", self.entries[i].key, exc)
                continue
            sample["meta"]["skipped"] = skipped
            return sample
        raise BadFramesError(self.split_name, skipped, len(self.entries))
