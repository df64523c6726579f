"""datasets3d: readers for processed 3D-FRONT / Matterport3D panoptic-reconstruction data (the exact
on-disk format of the toolkit and its ancestors) and a synthetic scene generator writing that format.

Main entry points::

    from datasets3d import DatasetConfig, PanopticReconstructionDataset, collate_samples
    ds = PanopticReconstructionDataset(DatasetConfig(name="front3d", root="/data/front3d",
                                                     json_path="meta/train.json", enable_3d=True))
    sample = ds[0]            # dict documented in datasets3d.sample
    # root/json_path/label_map/frustum_mask_path may also be s3://, gs://, file:// URLs (datasets3d.remote)

    from datasets3d.synth import generate
    generate("out/", scenes=4, frames_per_scene=8, grid=64, image_size=(80, 60), seed=0)
"""

from .archives import prepare_scene_folders
from .augment import AugmentKey, EpochBatchSampler, EpochSampler
from .collate import collate_samples
from .colormap import FRONT3D_CATEGORIES, LabelSpace, default_colormap, load_label_space
from .config import DatasetConfig
from .dataset import PanopticReconstructionDataset, load_split
from .errors import (
    BadFramesError,
    DatasetFormatError,
    MissingDataError,
    RemoteAccessError,
    RemoteSupportError,
    UnsafeArchiveError,
    UnsupportedURLError,
)
from .frame import FrameReader, RawFrame
from .remote import is_remote, resolve_dataset_path
from .sample import SEGMENT_KEYS, build_sample

__version__ = "0.2.6"

__all__ = [
    "AugmentKey",
    "EpochBatchSampler",
    "EpochSampler",
    "FRONT3D_CATEGORIES",
    "SEGMENT_KEYS",
    "BadFramesError",
    "DatasetConfig",
    "DatasetFormatError",
    "FrameReader",
    "LabelSpace",
    "MissingDataError",
    "PanopticReconstructionDataset",
    "RawFrame",
    "RemoteAccessError",
    "RemoteSupportError",
    "UnsafeArchiveError",
    "UnsupportedURLError",
    "build_sample",
    "collate_samples",
    "default_colormap",
    "is_remote",
    "load_label_space",
    "load_split",
    "prepare_scene_folders",
    "resolve_dataset_path",
]
