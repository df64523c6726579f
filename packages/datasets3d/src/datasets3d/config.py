"""Plain configuration of one dataset split (no pydantic: the spec system lives in ``nvp3d``).

Field names and defaults follow the TAO ``NVPanoptix3DDatasetConfig`` so that a spec section maps onto
``DatasetConfig(**spec.dataset, root=..., json_path=...)`` one to one. Sizes are written the way the
toolkit writes them: ``target_size``/``reduced_target_size`` are (W, H), ``depth_size`` is (H, W).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .remote import is_remote, resolve_dataset_path

DATASET_NAMES = ("front3d", "matterport", "synthetic")


@dataclass
class DatasetConfig:
    """Everything a reader needs to turn one split on disk into training samples.

    Paths: ``root`` is the dataset root (TAO ``base_dir``). ``json_path``, ``label_map`` and
    ``frustum_mask_path`` may be absolute or relative; relative paths are resolved against ``root``
    (TAO resolves the frustum mask against the working directory, which silently breaks when the job
    starts elsewhere). ``frustum_mask_path=None`` builds the frustum analytically from the intrinsic.
    Each of these may be a URL: ``file://`` is the local path, ``s3://``/``gs://``/... are mirrored into
    ``cache_dir`` by :meth:`localized` (the dataset calls it), with ``storage_options`` for fsspec.

    Augmentation (``random_flip`` .. ``augment_seed``, see :mod:`datasets3d.augment` and the README):
    ``crop_size`` is (H, W); ``train_min_size=()`` means no resize and ``train_max_size=0`` no cap.
    ``zoom_range`` (ours, not a toolkit key): (min, max) factor of a random 3D-consistent zoom
    (:mod:`datasets3d.augment_zoom`); (1, 1) = off. Unlike crop/resize it keeps the sample size and works
    with the 3D targets.

    Grid geometry: ``voxel_size=None`` takes the synthetic set's ``meta/camera.json`` value, else 0.03 m.
    The camera->grid transform is built (as in the reference code) from the intrinsic rescaled to the
    *grid plane*, by default half the stored image size (160x120 for 320x240 frames), or the synthetic
    set's recorded plane; ``grid_plane_size`` overrides it.
    """

    name: str = "front3d"
    root: str | Path = ""
    json_path: str | Path = "meta/train.json"
    label_map: str | Path = "meta/colormap.json"
    frustum_mask_path: str | Path | None = "meta/frustum_mask.npz"
    split: str = ""
    contiguous_id: bool = True
    target_size: tuple[int, int] = (320, 240)
    reduced_target_size: tuple[int, int] = (160, 120)
    depth_size: tuple[int, int] = (120, 160)
    depth_min: float = 0.4
    depth_max: float = 6.0
    voxel_size: float | None = None
    grid_plane_size: tuple[int, int] | None = None
    truncation_range: tuple[float, float] = (0.0, 12.0)
    occ_truncation_lvl: tuple[float, float] = (8.0, 6.0)
    iso_value: float = 1.0
    downsample_factor: int = 1
    min_instance_pixels: int = 200
    ignore_label: int = 255
    enable_3d: bool = False
    enable_mp_occ: bool = True
    eval_targets: bool = False
    # the per-voxel GT semantic volume (``semantic_3d``, uint8 train ids) with enable_3d: targets of a 3D semantic head
    semantic_3d_target: bool = False
    num_thing_classes: int | None = 9
    flip_frustum_mask: bool = True
    intrinsic: tuple[float, float, float, float] | None = None
    intrinsic_size: tuple[int, int] | None = None
    require_room_mask: bool = False
    skip_bad: bool = False
    check_files: bool = True
    cache_dir: str | Path | None = None
    storage_options: dict = field(default_factory=dict)
    # Training-time augmentation (datasets3d.augment), all off by default. Names follow the toolkit's
    # dataset.augmentation keys; resize/crop are 2D-stage only (refused with enable_3d / eval_targets);
    # zoom_range (ours) is the 3D-consistent crop.
    random_flip: str = ""
    random_flip_prob: float = 0.5
    color_aug_ssd: bool = False
    enable_crop: bool = False
    crop_size: tuple[int, int] = (240, 240)
    single_category_max_area: float = 1.0
    train_min_size: tuple[int, ...] = ()
    train_max_size: int = 0
    zoom_range: tuple[float, float] = (1.0, 1.0)
    augment_seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in DATASET_NAMES:
            raise ValueError(f"dataset name {self.name!r} is not supported; use one of {DATASET_NAMES}")
        # remote roots stay URL strings until localized(); file:// URLs are plain paths at once
        self.root = self.root if is_remote(self.root) else resolve_dataset_path(self.root)
        self.target_size = _pair("target_size", self.target_size)
        self.reduced_target_size = _pair("reduced_target_size", self.reduced_target_size)
        self.depth_size = _pair("depth_size", self.depth_size)
        self.truncation_range = tuple(float(v) for v in self.truncation_range)  # type: ignore[assignment]
        self.occ_truncation_lvl = tuple(float(v) for v in self.occ_truncation_lvl)  # type: ignore[assignment]
        if len(self.truncation_range) != 2 or len(self.occ_truncation_lvl) != 2:
            raise ValueError("truncation_range and occ_truncation_lvl need exactly two numbers each")
        if not 0 < self.depth_min < self.depth_max:
            raise ValueError(f"need 0 < depth_min < depth_max, got {self.depth_min} and {self.depth_max}")
        if self.voxel_size is not None and self.voxel_size <= 0:
            raise ValueError(f"voxel_size must be positive, got {self.voxel_size}")
        if self.grid_plane_size is not None:
            self.grid_plane_size = _pair("grid_plane_size", self.grid_plane_size)
        if self.downsample_factor < 1:
            raise ValueError(f"downsample_factor must be >= 1, got {self.downsample_factor}")
        if self.intrinsic is not None:
            if len(self.intrinsic) != 4:
                raise ValueError("intrinsic must be (fx, fy, cx, cy)")
            self.intrinsic = tuple(float(v) for v in self.intrinsic)  # type: ignore[assignment]
        if self.intrinsic_size is not None:
            self.intrinsic_size = _pair("intrinsic_size", self.intrinsic_size)
        self.crop_size = _pair("crop_size", self.crop_size)
        if isinstance(self.train_min_size, int):
            self.train_min_size = (self.train_min_size,)
        self.train_min_size = tuple(int(v) for v in self.train_min_size)
        if len(tuple(self.zoom_range)) != 2:
            raise ValueError(f"zoom_range needs two numbers (min, max), got {self.zoom_range!r}")
        self.zoom_range = tuple(float(v) for v in self.zoom_range)  # type: ignore[assignment]
        from .augment import validate

        validate(self)

    @property
    def is_front3d_layout(self) -> bool:
        """front3d and synthetic share one layout (the generator writes the 3D-FRONT format)."""
        return self.name in ("front3d", "synthetic")

    @property
    def flips(self) -> bool:
        """3D-FRONT arrays are stored flipped on the two in-plane grid axes; Matterport arrays are not."""
        return self.is_front3d_layout

    @property
    def is_remote(self) -> bool:
        """True while ``root`` or one of the file paths is a URL that :meth:`localized` must mirror."""
        return any(is_remote(v) for v in (self.root, self.json_path, self.label_map, self.frustum_mask_path))

    def localized(self) -> DatasetConfig:
        """This configuration with every URL replaced by its local copy (see :mod:`datasets3d.remote`).

        A remote ``root`` is mirrored as a whole into the cache (``cache_dir``, default
        ``$NVP3D_CACHE`` or ``~/.cache/nvp3d/datasets``); URL-valued ``json_path``, ``label_map`` and
        ``frustum_mask_path`` are mirrored one file each. Returns ``self`` when nothing is remote.
        """
        if not self.is_remote:
            return self

        def local(value):
            if value is None or not is_remote(value):
                return value
            return resolve_dataset_path(value, cache_dir=self.cache_dir, storage_options=self.storage_options)

        return replace(self, root=local(self.root), json_path=local(self.json_path),
                       label_map=local(self.label_map), frustum_mask_path=local(self.frustum_mask_path))

    def resolve(self, path: str | Path) -> Path:
        """Local path for ``path``: ``file://`` URLs and absolute paths as they are, relative ones
        joined with ``root``. Call :meth:`localized` first when the configuration holds remote URLs."""
        if is_remote(path) or is_remote(self.root):
            raise ValueError(f"{path} (root {self.root}) is remote; resolve config.localized() instead")
        p = resolve_dataset_path(path)
        return p if p.is_absolute() else Path(self.root) / p

    @classmethod
    def from_dict(cls, values: dict) -> DatasetConfig:
        """Build from a spec-like dict, ignoring keys this reader does not use (kept in ``extra``)."""
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in values.items() if k in names}
        if "base_dir" in values and "root" not in known:
            known["root"] = values["base_dir"]
        extra = {k: v for k, v in values.items() if k not in names and k != "base_dir"}
        return cls(**known, extra=extra)


def _pair(name: str, value) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be two integers, got {value!r}") from exc
    if a <= 0 or b <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return a, b
