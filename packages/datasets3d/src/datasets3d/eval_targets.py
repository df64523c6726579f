"""Ground-truth segments for PRQ / RSQ / RRQ, built the way the metric defines a segment.

For every segment: ``surface = member & (TDF < iso_value)``; when ``downsample_factor`` d > 1 the
surface is max-pooled (kernel d+1, stride d, padding 1) and the frustum nearest-resized to the coarse
grid; then the surface is *thickened* by the metric's shifted 3x3x3 dilation (every true voxel p also
marks p + o for o in {0,1,2}^3, dropped outside the grid) and ANDed with the frustum.

Segments, in order: thing instances in ascending 3D instance id (label = majority 3D semantic class of
the instance's voxels excluding 0 and stuff; an instance with no such voxel is skipped; its stuff-labelled
voxels belong to the stuff segment), then one segment per stuff class present (ascending class id).
All 3D instances are evaluated (as Uni-3D / TAO do), not only those that survive the 2D pixel filter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .targets2d import majority_label


@dataclass
class EvalSegments:
    masks: torch.Tensor  # bool [m, X', Y', Z'] at the evaluation resolution
    labels: torch.Tensor  # int64 [m]
    instance_ids: torch.Tensor  # int64 [m]; raw 3D instance id for things, 0 for stuff
    is_thing: torch.Tensor  # bool [m]
    frustum: torch.Tensor  # bool [X', Y', Z']


def thicken(surface: torch.Tensor) -> torch.Tensor:
    """The metric's dilation: out[q] = any(surface[q - o]) for o in {0,1,2}^3 (a +1-shifted 3x3x3)."""
    x = F.pad(surface[None, None].float(), (2, 0, 2, 0, 2, 0))
    return F.max_pool3d(x, kernel_size=3, stride=1)[0, 0] > 0


def downsample_surface(surface: torch.Tensor, factor: int) -> torch.Tensor:
    if factor == 1:
        return surface
    return F.max_pool3d(surface[None, None].float(), kernel_size=factor + 1, stride=factor, padding=1)[0, 0] > 0


def downsample_frustum(frustum: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest resize to 1/factor (picks every factor-th voxel, like ``F.interpolate(mode='nearest')``)."""
    if factor == 1:
        return frustum
    size = tuple(n // factor for n in frustum.shape)
    return F.interpolate(frustum[None, None].float(), size=size, mode="nearest")[0, 0] > 0


def _segment(member_flat: np.ndarray, tdf: np.ndarray, iso: float, frustum: torch.Tensor, factor: int) -> torch.Tensor:
    shape = tdf.shape
    surf = np.zeros(tdf.size, dtype=bool)
    keep = member_flat[tdf[np.unravel_index(member_flat, shape)] < iso]
    surf[keep] = True
    s = torch.from_numpy(surf.reshape(shape))
    if keep.size == 0:
        return torch.zeros(frustum.shape, dtype=torch.bool)
    coords = np.unravel_index(keep, shape)
    # Work on the bounding box (plus the pooling / dilation reach) to keep 256^3 cheap.
    lo = [max(0, int(c.min()) - factor - 1) // factor * factor for c in coords]
    hi = [min(n, int(c.max()) + 2 * factor + 2) for c, n in zip(coords, shape, strict=True)]
    crop = s[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    # Pad the crop so that pooling near its border sees zeros just as the full volume would.
    small = downsample_surface(crop, factor) if factor > 1 else crop
    out = torch.zeros(frustum.shape, dtype=torch.bool)
    o = [v // factor for v in lo]
    ext = [min(small.shape[i], frustum.shape[i] - o[i]) for i in range(3)]
    out[o[0]:o[0] + ext[0], o[1]:o[1] + ext[1], o[2]:o[2] + ext[2]] = small[:ext[0], :ext[1], :ext[2]]
    # Dilation reaches 2 voxels up; thicken on a window grown by 2 at the high side.
    b_lo = [max(0, v - 1) for v in o]
    b_hi = [min(frustum.shape[i], o[i] + ext[i] + 3) for i in range(3)]
    win = out[b_lo[0]:b_hi[0], b_lo[1]:b_hi[1], b_lo[2]:b_hi[2]]
    out[b_lo[0]:b_hi[0], b_lo[1]:b_hi[1], b_lo[2]:b_hi[2]] = thicken(win)
    return out & frustum


def build_eval_segments(
    semantic_3d: np.ndarray,
    instance_3d: np.ndarray,
    tdf: np.ndarray,
    frustum: np.ndarray,
    stuff_ids: tuple[int, ...],
    iso_value: float,
    downsample_factor: int = 1,
) -> EvalSegments:
    """Segments of one frame (see module docstring); all volumes in camera-convention orientation."""
    factor = int(downsample_factor)
    fr = downsample_frustum(torch.from_numpy(np.ascontiguousarray(frustum, dtype=bool)), factor)
    labelled = np.flatnonzero((semantic_3d != 0) | (instance_3d != 0))
    coords = np.unravel_index(labelled, semantic_3d.shape)
    sem_l, ins_l = semantic_3d[coords].astype(np.int64), instance_3d[coords].astype(np.int64)
    stuff = np.isin(sem_l, np.asarray(stuff_ids, dtype=np.int64))
    exclude = {0, *stuff_ids}
    masks, labels, ids, things = [], [], [], []
    for iid in np.unique(ins_l[ins_l > 0]).tolist():
        sel = (ins_l == iid) & ~stuff
        label = majority_label(sem_l[sel], exclude)
        if label == 0:
            continue
        masks.append(_segment(labelled[sel], tdf, iso_value, fr, factor))
        labels.append(label)
        ids.append(iid)
        things.append(True)
    for c in stuff_ids:
        sel = sem_l == c
        if sel.any():
            masks.append(_segment(labelled[sel], tdf, iso_value, fr, factor))
            labels.append(c)
            ids.append(0)
            things.append(False)
    return EvalSegments(
        masks=torch.stack(masks) if masks else torch.zeros((0, *fr.shape), dtype=torch.bool),
        labels=torch.tensor(labels, dtype=torch.int64),
        instance_ids=torch.tensor(ids, dtype=torch.int64),
        is_thing=torch.tensor(things, dtype=torch.bool),
        frustum=fr,
    )


def reference_segment_mask(member: np.ndarray, tdf: np.ndarray, frustum: np.ndarray, iso: float, factor: int) -> np.ndarray:
    """Brute-force definition (dense ops, explicit offset loop) used to test :func:`build_eval_segments`."""
    surf = member & (tdf < iso)
    fr = frustum
    if factor > 1:
        t = torch.from_numpy(surf)[None, None].float()
        surf = (F.max_pool3d(t, kernel_size=factor + 1, stride=factor, padding=1)[0, 0] > 0).numpy()
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
