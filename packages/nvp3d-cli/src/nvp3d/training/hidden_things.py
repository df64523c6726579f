"""Extra loss weight on the GT thing voxels that the image does not show (``model.frustum3d.hidden_thing_weight``).

On the synthetic benchmark most GT things that the 3D panoptic fusion gives to walls and floors are hidden in the
image: 9-15 % of their voxels project into their own GT 2D mask, against 42-45 % for the things it matches
(docs/learning.md, stop 54). No 2D label reaches them; only the 3D stage's completion can. Those voxels are a small
share of a frame's voxel means, so the toolkit's losses hardly ask for them. The factor multiplies the per-voxel
loss weighting (``weighting_{64,128,256}``) there, so the occupancy, geometry and panoptic BCE terms count them
more. Dice and ownership terms take no voxel weighting and are unchanged.

A thing voxel is *hidden* when it projects into the lifting plane onto a pixel outside its own GT 2D mask (the
pixel shows another segment, or the mask is empty); voxels that see no pixel are left alone (outside the frustum).
The coarse levels take the finest level's flags max-pooled like their segment masks (kernel, stride, padding
(4, 2, 1) and (8, 4, 2)).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from datasets3d.targets3d import POOL_64, POOL_128
from frustum3d.geometry import FrustumGeometry

from nvp3d.model.mask_prior import voxel_pixels

__all__ = ["hidden_thing_voxels", "upweight_hidden_things"]

#: max_pool3d (kernel, stride, padding) from the finest level to the half and quarter levels, as the segment masks
LEVEL_POOLING = {"128": POOL_128, "64": POOL_64}


def hidden_thing_voxels(masks_3d: torch.Tensor, masks_2d: torch.Tensor, is_thing: torch.Tensor,
                        intrinsic: torch.Tensor, geometry: FrustumGeometry) -> torch.Tensor:
    """Bool ``[X, Y, Z]``: the voxels of one frame's GT thing segments that the image does not show (module doc).

    ``masks_3d`` ``[n, X, Y, Z]`` and ``masks_2d`` ``[n, H, W]`` are the frame's segments in the same order,
    ``is_thing`` ``[n]``, ``intrinsic`` ``[4, 4]`` the lifting plane's (``intrinsic_reduced``)."""
    grid = tuple(masks_3d.shape[1:])
    hidden = torch.zeros(grid, dtype=torch.bool, device=masks_3d.device)
    things = is_thing.to(masks_3d.device).bool().nonzero().flatten()
    if things.numel() == 0:
        return hidden
    pw, ph = geometry.plane_size
    plane = F.interpolate(masks_2d[things.to(masks_2d.device)][None].float(), size=(ph, pw), mode="nearest")[0] > 0.5
    found = masks_3d[things].nonzero()  # [M, 4]: thing, x, y, z
    if found.numel() == 0:
        return hidden
    ui, vi, _, inside = voxel_pixels(found[:, 1:], intrinsic, geometry, (ph, pw), masks_3d.device)
    plane = plane.to(masks_3d.device)
    shown = plane[found[:, 0], vi, ui]
    flag = inside & ~shown
    xyz = found[flag, 1:]
    hidden[xyz[:, 0], xyz[:, 1], xyz[:, 2]] = True
    return hidden


def upweight_hidden_things(targets: dict[str, Any], batch: dict[str, Any], factor: float,
                           geometry: FrustumGeometry) -> dict[str, Any]:
    """``targets`` (from :func:`nvp3d.data.targets.targets_3d`) with ``weighting_{lvl}`` x ``factor`` at the
    hidden thing voxels of every frame of ``batch`` (a collated ``datasets3d`` batch: its 2D masks, ``is_thing``
    and ``intrinsic_reduced``; the 3D masks are the targets' ``masks_256``); a new dict."""
    out = dict(targets)
    hidden = torch.stack([
        hidden_thing_voxels(masks_3d, batch["masks"][b], batch["is_thing"][b],
                            batch["intrinsic_reduced"][b], geometry)
        for b, masks_3d in enumerate(targets["masks_256"])])
    levels = {"256": hidden}
    for lvl, (k, s, p) in LEVEL_POOLING.items():
        levels[lvl] = F.max_pool3d(hidden[:, None].float(), k, s, p)[:, 0] > 0.5
    for lvl, flags in levels.items():
        w = out[f"weighting_{lvl}"]
        if tuple(flags.shape) != tuple(w.shape):
            raise ValueError(f"hidden-thing flags at level {lvl} have shape {tuple(flags.shape)}, the weighting "
                             f"{tuple(w.shape)}: the segment masks and the weighting disagree on the grid")
        out[f"weighting_{lvl}"] = torch.where(flags, w * factor, w)
    return out
