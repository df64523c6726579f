"""Per-sample 3D panoptic fusion of the completion decoder's outputs (toolkit ``panoptic_3d_inference``).

The level-256 TDF is densified with the truncation as the default value (free space), the level-256 query
mask logits are fused with the 2D class logits by :func:`frustum3d.panoptic.panoptic_fusion` (Mask2Former
rules: keep confident queries, voxel arg-max of score x sigmoid, merge stuff, fill unassigned surface
voxels), giving int32 panoptic and semantic volumes and the id -> class mapping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from frustum3d.losses import batch_row_ranges
from frustum3d.panoptic import PanopticVolume, panoptic_fusion
from frustum3d.sparse import SparseVoxels

__all__ = ["FusedSample", "dense_tdf", "fuse_batch", "fuse_sample"]


@dataclass
class FusedSample:
    """One reconstructed frame: ``tdf`` float32 [X, Y, Z] (voxels), ``panoptic``/``semantic`` int32 [X, Y, Z],
    ``mapping`` {segment id: class} in segment order, ``is_thing`` {segment id: bool}, ``volume`` (the full
    :class:`frustum3d.panoptic.PanopticVolume`)."""

    tdf: torch.Tensor
    panoptic: torch.Tensor
    semantic: torch.Tensor
    mapping: dict[int, int]
    is_thing: dict[int, bool]
    volume: PanopticVolume


def _rows(x: SparseVoxels, b: int) -> slice:
    """Batch item ``b``'s rows: one contiguous block (:func:`frustum3d.losses.batch_row_ranges`, from the set's
    cached per-item counts: no device read at batch 1, one per coordinate set otherwise)."""
    return slice(*batch_row_ranges(x)[b])


def dense_tdf(geometry: SparseVoxels, b: int, grid_dims: Sequence[int], truncation: float) -> torch.Tensor:
    """Dense float32 TDF of batch item ``b``: predicted voxels from ``geometry``, ``truncation`` elsewhere."""
    out = torch.full(tuple(grid_dims), float(truncation), dtype=torch.float32, device=geometry.feats.device)
    rows = _rows(geometry, b)
    c = geometry.coords[rows, 1:]
    out[c[:, 0], c[:, 1], c[:, 2]] = geometry.feats[rows, 0].detach().float()
    return out


def fuse_sample(outputs: dict[str, Any], b: int, *, grid_dims: Sequence[int], truncation: float,
                stuff_ids: Sequence[int], object_mask_threshold: float) -> FusedSample:
    """Fuse batch item ``b`` of a :class:`~nvp3d.model.net3d.NVPanoptix3D` output dict."""
    tdf = dense_tdf(outputs["geometry"], b, grid_dims, truncation)
    pan = outputs["panoptic_256"]
    rows = _rows(pan, b)
    logits = outputs["plane"].class_logits[b].detach().float()
    vol = panoptic_fusion(logits, pan.feats[rows].detach().float(), tdf, coordinates=pan.coords[rows, 1:],
                          stuff_classes=stuff_ids, object_mask_threshold=object_mask_threshold)
    stuff = {int(s) for s in stuff_ids}
    is_thing = {sid: cls not in stuff for sid, cls in vol.mapping.items()}
    return FusedSample(tdf=tdf, panoptic=vol.panoptic, semantic=vol.semantic, mapping=dict(vol.mapping),
                       is_thing=is_thing, volume=vol)


def fuse_batch(outputs: dict[str, Any], **kwargs: Any) -> list[FusedSample]:
    """:func:`fuse_sample` for every batch item."""
    n = outputs["plane"].class_logits.shape[0]
    return [fuse_sample(outputs, b, **kwargs) for b in range(n)]
