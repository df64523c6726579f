"""Read one frame from disk into numpy arrays in the model's conventions (``RawFrame``).

What happens here, per dataset:

* **front3d / synthetic**: the intrinsic is the fixed 3D-FRONT one (or ``config.intrinsic``, or the
  synthetic set's ``meta/camera.json``) rescaled to the entry's ``width``/``height``. Geometry and
  weighting are flipped on axes (0, 1), segmentation on axes (1, 2) of its channels-first array, so that
  every volume is in the camera convention of ``frustum3d.geometry`` (axis 0 = x right, 1 = y down,
  2 = depth). Depth is *not* flipped (flipping it was a bug of the original loader).
* **matterport**: per-frame intrinsic from ``<name>_intrinsics_<a>.npy`` (flattened 4x4, used as is),
  16-bit PNG depth / 4000, signed geometry whose ``mask`` is True *outside* the frustum (frustum = ~mask),
  no flips, optional room mask (absent room masks are reported in ``RawFrame.notes``).

Distance fields are returned as TDF (absolute value), not yet clipped; labels as train ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from frustum3d.geometry import FrustumGeometry

from .colormap import LabelSpace
from .config import DatasetConfig
from .errors import DatasetFormatError, MissingDataError
from .image_modes import check_rgb_matches_labels
from .io import BufferPool, load_npz_array, read_depth, read_rgb, require_file
from .layouts import FrameEntry, FramePaths, front3d_paths, matterport_paths


@dataclass
class RawFrame:
    """One frame as numpy arrays, volumes in camera-convention grid orientation.

    ``intrinsic`` is a float64 [4,4] pinhole matrix for ``image_size`` (W, H) = the entry's width/height.
    ``depth`` is float32 metres at its stored resolution (no range filtering yet). ``semantic``/``instance``
    are the 2D segmap channels (train ids / raw instance ids). Volumes are None when not requested.
    ``frustum_geometry`` (set with the volumes) describes their grid and the frame's lifting plane, with the
    plane intrinsic stored; ``camera_to_grid`` is ``frustum_geometry.camera_to_grid()``.
    """

    entry: FrameEntry
    rgb: np.ndarray
    depth: np.ndarray
    semantic: np.ndarray
    instance: np.ndarray
    intrinsic: np.ndarray
    image_size: tuple[int, int]
    room_mask: np.ndarray | None = None
    geometry: np.ndarray | None = None
    semantic_3d: np.ndarray | None = None
    instance_3d: np.ndarray | None = None
    weighting: np.ndarray | None = None
    frustum: np.ndarray | None = None
    camera_to_grid: np.ndarray | None = None
    voxel_size: float | None = None
    frustum_geometry: FrustumGeometry | None = None
    notes: list[str] = field(default_factory=list)

    shared_frustum: object | None = None  # FrameReader holding a split-wide frustum tensor, if any

    def frustum_tensor(self):
        """The frustum as a torch bool tensor; the split-wide 3D-FRONT mask is converted once per process
        (in shared memory inside DataLoader workers) and shared by all samples."""
        from . import shm

        if self.shared_frustum is not None and self.frustum is self.shared_frustum.shared_frustum:
            return self.shared_frustum.frustum_tensor()
        return shm.from_array(self.frustum, torch.bool)

    @property
    def grid_dims(self) -> tuple[int, int, int] | None:
        return None if self.geometry is None else tuple(self.geometry.shape)  # type: ignore[return-value]


def frame_paths(config: DatasetConfig, entry: FrameEntry) -> FramePaths:
    return (front3d_paths if config.is_front3d_layout else matterport_paths)(config.root, entry)


def required_files(config: DatasetConfig, paths: FramePaths) -> list[tuple[str, Path | tuple[Path, ...]]]:
    """(role, path) of every file this configuration needs for a frame (depth: any of the candidates)."""
    need: list[tuple[str, Path | tuple[Path, ...]]] = [("rgb", paths.rgb), ("depth", paths.depth), ("segmap", paths.segmap)]
    if paths.intrinsic is not None:
        need.append(("intrinsics", paths.intrinsic))
    if config.enable_3d or config.enable_mp_occ or config.eval_targets:
        need.append(("geometry", paths.geometry))
    if config.enable_3d or config.eval_targets:
        need.append(("segmentation", paths.segmentation))
    if config.enable_3d:
        need.append(("weighting", paths.weighting))
    if config.require_room_mask and paths.room_mask is not None:
        need.append(("room mask", paths.room_mask))
    return need


def missing_files(config: DatasetConfig, paths: FramePaths) -> list[str]:
    """Human-readable list of missing required files (empty when the frame is complete)."""
    out = []
    for role, p in required_files(config, paths):
        if isinstance(p, tuple):
            if not any(c.is_file() for c in p):
                out.append(f"{role} ({' or '.join(str(c) for c in p)})")
        elif not p.is_file():
            out.append(f"{role} ({p})")
    return out


def _depth_file(paths: FramePaths, key: str) -> Path:
    p = paths.existing_depth()
    if p is None:
        raise MissingDataError(f"missing depth of frame {key}: none of {[str(c) for c in paths.depth]} exists")
    return p


def _flip(arr: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Flipped *view* (no copy): consumers copy once when they convert, so a 256^3 flip costs nothing."""
    return np.flip(arr, axis=axes)


