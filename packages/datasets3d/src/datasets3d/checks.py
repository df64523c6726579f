"""Geometric consistency checks between a frame's depth / segmap and its 3D volumes.

Used by the tests on synthetic and real frames, by the generator's self-check and for debugging a new
dataset: back-project every valid depth pixel with the intrinsic, map it into the grid with
``camera_to_grid`` and look up the distance field and 3D labels at the voxel that contains it
(``floor`` of the continuous grid coordinate). A wrong flip or a wrong intrinsic gives distances near the
truncation (12) instead of about one voxel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class AlignmentStats:
    n_valid: int  # valid depth pixels
    inside_grid: float  # fraction of them whose voxel is inside the grid
    median_df: float  # median distance field value at those voxels (voxel units)
    frac_df_below: float  # fraction with distance < threshold (threshold given to the function)
    n_labelled: int  # pixels whose voxel carries a 3D semantic label (0 when no labels given)
    semantic_agreement: float  # fraction of those where 2D and 3D classes agree (nan if none)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def backproject(depth: np.ndarray, intrinsic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Camera points (N,3) of all pixels with depth > 0 and the flat pixel indices they come from."""
    h, w = depth.shape
    v, u = np.mgrid[0:h, 0:w]
    valid = np.flatnonzero(depth.ravel() > 0)
    z = depth.ravel()[valid].astype(np.float64)
    fx, fy, cx, cy = intrinsic[0, 0], intrinsic[1, 1], intrinsic[0, 2], intrinsic[1, 2]
    x = (u.ravel()[valid] - cx) * z / fx
    y = (v.ravel()[valid] - cy) * z / fy
    return np.stack([x, y, z], axis=1), valid


def depth_alignment(
    depth: np.ndarray,
    intrinsic: np.ndarray,
    camera_to_grid: np.ndarray,
    tdf: np.ndarray,
    semantic_2d: np.ndarray | None = None,
    semantic_3d: np.ndarray | None = None,
    depth_range: tuple[float, float] = (0.4, 6.0),
    threshold: float = 1.5,
) -> AlignmentStats:
    """Distance-field and label agreement of back-projected depth (see module docstring).

    ``depth``/``semantic_2d`` (H, W) and ``intrinsic`` [4,4] at the same resolution; ``tdf`` and
    ``semantic_3d`` in camera-convention grid orientation; pixels outside ``depth_range`` are ignored.
    """
    d = np.where((depth >= depth_range[0]) & (depth <= depth_range[1]), depth, 0.0)
    pts, pix = backproject(d, np.asarray(intrinsic, dtype=np.float64))
    m = np.asarray(camera_to_grid, dtype=np.float64)
    g = pts @ m[:3, :3].T + m[:3, 3]
    vox = np.floor(g).astype(np.int64)
    inside = np.all((vox >= 0) & (vox < np.array(tdf.shape)), axis=1)
    vox_in = vox[inside]
    df = np.full(len(pts), np.inf)
    df[inside] = tdf[vox_in[:, 0], vox_in[:, 1], vox_in[:, 2]]
    n = len(pts)
    n_lab, agree = 0, float("nan")
    if semantic_2d is not None and semantic_3d is not None:
        lab = np.zeros(len(pts), dtype=np.int64)
        lab[inside] = semantic_3d[vox_in[:, 0], vox_in[:, 1], vox_in[:, 2]]
        has = lab > 0
        n_lab = int(has.sum())
        if n_lab:
            agree = float((semantic_2d.ravel()[pix][has] == lab[has]).mean())
    return AlignmentStats(
        n_valid=n,
        inside_grid=float(inside.mean()) if n else float("nan"),
        median_df=float(np.median(df)) if n else float("nan"),
        frac_df_below=float((df < threshold).mean()) if n else float("nan"),
        n_labelled=n_lab,
        semantic_agreement=agree,
    )
