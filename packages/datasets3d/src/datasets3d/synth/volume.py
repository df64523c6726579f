"""Voxelise the scene surfaces inside the camera frustum grid and compute the 3D targets.

* A voxel (in the camera-convention grid of ``frustum3d.geometry``) is a *surface voxel* when its centre
  lies within half a voxel diagonal (sqrt(3)/2 voxels) of a primitive's surface and inside the frustum:
  every surface point inside the frustum then lies in a surface voxel.
* The unsigned distance field (voxel units) is the exact centre-to-surface distance on surface voxels and
  the Euclidean distance transform (``scipy.ndimage.distance_transform_edt``) to the nearest surface voxel
  elsewhere, clipped at the truncation (12); outside the frustum it is the truncation, as in the released
  data (no distance below 12 outside the frustum mask).
* Surface voxels get the semantic class and 3D instance id (0 for stuff) of the closest primitive.
* Weighting: 1 outside the frustum, 2 inside and far (distance >= 3), 5 for 1 <= d < 3, 10 for d < 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import distance_transform_edt

from .shapes import Primitive

SURFACE_BAND = float(np.sqrt(3.0) / 2.0)  # voxels


@dataclass
class Volumes:
    tdf: np.ndarray  # float32 [X,Y,Z] voxel units, 0..truncation
    semantic: np.ndarray  # int32 [X,Y,Z]
    instance: np.ndarray  # int32 [X,Y,Z]
    weighting: np.ndarray  # int16 [X,Y,Z]


@dataclass
class FrustumGrid:
    """The frustum mask with its transform and bounding box, computed once per camera setup."""

    frustum: np.ndarray  # bool [X,Y,Z]
    camera_to_grid: np.ndarray  # [4,4]
    lo: np.ndarray  # (3,) inclusive lower index of the frustum's bounding box
    hi: np.ndarray  # (3,) exclusive upper index

    @classmethod
    def build(cls, frustum: np.ndarray, camera_to_grid: np.ndarray) -> FrustumGrid:
        nz = [np.flatnonzero(frustum.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
        lo = np.array([a.min() for a in nz])
        hi = np.array([a.max() + 1 for a in nz])
        return cls(frustum, np.asarray(camera_to_grid, dtype=np.float64), lo, hi)

    @property
    def crop(self) -> tuple[slice, slice, slice]:
        return tuple(slice(int(a), int(b)) for a, b in zip(self.lo, self.hi, strict=True))  # type: ignore[return-value]


def distance_to_surface(surface: np.ndarray) -> np.ndarray:
    """Euclidean distance (voxel units, float32) from every voxel to the nearest True voxel.

    ``distance_transform_edt`` computes the nearest-voxel indices; the distances are formed here with
    broadcast index ranges, which avoids scipy's full ``np.indices`` grid and float64 temporaries
    (about 40 % less time on a 256^3 frustum crop; identical values).
    """
    ft = distance_transform_edt(~surface, return_distances=False, return_indices=True)
    d = np.zeros(surface.shape, dtype=np.float32)
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = -1
        diff = (ft[axis] - np.arange(surface.shape[axis], dtype=ft.dtype).reshape(shape)).astype(np.float32)
        d += diff * diff
    return np.sqrt(d, out=d)


def _planar_axis(prim: Primitive) -> int | None:
    """Index of the zero half-extent of a rectangle (walls, floor, ceiling), else None."""
    if prim.kind != "box":
        return None
    zero = np.flatnonzero(prim.half == 0)
    return int(zero[0]) if zero.size == 1 else None


def _block_candidates(prim: Primitive, fg: FrustumGrid, g0: np.ndarray, g1: np.ndarray, band_m: float) -> np.ndarray:
    """Voxel indices (N,3) in the block [g0, g1) that are in the frustum and may be near the surface."""
    block = fg.frustum[g0[0]:g1[0], g0[1]:g1[1], g0[2]:g1[2]]
    axis = _planar_axis(prim)
    if axis is not None:
        # signed plane distance is affine in the voxel index: evaluate it by broadcasting, no point list
        scale = fg.camera_to_grid[0, 0]
        offset = fg.camera_to_grid[:3, 3]
        normal = prim.rotation[:, axis]
        d0 = float(normal @ ((g0 + 0.5 - offset) / scale - prim.center))
        a = (normal / scale).astype(np.float32)
        shape = block.shape
        dist = (np.float32(d0) + a[0] * np.arange(shape[0], dtype=np.float32)[:, None, None]
                + a[1] * np.arange(shape[1], dtype=np.float32)[None, :, None]
                + a[2] * np.arange(shape[2], dtype=np.float32)[None, None, :])
        block = block & (np.abs(dist) <= band_m)
    return np.stack(np.nonzero(block), axis=1) + g0


def voxelise(primitives: list[Primitive], fg: FrustumGrid, truncation: float = 12.0) -> Volumes:
    """Build the volumes for camera-frame ``primitives`` (see module docstring)."""
    grid = fg.frustum.shape
    scale = float(fg.camera_to_grid[0, 0])  # 1 / voxel_size
    offset = fg.camera_to_grid[:3, 3]
    band_m = SURFACE_BAND / scale
    lo, hi = fg.lo, fg.hi
    crop_shape = tuple(int(v) for v in hi - lo)
    best = np.full(crop_shape, np.inf, dtype=np.float32)
    owner = np.full(crop_shape, -1, dtype=np.int16)
    for i, prim in enumerate(primitives):
        pmin, pmax = prim.aabb()
        g0 = np.floor((pmin - band_m) * scale + offset).astype(int)
        g1 = np.ceil((pmax + band_m) * scale + offset).astype(int) + 1
        g0, g1 = np.maximum(g0, lo), np.minimum(g1, hi)
        if (g1 <= g0).any():
            continue
        vox = _block_candidates(prim, fg, g0, g1, band_m)
        if len(vox) == 0:
            continue
        pts = ((vox + 0.5) - offset) / scale
        d = np.abs(prim.sdf(pts)).astype(np.float32) * scale  # voxel units
        near = d <= SURFACE_BAND
        vox, d = vox[near] - lo, d[near]
        cur = best[vox[:, 0], vox[:, 1], vox[:, 2]]
        better = d < cur
        vox, d = vox[better], d[better]
        best[vox[:, 0], vox[:, 1], vox[:, 2]] = d
        owner[vox[:, 0], vox[:, 1], vox[:, 2]] = i
    surface = owner >= 0
    crop = fg.crop
    tdf = np.full(grid, truncation, dtype=np.float32)
    if surface.any():
        edt = distance_to_surface(surface)
        np.minimum(edt, truncation, out=edt)
        edt[surface] = best[surface]
        edt[~fg.frustum[crop]] = truncation
        tdf[crop] = edt
    sem_lut = np.array([p.semantic for p in primitives], dtype=np.int32)
    ins_lut = np.array([p.instance for p in primitives], dtype=np.int32)
    semantic = np.zeros(grid, dtype=np.int32)
    instance = np.zeros(grid, dtype=np.int32)
    where = np.nonzero(surface)
    full_idx = tuple(w + int(o) for w, o in zip(where, lo, strict=True))
    semantic[full_idx] = sem_lut[owner[where]]
    instance[full_idx] = ins_lut[owner[where]]
    weighting = np.ones(grid, dtype=np.int16)
    fr = fg.frustum[crop]
    t = tdf[crop]
    w = np.where(fr, np.int16(2), np.int16(1))
    w[fr & (t < 3)] = 5
    w[fr & (t < 1)] = 10
    weighting[crop] = w
    return Volumes(tdf, semantic, instance, weighting)
