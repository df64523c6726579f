"""Per-sample 3D panoptic fusion of the completion decoder's outputs (toolkit ``panoptic_3d_inference``).

The level-256 TDF is densified with the truncation as the default value (free space), the level-256 query
mask logits are fused with the 2D class logits by :func:`frustum3d.panoptic.panoptic_fusion` (Mask2Former
rules: keep confident queries, voxel arg-max of score x sigmoid, merge stuff, fill unassigned surface
voxels), giving int32 panoptic and semantic volumes and the id -> class mapping.

:func:`fuse_voxels_batch` gives the same result as values at the finest level's voxels only
(:class:`FusedVoxels`; every other voxel is free space and void): what the Predictor copies to the host, 1 MB
instead of 192 MB of dense volumes per 256^3 frame. Evaluation (PRQ) keeps the dense form.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from frustum3d.losses import batch_row_ranges
from frustum3d.panoptic import SURFACE_THRESHOLD, PanopticVolume, panoptic_fusion, panoptic_fusion_voxels
from frustum3d.sparse import SparseVoxels

__all__ = ["FusedSample", "FusedVoxels", "dense_tdf", "fuse_batch", "fuse_sample", "fuse_voxels_batch",
           "voxel_index"]



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
    return FusedSample(tdf=tdf, panoptic=vol.panoptic, semantic=vol.semantic, mapping=dict(vol.mapping),
                       is_thing=_is_thing(vol.mapping, stuff_ids), volume=vol)


def _is_thing(mapping: dict[int, int], stuff_ids: Sequence[int]) -> dict[int, bool]:
    """{segment id: whether its class is a thing (not in ``stuff_ids``)}."""
    stuff = {int(s) for s in stuff_ids}
    return {sid: cls not in stuff for sid, cls in mapping.items()}


def fuse_batch(outputs: dict[str, Any], **kwargs: Any) -> list[FusedSample]:
    """:func:`fuse_sample` for every batch item."""
    n = outputs["plane"].class_logits.shape[0]
    return [fuse_sample(outputs, b, **kwargs) for b in range(n)]


@dataclass
class FusedVoxels:
    """One reconstructed frame as values at its predicted finest-level voxels (module docstring): ``index`` int32
    [N] C-order linear voxel index in ``grid_dims``, ``tdf`` float32 [N], ``panoptic`` / ``semantic`` int32 [N];
    every other voxel has TDF = truncation and ids 0. ``mapping`` / ``is_thing`` as in :class:`FusedSample`."""

    index: torch.Tensor
    tdf: torch.Tensor
    panoptic: torch.Tensor
    semantic: torch.Tensor
    mapping: dict[int, int]
    is_thing: dict[int, bool]


def voxel_index(coords: torch.Tensor, grid_dims: Sequence[int]) -> torch.Tensor:
    """int32 C-order linear index of ``[N, 3]`` voxel coordinates in ``grid_dims`` (a 256^3 grid fits int32)."""
    _, y, z = (int(d) for d in grid_dims)
    c = coords.to(torch.int32)
    return (c[:, 0] * y + c[:, 1]) * z + c[:, 2]


def fuse_voxels_batch(outputs: dict[str, Any], *, grid_dims: Sequence[int], truncation: float,
                      stuff_ids: Sequence[int], object_mask_threshold: float) -> list[FusedVoxels]:
    """:func:`fuse_batch` as :class:`FusedVoxels`, computed at the finest level's voxels only.

    Equal to the dense fusion (tested) when the geometry and the mask logits share one voxel set (the decoder's
    finest level) and the truncation exceeds the fusion's surface threshold; otherwise the dense fusion runs and
    its volumes are read at the geometry's voxels and at every labelled voxel.
    """
    geo, pan = outputs["geometry"], outputs["panoptic_256"]
    n = outputs["plane"].class_logits.shape[0]
    grid_dims = tuple(int(d) for d in grid_dims)
    # the fusion fills unassigned voxels up to |TDF| SURFACE_THRESHOLD: the voxel form needs a truncation above it,
    # so that no voxel outside the predicted set is surface
    if geo.coordinate_set is not pan.coordinate_set or float(truncation) <= SURFACE_THRESHOLD:
        return [_voxels_of_dense(fuse_sample(outputs, b, grid_dims=grid_dims, truncation=truncation,
                                             stuff_ids=stuff_ids, object_mask_threshold=object_mask_threshold),
                                 geo, b, grid_dims) for b in range(n)]
    out = []
    for b in range(n):
        rows = _rows(geo, b)
        tdf = geo.feats[rows, 0].detach().float()
        vox = panoptic_fusion_voxels(outputs["plane"].class_logits[b].detach().float(), pan.feats[rows].detach().float(),
                                     tdf, stuff_classes=stuff_ids, object_mask_threshold=object_mask_threshold)
        out.append(FusedVoxels(index=voxel_index(geo.coords[rows, 1:], grid_dims), tdf=tdf, panoptic=vox.panoptic,
                               semantic=vox.semantic, mapping=dict(vox.mapping),
                               is_thing=_is_thing(vox.mapping, stuff_ids)))
    return out


def _voxels_of_dense(fused: FusedSample, geometry: SparseVoxels, b: int, grid_dims: tuple[int, ...]) -> FusedVoxels:
    """A dense fusion's volumes at the geometry's voxels and at every labelled voxel (sorted, distinct)."""
    rows = _rows(geometry, b)
    index = torch.cat([voxel_index(geometry.coords[rows, 1:], grid_dims),
                       torch.nonzero(fused.panoptic.reshape(-1)).flatten().to(torch.int32)])
    index = torch.unique(index)
    flat = index.long()
    return FusedVoxels(index=index, tdf=fused.tdf.reshape(-1)[flat], panoptic=fused.panoptic.reshape(-1)[flat],
                       semantic=fused.semantic.reshape(-1)[flat], mapping=fused.mapping, is_thing=fused.is_thing)
