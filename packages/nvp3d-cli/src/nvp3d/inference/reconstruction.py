"""``Reconstruction``: one image's 2D and 3D prediction as numpy arrays (no I/O here).

``<name>_panoptic3d.npz`` keys (see :meth:`Reconstruction.arrays`): ``geometry`` float32 [X,Y,Z] predicted TDF
in voxels (``truncation`` = free space), ``semantic`` int32 [X,Y,Z] class per voxel (0 = none), ``panoptic``
int32 [X,Y,Z] segment id (0 = none), ``segment_ids`` / ``segment_classes`` / ``segment_is_thing`` [M] (the
id -> class mapping), ``class_ids`` / ``class_names`` / ``class_colors`` (label space), ``frustum_mask`` bool
[X,Y,Z], ``grid_dims`` [3], ``voxel_size``, ``depth_range`` [2], ``truncation``, ``iso_value``,
``plane_intrinsic`` [4,4] and ``plane_size`` [W,H] (the lifting plane), ``image_size`` [W,H] (network input),
``grid_to_camera`` [4,4] (continuous voxel coordinates -> camera metres; voxel ``i`` spans ``[i, i+1)``),
``depth`` float32 [h,w] (predicted depth on the lifting plane, metres).

The Predictor's reconstructions hold their 3D result as ``voxels`` (:class:`~nvp3d.inference.volumes.VoxelVolumes`,
the values at the predicted voxels) and build ``geometry`` / ``semantic`` / ``panoptic`` as dense arrays the first
time each is read (:mod:`nvp3d.inference.volumes` says why). A reconstruction made from dense arrays keeps them.
``frustum_mask`` may be shared between the frames of one intrinsic: it is read-only.

A reconstruction made with ``only_2d=True`` (a Predictor that ran no 3D stage: ``nvp3d inference`` with only 2D
kinds in ``inference.outputs``) holds the 2D prediction only: no volumes, no voxels, no frustum mask, and its
``mapping`` lists the 2D panoptic segments. Its 2D arrays equal those of a full reconstruction of the same image;
what needs the 3D result (:meth:`Reconstruction.arrays`, :meth:`Reconstruction.to_mesh`) refuses it in one line.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nvp3d.inference.mesh import Mesh, check_stride, extract_mesh, pool_nearest
from nvp3d.inference.volumes import VOLUMES, DenseOnRead, VoxelVolumes
from nvp3d.inference.writers import (
    colorize_labels,
    depth_to_png,
    instance_palette,
    overlay,
    save_reconstruction,
)

__all__ = ["MODES", "Reconstruction"]

MODES = ("panoptic", "instance", "semantic")

#: the dense 3D volumes of a Reconstruction (built from its ``voxels`` when it has them)
VOLUME_FIELDS = tuple(VOLUMES)


@dataclass
class Reconstruction:
    """One image's 2D and 3D prediction (arrays are numpy; see the module docstring for the npz layout)."""

    image: np.ndarray  # [H, W, 3] uint8 network input
    depth: np.ndarray  # [h, w] float32 metres on the lifting plane
    panoptic_2d: np.ndarray  # [h, w] int32 segment ids on the lifting plane
    segments_2d: list[dict]
    semantic_2d: np.ndarray  # [h, w] int32 class per pixel (0 = void)
    mapping: dict[int, int]  # segment id -> class (the 3D segments; only_2d: the 2D panoptic segments)
    frustum_mask: np.ndarray | None  # [X, Y, Z] bool; None when only_2d
    classes: dict[int, tuple[str, bool]]
    colors: np.ndarray  # [K, 3] uint8 class colours
    meta: dict[str, Any] = field(default_factory=dict)
    mode: str = "panoptic"
    # the 3D volumes: given dense, or built from ``voxels`` when first read (module docstring); keyword-only
    geometry: np.ndarray = field(default=DenseOnRead(), kw_only=True)  # [X, Y, Z] float32 TDF (voxels)
    semantic: np.ndarray = field(default=DenseOnRead(), kw_only=True)  # [X, Y, Z] int32
    panoptic: np.ndarray = field(default=DenseOnRead(), kw_only=True)  # [X, Y, Z] int32
    voxels: VoxelVolumes | None = field(default=None, kw_only=True)
    #: the 2D prediction only (module docstring): no 3D stage ran
    only_2d: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        if self.only_2d:
            if self.voxels is not None or any(self.volume_loaded(n) for n in VOLUME_FIELDS):
                raise ValueError("Reconstruction(only_2d=True) takes no 3D volumes or voxels=")
        elif self.voxels is None and not all(self.volume_loaded(n) for n in VOLUME_FIELDS):
            raise ValueError("Reconstruction needs geometry, semantic and panoptic arrays, or voxels= "
                             "(or only_2d=True for a 2D prediction)")

    def require_3d(self, what: str) -> None:
        """Refuse ``what`` (a method or output needing the 3D result) on a 2D-only reconstruction, in one line."""
        if self.only_2d:
            raise ValueError(f"{what} needs the 3D result, but this reconstruction is 2D only (its Predictor ran no "
                             "3D stage): put volumes, mesh or preview in inference.outputs (Predictor outputs=)")

    def replaced(self, **changes: Any) -> Reconstruction:
        """A shallow copy with ``changes`` applied. Unlike ``dataclasses.replace`` it does not read (and so build)
        the dense volumes it is not asked to change."""
        out = copy.copy(self)
        for name, value in changes.items():
            setattr(out, name, value)
        return out

    def volume_loaded(self, name: str) -> bool:
        """True when the dense volume ``name`` is held as an array now (given, or built by a read)."""
        return type(self).__dict__[name].loaded(self)

    @property
    def is_thing(self) -> dict[int, bool]:
        return {sid: self.classes.get(c, ("", False))[1] for sid, c in self.mapping.items()}

    def arrays(self) -> dict[str, np.ndarray]:
        """The ``_panoptic3d.npz`` content (module docstring)."""
        self.require_3d("Reconstruction.arrays")
        ids = np.array(list(self.mapping), dtype=np.int64)
        m = self.meta
        return {
            "geometry": self.geometry.astype(np.float32), "semantic": self.semantic.astype(np.int32),
            "panoptic": self.panoptic.astype(np.int32), "segment_ids": ids,
            "segment_classes": np.array([self.mapping[i] for i in ids.tolist()], dtype=np.int64),
            "segment_is_thing": np.array([self.is_thing[i] for i in ids.tolist()], dtype=bool),
            "class_ids": np.array(sorted(self.classes), dtype=np.int64),
            "class_names": np.array([self.classes[c][0] for c in sorted(self.classes)]),
            "class_colors": self.colors[np.array(sorted(self.classes))],
            "frustum_mask": self.frustum_mask.astype(bool), "grid_dims": np.array(m["grid_dims"], dtype=np.int64),
            "voxel_size": np.float64(m["voxel_size"]), "depth_range": np.array(m["depth_range"], dtype=np.float64),
            "truncation": np.float64(m["truncation"]), "iso_value": np.float64(m["iso_value"]),
            "plane_intrinsic": np.asarray(m["plane_intrinsic"], dtype=np.float64),
            "plane_size": np.array(m["plane_size"], dtype=np.int64), "image_size": np.array(m["image_size"], np.int64),
            "grid_to_camera": np.asarray(m["grid_to_camera"], dtype=np.float64), "depth": self.depth.astype(np.float32),
        }

    def _vertex_labels(self, color_by: str) -> tuple[np.ndarray, np.ndarray]:
        """(label volume, colour table) for mesh colouring: ``semantic`` = class colours; ``instance`` = one
        colour per thing segment (stuff grey); ``panoptic`` = things by instance, stuff by class colour."""
        if color_by == "semantic":
            return self.semantic, self.colors
        n = int(self.panoptic.max()) + 1 if self.panoptic.size else 1
        table = instance_palette(max(n, 2))
        for sid, cls in self.mapping.items():
            if not self.is_thing[sid]:
                table[sid] = self.colors[cls] if color_by == "panoptic" and cls < len(self.colors) else (160, 160, 160)
        return self.panoptic, table

    def to_mesh(self, color_by: str | None = None, camera_frame: bool = True, stride: int = 1) -> Mesh:
        """Marching-cubes mesh at the iso value (:class:`nvp3d.inference.mesh.Mesh`), coloured per vertex.

        ``color_by``: ``semantic`` | ``instance`` | ``panoptic`` (default: the prediction mode). Vertices are in
        camera metres (x right, y down, z forward), or voxel units with ``camera_frame=False``. ``stride`` > 1:
        a coarser mesh, of the volumes pooled to ``stride``^3 blocks (:func:`nvp3d.inference.mesh.pool_nearest`;
        about ``stride``^2 times fewer faces, in the same coordinates), for pictures such as the preview.
        """
        self.require_3d("Reconstruction.to_mesh")
        mode = color_by or self.mode
        if mode not in MODES:
            raise ValueError(f"color_by must be one of {MODES}, got {mode!r}")
        stride = check_stride(stride)
        labels, table = self._vertex_labels(mode)
        truncation = float(self.meta["truncation"])
        geometry = self.geometry
        if stride > 1:
            geometry, labels = pool_nearest(geometry, labels, stride, fill=truncation)
        # a coarse voxel i spans [s*i, s*i + s) of the grid: continuous coarse coordinates scale by s
        scale = np.diag([float(stride)] * 3 + [1.0])
        to_frame = np.asarray(self.meta["grid_to_camera"], dtype=np.float64) @ scale if camera_frame else None
        mesh = extract_mesh(geometry, float(self.meta["iso_value"]), labels, table, grid_to_camera=to_frame,
                            truncation=truncation)
        if stride > 1 and not camera_frame:  # voxel units of the full grid: voxel i centred at i
            mesh.vertices = (mesh.vertices * stride + (stride - 1) / 2.0).astype(np.float32)
        return mesh

    def overlays(self) -> dict[str, np.ndarray]:
        """2D images: ``semantic`` / ``panoptic`` overlays on the input and the ``depth`` grey image."""
        from PIL import Image

        h, w = self.image.shape[:2]

        def up(labels: np.ndarray) -> np.ndarray:
            return np.asarray(Image.fromarray(labels.astype(np.int32)).resize((w, h), Image.NEAREST))

        out = {"semantic": overlay(self.image, colorize_labels(up(self.semantic_2d), self.colors))}
        if self.mode != "semantic":
            pal = instance_palette(max(int(self.panoptic_2d.max()) + 1, 2))
            for seg in self.segments_2d:
                if not seg.get("isthing"):
                    c = int(seg["category_id"])
                    pal[int(seg["id"])] = self.colors[c] if self.mode == "panoptic" else (160, 160, 160)
            out["panoptic"] = overlay(self.image, colorize_labels(up(self.panoptic_2d), pal))
        out["depth"] = depth_to_png(self.depth, float(self.meta["depth_range"][1]))
        return out

    def save(self, directory: str | os.PathLike[str], name: str = "frame",
             outputs: Iterable[str] | None = None) -> dict[str, str]:
        """Write the overlays, ``<name>_depth.png``, ``<name>_panoptic3d.npz``, ``<name>.ply`` and
        ``<name>_preview.png`` (or only the kinds in ``outputs``, :data:`nvp3d.inference.writers.OUTPUT_KINDS`);
        returns the paths by kind (:func:`nvp3d.inference.writers.save_reconstruction`)."""
        return save_reconstruction(self, directory, name, outputs)
