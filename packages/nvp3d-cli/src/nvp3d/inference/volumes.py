"""A reconstruction's 3D volumes as values at its predicted voxels, made dense only when read.

A 256^3 frame predicts about 10^5 voxels; its dense TDF, panoptic and semantic volumes are 192 MiB. The
Predictor copies only the voxels to the host (:class:`VoxelVolumes`, about 1 MB) and a
:class:`~nvp3d.inference.reconstruction.Reconstruction` builds each dense volume the first time it is read
(:class:`DenseOnRead`). Why: on the host a fresh 64 MiB volume costs more than its device copy did (page faults,
filling), and most of a frame's consumers run elsewhere: ``nvp3d inference`` hands each reconstruction to a
writer process, which now receives 1 MB instead of a 200 MB spill and builds the volumes there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DenseOnRead", "VoxelVolumes"]

#: the dense volumes a VoxelVolumes stands for, with each one's dtype
VOLUMES = {"geometry": np.float32, "semantic": np.int32, "panoptic": np.int32}


@dataclass(frozen=True)
class VoxelVolumes:
    """The 3D volumes of one frame as values at its predicted voxels.

    ``index`` int32 ``[N]``: distinct C-order linear voxel indices in ``grid_dims``; ``geometry`` float32 ``[N]``
    TDF in voxels, ``semantic`` / ``panoptic`` int32 ``[N]``. Every other voxel is free space: TDF =
    ``truncation``, ids 0.
    """

    grid_dims: tuple[int, int, int]
    truncation: float
    index: np.ndarray
    geometry: np.ndarray
    semantic: np.ndarray
    panoptic: np.ndarray

    def __post_init__(self) -> None:
        n = self.index.shape
        for name in VOLUMES:
            if getattr(self, name).shape != n:
                raise ValueError(f"VoxelVolumes.{name} has shape {getattr(self, name).shape}, index {n}")

    def dense(self, name: str) -> np.ndarray:
        """The dense ``[X, Y, Z]`` volume ``name`` (``geometry`` | ``semantic`` | ``panoptic``)."""
        dtype = VOLUMES[name]
        size = int(np.prod(self.grid_dims))
        if name == "geometry":
            out = np.full(size, self.truncation, dtype=dtype)
        else:
            out = np.zeros(size, dtype=dtype)
        out[self.index] = getattr(self, name)
        return out.reshape(self.grid_dims)


class DenseOnRead:
    """A dense-volume attribute of a Reconstruction: the array it was given, else (when the reconstruction holds
    ``voxels``) the dense volume built from them on first read and kept."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.slot = "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return None  # the dataclass default
        value = obj.__dict__.get(self.slot)
        if value is None and obj.__dict__.get("voxels") is not None:
            value = obj.voxels.dense(self.name)
            obj.__dict__[self.slot] = value
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        # a dataclass passes the field's default object itself when the argument is left out
        obj.__dict__[self.slot] = None if isinstance(value, DenseOnRead) else value

    def loaded(self, obj: Any) -> bool:
        """True when ``obj`` holds this volume as a dense array now (given, or read once)."""
        return obj.__dict__.get(self.slot) is not None
