"""Ground-truth segments for PRQ / RSQ / RRQ, built by the metric's own definition (``frustum3d.metrics``).

Segments, in order: thing instances in ascending 3D instance id (label = majority 3D semantic class of the
instance's voxels excluding 0 and stuff, ties -> smallest; an instance with no such voxel is skipped; its
stuff-labelled voxels belong to the stuff segment), then one segment per stuff class present (in
``stuff_ids`` order). All 3D instances are evaluated (as Uni-3D / TAO do), not only those that survive the
2D pixel filter. This is :func:`frustum3d.metrics.ground_truth_segments`.

Each segment's evaluated mask is :func:`frustum3d.metrics.segment_masks`: ``member & (|TDF| < iso_value)``
with the distance read in float32 (the benchmark's rule, for GT and predictions alike); for
``downsample_factor`` d > 1 max-pooled (kernel d+1, stride d, padding 1) and the frustum nearest-resized to
the coarse grid; then *thickened* (every true voxel p also marks p + o for o in {0,1,2}^3, dropped outside
the grid) and ANDed with the frustum. The reader's TDF is already ``|distance|`` in float32, so the
absolute value only matters for callers passing a signed field.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from frustum3d import metrics as M

__all__ = [
    "EvalSegments",
    "build_eval_segments",
    "downsample_frustum",
    "downsample_surface",
    "reference_segment_mask",
    "thicken",
]


@dataclass
class EvalSegments:
    """The GT evaluation segments of one frame."""

    masks: torch.Tensor  # bool [m, X', Y', Z'] at the evaluation resolution
    labels: torch.Tensor  # int64 [m]
    instance_ids: torch.Tensor  # int64 [m]; raw 3D instance id for things, 0 for stuff
    is_thing: torch.Tensor  # bool [m]
    frustum: torch.Tensor  # bool [X', Y', Z']


def thicken(surface: torch.Tensor) -> torch.Tensor:
    """The metric's dilation: out[q] = any(surface[q - o]) for o in {0,1,2}^3 (a +1-shifted 3x3x3)."""
    return M.thicken(surface)


def downsample_surface(surface: torch.Tensor, factor: int) -> torch.Tensor:
    """Max-pool (kernel factor+1, stride factor, padding 1) of a bool surface to the evaluation grid."""
    return M.downsample_shell(surface, factor)


def downsample_frustum(frustum: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest resize to 1/factor (picks every factor-th voxel, like ``F.interpolate(mode='nearest')``)."""
    return M.downsample_frustum(frustum, factor)


def build_eval_segments(
    semantic_3d: np.ndarray,
    instance_3d: np.ndarray,
    tdf: np.ndarray,
    frustum: np.ndarray,
    stuff_ids: tuple[int, ...],
    iso_value: float,
    downsample_factor: int = 1,
) -> EvalSegments:
    """Segments of one frame (see module docstring); all volumes in camera-convention orientation.

    The volumes may be flipped / strided views: only their labelled voxels are read (numpy fancy indexing),
    and :func:`frustum3d.metrics.ground_truth_voxel_segments` / :func:`~frustum3d.metrics.voxel_segment_masks`
    apply the metric's definition to them.
    """
    factor = int(downsample_factor)
    shape = tuple(semantic_3d.shape)
    fr = torch.from_numpy(np.ascontiguousarray(frustum, dtype=bool))
    labelled = np.flatnonzero((semantic_3d != 0) | (instance_3d != 0))
    coords = np.unravel_index(labelled, shape)
    segments = M.ground_truth_voxel_segments(
        torch.from_numpy(labelled), torch.from_numpy(instance_3d[coords].astype(np.int64)),
        torch.from_numpy(semantic_3d[coords].astype(np.int64)), shape, stuff_ids,
    )
    distance = torch.from_numpy(np.asarray(tdf[np.unravel_index(segments.voxels.numpy(), shape)]))
    masks = M.voxel_segment_masks(segments, distance, fr, iso_value=iso_value, downsample_factor=factor)
    return EvalSegments(
        masks=masks,
        labels=segments.labels,
        instance_ids=segments.instance_ids,
        is_thing=segments.instance_ids > 0,
        frustum=M.downsample_frustum(fr, factor),
    )


def reference_segment_mask(member: np.ndarray, tdf: np.ndarray, frustum: np.ndarray, iso: float, factor: int) -> np.ndarray:
    """Brute-force definition (dense ops, explicit offset loop) used to test :func:`build_eval_segments`."""
    surf = member & (np.abs(np.asarray(tdf, dtype=np.float32)) < iso)
    fr = frustum
    if factor > 1:
        t = torch.from_numpy(surf)[None, None].float()
        surf = (torch.nn.functional.max_pool3d(t, kernel_size=factor + 1, stride=factor, padding=1)[0, 0] > 0).numpy()
        fr = frustum[::factor, ::factor, ::factor]
    out = np.zeros_like(surf)
    xs, ys, zs = np.nonzero(surf)
    n = surf.shape
    for ox in range(3):
        for oy in range(3):
            for oz in range(3):
                px, py, pz = xs + ox, ys + oy, zs + oz
                ok = (px < n[0]) & (py < n[1]) & (pz < n[2])
                out[px[ok], py[ok], pz[ok]] = True
    return out & fr
