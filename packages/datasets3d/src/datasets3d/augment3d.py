"""Mirroring the volumes of a frame together with its image (the 3D half of a random flip).

A flip of the image on axis a (0 = horizontal) mirrors the camera: ``x' = -x``. The model then lifts the
flipped depth into the grid that ``frustum3d.geometry.FrustumGeometry.camera_to_grid`` builds from the
*flipped* intrinsic. That grid is **not** the mirror image of the original grid: ``FrustumGeometry.bounds``
spans pixel positions 0..W (not 0..W-1), rounds the box up and the padding down, so the flipped grid sits
``delta = t + t' - X`` voxels off the exact mirror (t, t' = grid translations on axis a before/after the
flip, X = grid size). ``delta`` does not depend on the principal point, only on W, fx, depth_max, the
voxel size and X; for the reference 3D-FRONT setup (160x120 plane, 256^3, 0.03 m) it is -2.503 voxels,
for a 64^3 synthetic grid on a 40x30 plane -1.708.

What is done: every volume is mirrored exactly (voxel j -> X-1-j) and shifted by ``n = round(delta)``
whole voxels (voxels shifted in are filled: distance = truncation, labels 0, frustum False, weighting
= the border value). This is a pure permutation, so all targets stay mutually consistent and
flipping twice restores the frame. ``camera_to_grid`` is set to the exact transform of the shifted
volumes (``t_a <- X + n - t_a``), so back-projecting the flipped depth with the flipped intrinsic through
the sample's ``camera_to_grid`` is exactly as aligned as before the flip. It differs from
``FrustumGeometry.camera_to_grid(flipped intrinsic)`` by the residual ``delta - n`` (|.| <= 0.5 voxel,
0.497 for the reference setup): a consumer that rebuilds the grid from the intrinsic (the lifting does)
sees the flipped targets displaced by that fraction of a voxel along the flipped axis. The sample records
n, delta and the residual in ``meta["augment"]``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .augment2d import mirror_intrinsic
from .frame import FrameReader, RawFrame


def mirror_offset(frame: RawFrame, reader: FrameReader, axis: int) -> float:
    """``delta`` of the module docstring for this frame's camera and grid (voxels, on ``axis``)."""
    assert frame.geometry is not None
    grid = tuple(frame.geometry.shape)
    k_flip = mirror_intrinsic(frame.intrinsic, frame.image_size, axis).numpy()
    # the volumes' own transform (after a zoom it is not the one rebuilt from the intrinsic)
    c2g = frame.camera_to_grid
    t = (reader.camera_to_grid(frame.intrinsic, frame.image_size, grid) if c2g is None else c2g)[axis, 3]
    t_flip = reader.camera_to_grid(k_flip, frame.image_size, grid)[axis, 3]
    return float(t + t_flip - grid[axis])


def mirror_shift(volume: np.ndarray, axis: int, shift: int, fill=None) -> np.ndarray:
    """New array ``out[i] = volume[X-1-i+shift]`` along ``axis`` (other axes unchanged); indices outside the
    grid take ``fill``, or the nearest border slice of the result when ``fill`` is None."""
    n = volume.shape[axis]
    flipped = np.flip(volume, axis)
    out = np.empty(volume.shape, dtype=volume.dtype)
    s = max(-n, min(n, shift))

    def sl(lo: int, hi: int) -> tuple:
        return (slice(None),) * axis + (slice(lo, hi),)

    # out[i] = flipped[i - shift]
    if s >= 0:
        out[sl(s, n)] = flipped[sl(0, n - s)]
        gap, edge = sl(0, s), sl(s, s + 1)
    else:
        out[sl(0, n + s)] = flipped[sl(-s, n)]
        gap, edge = sl(n + s, n), sl(n + s - 1, n + s)
    if s != 0:
        out[gap] = out[edge] if fill is None and abs(s) < n else (0 if fill is None else fill)
    return out


def flip_volumes(frame: RawFrame, reader: FrameReader, axis: int, truncation: float) -> tuple[RawFrame, dict]:
    """The frame with every volume mirrored on grid ``axis`` (module docstring) and a record of it.

    Only volumes and ``camera_to_grid`` change (``intrinsic`` stays the unflipped one, from which ``delta``
    is computed, so applying this twice restores the frame); the image-plane side of the flip (maps and
    intrinsics) is done by :func:`datasets3d.augment2d.flip_planar` at the sample's final resolution.
    """
    if frame.geometry is None:
        return frame, {}
    delta = mirror_offset(frame, reader, axis)
    n = int(math.floor(delta + 0.5))
    size = frame.geometry.shape[axis]
    # occupied voxels (TDF < truncation) shifted out of the grid (normally 0: those slabs are frustum padding)
    lost_src = slice(size - n, size) if n > 0 else slice(0, -n)  # slices of the flipped volume shifted out
    flipped_geom = np.flip(frame.geometry, axis)
    lost = int((flipped_geom[(slice(None),) * axis + (lost_src,)] < truncation).sum()) if n else 0
    c2g = np.array(frame.camera_to_grid, dtype=np.float64, copy=True)
    c2g[axis, 3] = size + n - c2g[axis, 3]
    vol = {}
    for name, fill in (("geometry", truncation), ("semantic_3d", 0), ("instance_3d", 0), ("frustum", False),
                       ("weighting", None)):
        arr = getattr(frame, name)
        vol[name] = None if arr is None else mirror_shift(arr, axis, n, fill)
    out = replace(frame, camera_to_grid=c2g, shared_frustum=None, notes=list(frame.notes), **vol)
    record = {"grid_shift": n, "grid_delta": delta, "grid_residual": delta - n, "lost_occupied_voxels": lost}
    return out, record