def _check_grid(arr: np.ndarray, grid: tuple[int, ...], path: Path, what: str) -> None:
    if tuple(arr.shape) != tuple(grid):
        raise DatasetFormatError(f"{path}: {what} has shape {arr.shape}, but the geometry grid is {tuple(grid)}")


def read_segmap(path: Path, labels: LabelSpace) -> tuple[np.ndarray, np.ndarray]:
    """Segmap (H, W, >=2): channel 0 semantic -> train ids, channel 1 raw instance id."""
    seg = load_npz_array(path, kind="int", ndim=3)
    if seg.shape[-1] < 2:
        raise DatasetFormatError(f"{path} has shape {seg.shape}; expected (H, W, 2) = [semantic, instance]")
    semantic = labels.map(seg[..., 0].astype(np.int64), path)
    return semantic, seg[..., 1].astype(np.int64)


def read_segmentation_3d(
    path: Path, labels: LabelSpace, flip: bool, pool: BufferPool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """3D labels, (2, X, Y, Z) channels-first (channels-last (X, Y, Z, 2) accepted); flip on the two
    in-plane grid axes for 3D-FRONT. Returns int32 semantic (train ids) and int32 instance volumes."""
    seg = load_npz_array(path, kind="int", ndim=4, pool=pool, role="segmentation")
    if seg.shape[0] == 2:
        sem, ins = seg[0], seg[1]
    elif seg.shape[-1] == 2:
        sem, ins = seg[..., 0], seg[..., 1]
    else:
        raise DatasetFormatError(f"{path} has shape {seg.shape}; expected (2, X, Y, Z) = [semantic, instance]")
    if flip:
        sem, ins = _flip(sem, (0, 1)), _flip(ins, (0, 1))
    sem = labels.map(sem, path)
    return sem.astype(np.int32, copy=False), ins.astype(np.int32, copy=False)


class FrameReader:
    """Reads frames of one configured split; holds what is shared between frames (frustum, intrinsic)."""

    def __init__(self, config: DatasetConfig, labels: LabelSpace):
        config = config.localized()  # no-op for local data
        self.config = config
        self.labels = labels
        self.base_intrinsic, self.base_size = self._base_intrinsic()
        self.shared_frustum: np.ndarray | None = None
        if config.is_front3d_layout and (config.enable_3d or config.enable_mp_occ or config.eval_targets):
            self.shared_frustum = self._load_shared_frustum()

    # ------------------------------------------------------------------ shared, per split
    def _base_intrinsic(self) -> tuple[np.ndarray | None, tuple[int, int] | None]:
        """(K[4,4], (W, H)) of the fixed camera for front3d/synthetic; None for matterport.

        Also resolves the voxel size and grid plane recorded by the synthetic generator (camera.json).
        """
        from frustum3d.geometry import FRONT3D_IMAGE_SIZE, FRONT3D_INTRINSIC, intrinsic_matrix

        cfg = self.config
        self.voxel_size = cfg.voxel_size if cfg.voxel_size is not None else 0.03
        self.plane_size = cfg.grid_plane_size
        camera = cfg.root / "meta" / "camera.json"
        meta: dict = {}
        if cfg.name == "synthetic" and camera.is_file():
            from .io import read_json

            loaded = read_json(camera, "synthetic camera description")
            meta = loaded if isinstance(loaded, dict) else {}
            if cfg.voxel_size is None and "voxel_size" in meta:
                self.voxel_size = float(meta["voxel_size"])
            if cfg.grid_plane_size is None and "reduced_size" in meta:
                self.plane_size = tuple(int(v) for v in meta["reduced_size"])  # type: ignore[assignment]
        if not cfg.is_front3d_layout:
            return None, None
        if cfg.intrinsic is not None:
            size = cfg.intrinsic_size or FRONT3D_IMAGE_SIZE
            return intrinsic_matrix(*cfg.intrinsic).numpy(), size
        if meta:
            try:
                fx, fy, cx, cy = (float(v) for v in meta["intrinsic"])
                size = tuple(int(v) for v in meta["image_size"])
            except (KeyError, TypeError, ValueError) as exc:
                raise DatasetFormatError(f"{camera} needs 'intrinsic': [fx,fy,cx,cy] and 'image_size': [W,H]") from exc
            return intrinsic_matrix(fx, fy, cx, cy).numpy(), size  # type: ignore[return-value]
        return intrinsic_matrix(*FRONT3D_INTRINSIC).numpy(), FRONT3D_IMAGE_SIZE

    def grid_plane(self, intrinsic: np.ndarray, image_size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
        """Intrinsic and size of the plane the camera->grid transform is defined on (see DatasetConfig)."""
        from frustum3d.geometry import rescale_intrinsic

        size = self.plane_size or (max(1, image_size[0] // 2), max(1, image_size[1] // 2))
        return rescale_intrinsic(intrinsic, image_size, size).numpy(), tuple(size)  # type: ignore[return-value]

    def geometry_for(self, intrinsic: np.ndarray, image_size: tuple[int, int], grid) -> FrustumGeometry:
        """The frame's :class:`frustum3d.geometry.FrustumGeometry`: the ``grid`` of its volumes, this split's
        voxel size and depth range, the grid plane (:meth:`grid_plane`) with the frame's intrinsic rescaled to
        it and stored; ``image_size`` = the frame's stored image size. ``truncation`` keeps the model default
        (3 voxels): the data only know the TDF clip range (``truncation_range``)."""
        k, size = self.grid_plane(intrinsic, image_size)
        cfg = self.config
        try:
            return FrustumGeometry(grid_dims=tuple(grid), voxel_size=self.voxel_size, depth_min=cfg.depth_min,
                                   depth_max=cfg.depth_max, plane_size=size, image_size=tuple(image_size),
                                   intrinsic=k)
        except ValueError as exc:
            raise DatasetFormatError(f"{cfg.root}: cannot describe the {tuple(grid)} grid of this data ({exc})") from exc

    def camera_to_grid(self, intrinsic: np.ndarray, image_size: tuple[int, int], grid) -> np.ndarray:
        cfg = self.config
        geometry = self.geometry_for(intrinsic, image_size, grid)
        try:
            return geometry.camera_to_grid().numpy()
        except ValueError as exc:
            raise DatasetFormatError(
                f"{cfg.root}: the {tuple(grid)} grid cannot hold the {cfg.depth_min}-{cfg.depth_max} m frustum at "
                f"voxel_size {self.voxel_size} ({exc}); set voxel_size to the data's voxel size"
            ) from exc

    def _load_shared_frustum(self) -> np.ndarray | None:
        """The split-wide frustum mask (front3d), flipped with the data when ``flip_frustum_mask``.

        ``frustum_mask_path=None`` means: build it per frame analytically from the intrinsic instead.
        """
        cfg = self.config
        if cfg.frustum_mask_path is None:
            return None
        path = cfg.resolve(cfg.frustum_mask_path)
        if not path.is_file():
            raise MissingDataError(
                f"missing frustum mask: {path} does not exist; set frustum_mask_path to the meta/frustum_mask.npz "
                "of the dataset, or to None to compute the frustum from the intrinsic"
            )
        mask = load_npz_array(path, key="mask", kind="mask", ndim=3, fallback_first=True)
        mask = mask.astype(bool, copy=False)
        # contiguous once here, instead of a strided copy per sample
        return np.ascontiguousarray(_flip(mask, (0, 1)) if cfg.flip_frustum_mask else mask)

    def frustum_tensor(self):
        """Split-wide frustum as one tensor per process (shared memory inside DataLoader workers)."""
        import os

        from . import shm

        cached = getattr(self, "_frustum_tensor", None)
        if cached is None or cached[0] != os.getpid():
            cached = (os.getpid(), shm.from_array(self.shared_frustum, torch.bool))
            self._frustum_tensor = cached
        return cached[1]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_frustum_tensor", None)
        return state

    # ------------------------------------------------------------------ per frame
    def intrinsic_for(self, entry: FrameEntry, paths: FramePaths) -> np.ndarray:
        from frustum3d.geometry import rescale_intrinsic

        size = (entry.width, entry.height)
        if self.base_intrinsic is not None:
            if tuple(self.base_size) == size:  # type: ignore[arg-type]
                return self.base_intrinsic.copy()
            return rescale_intrinsic(self.base_intrinsic, self.base_size, size).numpy()
        assert paths.intrinsic is not None
        require_file(paths.intrinsic, "intrinsics", entry.key)
        k = load_npz_array(paths.intrinsic, kind="float", ndim=(1, 2))
        if k.size != 16:
            raise DatasetFormatError(f"{paths.intrinsic} has shape {k.shape}; expected a flattened 4x4 intrinsic")
        k = k.reshape(4, 4).astype(np.float64)
        if not (k[0, 0] > 0 and k[1, 1] > 0):
            raise DatasetFormatError(f"{paths.intrinsic}: focal lengths must be positive, got {k[0, 0]}, {k[1, 1]}")
        return k

    def analytic_frustum(self, intrinsic: np.ndarray, image_size: tuple[int, int], grid) -> np.ndarray:
        """Frustum mask from the intrinsic, in camera convention, on the grid plane."""
        return self.geometry_for(intrinsic, image_size, grid).frustum_mask().numpy()

    def read(self, entry: FrameEntry, pool: BufferPool | None = None) -> RawFrame:
        """Read one frame. With ``pool`` the large volumes are views into reusable buffers, valid only
        until the next read with the same pool (see :class:`datasets3d.io.BufferPool`)."""
        cfg = self.config
        paths = frame_paths(cfg, entry)
        key = entry.key
        rgb = read_rgb(require_file(paths.rgb, "rgb", key))
        depth_path = _depth_file(paths, key)
        depth = read_depth(depth_path)
        semantic, instance = read_segmap(require_file(paths.segmap, "segmap", key), self.labels)
        if semantic.shape != depth.shape:
            raise DatasetFormatError(
                f"frame {key}: segmap {paths.segmap} is {semantic.shape[::-1]} (W,H) but depth {depth_path} is "
                f"{depth.shape[::-1]}; they must be pixel aligned"
            )
        check_rgb_matches_labels(rgb, semantic.shape, key, paths.rgb, paths.segmap)
        intrinsic = self.intrinsic_for(entry, paths)
        frame = RawFrame(entry, rgb, depth, semantic, instance, intrinsic, (entry.width, entry.height))
        if not cfg.is_front3d_layout:
            frame.room_mask = self._room_mask(paths, key, depth.shape, frame.notes)
        need_geometry = cfg.enable_3d or cfg.enable_mp_occ or cfg.eval_targets
        if need_geometry:
            self._read_volumes(frame, paths, pool)
        return frame

    def _room_mask(self, paths: FramePaths, key: str, shape, notes: list[str]) -> np.ndarray | None:
        p = paths.room_mask
        if p is None or not p.is_file():
            if self.config.require_room_mask:
                raise MissingDataError(f"missing room mask of frame {key}: {p} does not exist")
            notes.append(f"room mask {p} absent: all pixels treated as inside the room")
            return None
        m = read_rgb(p)[..., 0] > 0
        if m.shape != tuple(shape):
            raise DatasetFormatError(f"{p} is {m.shape[::-1]} (W,H) but the depth of frame {key} is {shape[::-1]}")
        return m

    def _read_volumes(self, frame: RawFrame, paths: FramePaths, pool: BufferPool | None = None) -> None:
        cfg = self.config
        key = frame.entry.key
        flip = cfg.flips
        gpath = require_file(paths.geometry, "geometry", key)
        if cfg.is_front3d_layout:
            geom = load_npz_array(gpath, kind="float", ndim=3, pool=pool, role="geometry")
            geom_mask = None
        else:
            with np.load(gpath) as archive:
                if "mask" not in archive:
                    raise DatasetFormatError(
                        f"{gpath} has no 'mask' array (keys {list(archive.keys())}); matterport geometry must "
                        "store the per-frame frustum as mask (True = outside)"
                    )
            geom = load_npz_array(gpath, kind="float", ndim=3, pool=pool, role="geometry")
            geom_mask = load_npz_array(gpath, key="mask", kind="mask", ndim=3, fallback_first=False)
            _check_grid(geom_mask, geom.shape, gpath, "mask")
        grid = tuple(geom.shape)
        geom = np.abs(geom, dtype=np.float32) if geom.dtype != np.float32 or (geom < 0).any() else geom
        frame.geometry = _flip(geom, (0, 1)) if flip else geom
        frame.voxel_size = self.voxel_size
        frame.camera_to_grid = self.camera_to_grid(frame.intrinsic, frame.image_size, grid)
        frame.frustum_geometry = self.geometry_for(frame.intrinsic, frame.image_size, grid)
        # frustum
        if geom_mask is not None:
            frame.frustum = ~geom_mask.astype(bool)  # Matterport: mask is True outside the frustum
        elif self.shared_frustum is not None:
            _check_grid(self.shared_frustum, grid, cfg.resolve(cfg.frustum_mask_path or ""), "frustum mask")
            frame.frustum = self.shared_frustum
            frame.shared_frustum = self
        else:
            frame.frustum = frame.frustum_geometry.frustum_mask().numpy()
        if cfg.enable_3d or cfg.eval_targets:
            spath = require_file(paths.segmentation, "segmentation", key)
            sem3d, ins3d = read_segmentation_3d(spath, self.labels, flip, pool)
            _check_grid(sem3d, grid, spath, "segmentation")
            frame.semantic_3d, frame.instance_3d = sem3d, ins3d
        if cfg.enable_3d:
            wpath = require_file(paths.weighting, "weighting", key)
            w = load_npz_array(wpath, kind="number", ndim=3, pool=pool, role="weighting")
            _check_grid(w, grid, wpath, "weighting")
            frame.weighting = _flip(w, (0, 1)) if flip else w

