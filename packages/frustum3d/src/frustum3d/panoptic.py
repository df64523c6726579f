"""3D panoptic fusion: per-query class scores and voxel mask logits -> one dense panoptic volume.

This is the Mask2Former-style inference used by Uni-3D / NVPanoptix3D at the 256^3 level of the
completion U-Net. Each query predicts a class distribution ``[K+1]`` (the last entry is
"no object") and a mask logit per voxel. The fusion

1. keeps the queries whose arg-max label is neither the no-object entry nor class 0 (free space)
   and whose soft-max score is strictly greater than ``object_mask_threshold``;
2. gives every voxel to the kept query with the largest ``score * sigmoid(mask_logit)`` (ties go
   to the earlier query) and keeps the assignment only where that query's own
   ``sigmoid(mask_logit) >= mask_threshold``;
3. turns every kept query that owns at least one voxel into a segment, in query order; all stuff
   queries of one class share a single segment (the id of the first such query);
4. fills still-unassigned surface voxels (``|tdf| <= surface_threshold``) with the segment of
   their arg-max query (when that query produced a segment).

Voxels for which no mask logit exists (sparse input) count as ``sigmoid = 0`` for every query, so
their arg-max is the first kept query: this is how the reference densifies its sparse masks, and it
matters only for surface voxels that the sparse level did not predict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .sparse.transfer import host_to_device

__all__ = [
    "FRONT3D_CLASSES",
    "FRONT3D_STUFF_CLASSES",
    "FRONT3D_THING_CLASSES",
    "PanopticFusionError",
    "kept_query_mask",
    "PanopticVolume",
    "PanopticVoxels",
    "SURFACE_THRESHOLD",
    "mapping_from_pairs",
    "panoptic_fusion",
    "panoptic_fusion_voxels",
]

FRONT3D_CLASSES: dict[int, tuple[str, bool]] = {
    1: ("cabinet", True),
    2: ("bed", True),
    3: ("chair", True),
    4: ("sofa", True),
    5: ("table", True),
    6: ("desk", True),
    7: ("dresser", True),
    8: ("lamp", True),
    9: ("other", True),
    10: ("wall", False),
    11: ("floor", False),
    12: ("ceiling", False),
}
"""3D-FRONT / Matterport label set: class id -> (name, isthing). Class 0 is free space / void."""

FRONT3D_THING_CLASSES: tuple[int, ...] = tuple(c for c, (_, thing) in FRONT3D_CLASSES.items() if thing)
FRONT3D_STUFF_CLASSES: tuple[int, ...] = tuple(c for c, (_, thing) in FRONT3D_CLASSES.items() if not thing)


class PanopticFusionError(ValueError):
    """Raised when the inputs of :func:`panoptic_fusion` have inconsistent shapes or values."""


@dataclass(frozen=True)
class PanopticVolume:
    """Result of :func:`panoptic_fusion`.

    Attributes:
        panoptic: int32 ``[X, Y, Z]`` segment id per voxel, 0 = void. Ids are 1..M in creation order.
        semantic: int32 ``[X, Y, Z]`` class id per voxel (0 where ``panoptic`` is 0).
        mapping: segment id -> class id, in segment order (the order the PRQ matcher iterates).
        mapping_tensor: int64 ``[M, 2]`` rows ``(segment_id, class_id)`` in the same order.
        segment_queries: segment id -> indices (into the input query axis) of the queries merged into it.
        scores: float ``[Q]`` soft-max score of every query's arg-max label (kept or not).
        labels: int64 ``[Q]`` arg-max label of every query (``K`` = no object).
    """

    panoptic: Tensor
    semantic: Tensor
    mapping: dict[int, int]
    mapping_tensor: Tensor
    segment_queries: dict[int, list[int]]
    scores: Tensor
    labels: Tensor


#: |TDF| (voxels) up to which the fusions fill unassigned voxels: their default ``surface_threshold``
SURFACE_THRESHOLD = 1.5


def _check_class_logits(class_logits: Tensor) -> None:
    if class_logits.dim() != 2 or class_logits.shape[1] < 2:
        raise PanopticFusionError(
            f"class_logits must be [Q, K+1] with K >= 1 (last column = no-object), got {tuple(class_logits.shape)}"
        )


def kept_query_mask(class_logits: Tensor, object_mask_threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """(score and label of every query's arg-max class, bool ``[Q]``: which queries the fusion keeps, those neither
    no-object nor class 0 with a score strictly above ``object_mask_threshold``) for ``class_logits`` ``[Q, K+1]``."""
    no_object = class_logits.shape[-1] - 1
    scores, labels = torch.softmax(class_logits, dim=-1).max(dim=-1)
    return scores, labels, labels.ne(no_object) & labels.ne(0) & (scores > object_mask_threshold)


def _kept_queries(class_logits: Tensor, object_mask_threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`kept_query_mask` with the kept queries as indices."""
    scores, labels, keep = kept_query_mask(class_logits, object_mask_threshold)
    return scores, labels, torch.nonzero(keep).flatten()


def _check_inputs(class_logits: Tensor, mask_logits: Tensor, tdf: Tensor, coordinates: Tensor | None) -> None:
    _check_class_logits(class_logits)
    if tdf.dim() != 3:
        raise PanopticFusionError(f"tdf must be a dense [X, Y, Z] volume, got shape {tuple(tdf.shape)}")
    num_queries = class_logits.shape[0]
    if coordinates is None:
        if mask_logits.dim() != 4 or mask_logits.shape[0] != num_queries or mask_logits.shape[1:] != tdf.shape:
            raise PanopticFusionError(
                f"dense mask_logits must be [Q, X, Y, Z] = [{num_queries}, {', '.join(map(str, tdf.shape))}], "
                f"got {tuple(mask_logits.shape)} (pass coordinates= for sparse [N, Q] mask logits)"
            )
        return
    if coordinates.dim() != 2 or coordinates.shape[1] != 3:
        raise PanopticFusionError(f"coordinates must be [N, 3] voxel indices, got {tuple(coordinates.shape)}")
    if mask_logits.dim() != 2 or mask_logits.shape != (coordinates.shape[0], num_queries):
        raise PanopticFusionError(
            f"sparse mask_logits must be [N, Q] = [{coordinates.shape[0]}, {num_queries}], "
            f"got {tuple(mask_logits.shape)}"
        )
    if coordinates.numel() > 0:
        lo, hi = torch.aminmax(coordinates, dim=0)
        bounds = torch.stack([lo, hi]).tolist()  # one read for both tests, no grid copy to the device
        if min(bounds[0]) < 0 or any(h >= n for h, n in zip(bounds[1], tdf.shape)):
            raise PanopticFusionError(f"coordinates fall outside the grid {tuple(tdf.shape)}; crop or shift them first")


def _dense_winner(scores: Tensor, mask_logits: Tensor, queries: list[int]) -> tuple[Tensor, Tensor]:
    """Arg-max over ``queries`` (ties -> first) of score*sigmoid(mask) for dense ``[Q, X, Y, Z]`` logits.

    Runs one query at a time so peak memory is a few volumes, not one per query.
    Returns (winner position in ``queries``, int64 volume; sigmoid of the winner's own mask logit).
    """
    own = torch.sigmoid(mask_logits[queries[0]])
    best = scores[0] * own
    winner = torch.zeros(best.shape, dtype=torch.long, device=best.device)
    for k in range(1, len(queries)):
        sig = torch.sigmoid(mask_logits[queries[k]])
        prob = scores[k] * sig
        better = prob > best
        best = torch.where(better, prob, best)
        own = torch.where(better, sig, own)
        winner.masked_fill_(better, k)
    return winner, own


def _sparse_winner(scores: Tensor, mask_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Same as :func:`_dense_winner` for ``[N, Qk]`` logits (ties -> first query)."""
    sig = torch.sigmoid(mask_logits)
    winner = (scores.unsqueeze(0) * sig).argmax(dim=1)
    return winner, sig.gather(1, winner.unsqueeze(1)).squeeze(1)


def _segments(kept_classes: list[int], owned: list[int], kept_queries: list[int], stuff: set[int]
              ) -> tuple[list[int], dict[int, int], dict[int, list[int]]]:
    """Segment id per kept query (0 = no segment: it owns no voxel), in query order, stuff of one class merged
    into its first query's segment; the mapping segment id -> class; and each segment's query indices."""
    query_segment = [0] * len(kept_classes)
    mapping: dict[int, int] = {}
    segment_queries: dict[int, list[int]] = {}
    stuff_segment: dict[int, int] = {}
    for k, cls in enumerate(kept_classes):
        if owned[k] == 0:
            continue
        if cls in stuff and cls in stuff_segment:
            query_segment[k] = stuff_segment[cls]
        else:
            query_segment[k] = len(mapping) + 1
            mapping[query_segment[k]] = cls
            if cls in stuff:
                stuff_segment[cls] = query_segment[k]
        segment_queries.setdefault(query_segment[k], []).append(int(kept_queries[k]))
    return query_segment, mapping, segment_queries


def _class_table(mapping: dict[int, int], device: torch.device) -> Tensor:
    """int32 class id per segment id (index 0 = void), for a mapping of ids 1..M in order (:func:`_segments`)."""
    return host_to_device([0] + list(mapping.values()), device, torch.int32)


def panoptic_fusion(
    class_logits: Tensor,
    mask_logits: Tensor,
    tdf: Tensor,
    frustum_mask: Tensor | None = None,
    *,
    coordinates: Tensor | None = None,
    stuff_classes: Iterable[int] = FRONT3D_STUFF_CLASSES,
    object_mask_threshold: float = 0.8,
    mask_threshold: float = 0.5,
    surface_threshold: float = SURFACE_THRESHOLD,
) -> PanopticVolume:
    """Fuse per-query 3D mask predictions into a dense panoptic volume (one sample).

    Args:
        class_logits: ``[Q, K+1]`` class logits; column ``K`` is "no object", class 0 is free space.
        mask_logits: dense ``[Q, X, Y, Z]`` mask logits, or ``[N, Q]`` logits at ``coordinates``.
        tdf: ``[X, Y, Z]`` predicted (truncated) distance field in voxel units; sign is ignored.
        frustum_mask: optional bool ``[X, Y, Z]``; when given, voxels outside it stay void. The
            reference does not mask here (PRQ applies the frustum after thickening), so leave it
            ``None`` to reproduce reference scores exactly.
        coordinates: ``[N, 3]`` unique voxel indices for sparse ``mask_logits``.
        stuff_classes: classes whose queries are merged into one segment per class.
        object_mask_threshold: queries need a score strictly above this.
        mask_threshold: a voxel is assigned only if its winning query's sigmoid is >= this.
        surface_threshold: unassigned voxels with ``|tdf| <= surface_threshold`` are filled.

    Returns:
        :class:`PanopticVolume` with int32 panoptic ids (0 = void), semantic labels and the mapping.
    """
    class_logits = torch.as_tensor(class_logits)
    mask_logits = torch.as_tensor(mask_logits)
    tdf = torch.as_tensor(tdf)
    if coordinates is not None:
        coordinates = torch.as_tensor(coordinates).long()
    _check_inputs(class_logits, mask_logits, tdf, coordinates)
    if frustum_mask is not None:
        frustum_mask = torch.as_tensor(frustum_mask, dtype=torch.bool, device=tdf.device)
        if frustum_mask.shape != tdf.shape:
            raise PanopticFusionError(
                f"frustum_mask shape {tuple(frustum_mask.shape)} differs from tdf shape {tuple(tdf.shape)}"
            )
    stuff = {int(c) for c in stuff_classes}
    scores, labels, kept_queries = _kept_queries(class_logits, object_mask_threshold)

    shape = tdf.shape
    device = tdf.device
    panoptic = torch.zeros(shape, dtype=torch.int32, device=device)
    semantic = torch.zeros(shape, dtype=torch.int32, device=device)
    mapping: dict[int, int] = {}
    segment_queries: dict[int, list[int]] = {}

    if kept_queries.numel() > 0:
        kept_scores = scores[kept_queries]
        kept_classes = labels[kept_queries].tolist()
        # "Sites" carry mask logits: every voxel (dense) or the given coordinates (sparse, sorted).
        if coordinates is None:
            site_voxels = None
            winner, own = _dense_winner(kept_scores, mask_logits, kept_queries.tolist())
            winner, own = winner.reshape(-1).to(device), own.reshape(-1).to(device)
        else:
            flat = (coordinates[:, 0] * shape[1] + coordinates[:, 1]) * shape[2] + coordinates[:, 2]
            site_voxels, order = torch.sort(flat.to(device))
            if bool((site_voxels[1:] == site_voxels[:-1]).any()):
                raise PanopticFusionError("coordinates contain duplicate voxels; reduce them before panoptic fusion")
            winner, own = _sparse_winner(kept_scores, mask_logits[:, kept_queries])
            winner, own = winner.to(device)[order], own.to(device)[order]
        assigned = own >= mask_threshold
        if frustum_mask is not None:
            frustum_flat = frustum_mask.reshape(-1)
            assigned &= frustum_flat if site_voxels is None else frustum_flat[site_voxels]
        owned = torch.bincount(winner[assigned], minlength=kept_queries.numel()).tolist()
        query_segment, mapping, segment_queries = _segments(kept_classes, owned, kept_queries.tolist(), stuff)

        lut = host_to_device(query_segment, device, torch.int32)
        flat_panoptic = panoptic.view(-1)
        if site_voxels is None:
            flat_panoptic.copy_(torch.where(assigned, lut[winner], 0))
        else:
            flat_panoptic[site_voxels[assigned]] = lut[winner[assigned]]

        # Fill unassigned surface voxels with their arg-max query's segment (query 0 where no logits).
        fill = (tdf.abs() <= surface_threshold).reshape(-1) & (flat_panoptic == 0)
        if frustum_mask is not None:
            fill &= frustum_mask.reshape(-1)
        fill_voxels = torch.nonzero(fill).flatten()
        if site_voxels is None:
            fill_winner = winner[fill_voxels]
        else:
            pos = torch.searchsorted(site_voxels, fill_voxels).clamp_(max=max(site_voxels.numel() - 1, 0))
            if site_voxels.numel() > 0:
                has_logits = site_voxels[pos] == fill_voxels
                fill_winner = torch.where(has_logits, winner[pos], 0)
            else:
                fill_winner = torch.zeros_like(fill_voxels)
        flat_panoptic[fill_voxels] = lut[fill_winner]

        class_lut = _class_table(mapping, device)
        labelled = torch.nonzero(flat_panoptic).flatten()
        semantic.view(-1)[labelled] = class_lut[flat_panoptic[labelled].long()]

    mapping_tensor = torch.tensor(list(mapping.items()), dtype=torch.long).reshape(-1, 2)
    return PanopticVolume(
        panoptic=panoptic,
        semantic=semantic,
        mapping=mapping,
        mapping_tensor=mapping_tensor,
        segment_queries=segment_queries,
        scores=scores,
        labels=labels,
    )


@dataclass(frozen=True)
class PanopticVoxels:
    """Result of :func:`panoptic_fusion_voxels`: one value per given voxel.

    Attributes:
        panoptic: int32 ``[N]`` segment id per voxel, 0 = void.
        semantic: int32 ``[N]`` class id per voxel (0 where ``panoptic`` is 0).
        mapping, segment_queries, scores, labels: as in :class:`PanopticVolume`.
    """

    panoptic: Tensor
    semantic: Tensor
    mapping: dict[int, int]
    segment_queries: dict[int, list[int]]
    scores: Tensor
    labels: Tensor


def panoptic_fusion_voxels(
    class_logits: Tensor,
    mask_logits: Tensor,
    tdf: Tensor,
    *,
    stuff_classes: Iterable[int] = FRONT3D_STUFF_CLASSES,
    object_mask_threshold: float = 0.8,
    mask_threshold: float = 0.5,
    surface_threshold: float = SURFACE_THRESHOLD,
) -> PanopticVoxels:
    """:func:`panoptic_fusion` of sparse mask logits, computed at their voxels only.

    ``mask_logits`` ``[N, Q]`` and ``tdf`` ``[N]`` belong to the same N distinct voxels (a decoder level's set).
    The result equals the dense fusion's volumes at those voxels, and the dense volumes are void elsewhere,
    whenever no voxel outside the set has ``|tdf| <= surface_threshold``: true for a TDF that is the
    truncation (> ``surface_threshold``) away from the predicted voxels, as the finest level's is. Why: a 256^3
    frame predicts about 10^5 voxels of 1.7 x 10^7, and its consumer (the Predictor's host copy) needs no
    dense volume; the dense passes (fill, full-volume scans, index writes) are skipped.
    """
    class_logits = torch.as_tensor(class_logits)
    mask_logits = torch.as_tensor(mask_logits)
    tdf = torch.as_tensor(tdf)
    _check_class_logits(class_logits)
    if tdf.dim() != 1 or mask_logits.shape != (tdf.shape[0], class_logits.shape[0]):
        raise PanopticFusionError(
            f"mask_logits must be [N, Q] and tdf [N] of the same voxels, got {tuple(mask_logits.shape)} and "
            f"{tuple(tdf.shape)} for Q = {class_logits.shape[0]}"
        )
    stuff = {int(c) for c in stuff_classes}
    scores, labels, kept_queries = _kept_queries(class_logits, object_mask_threshold)
    device = tdf.device
    panoptic = torch.zeros(tdf.shape, dtype=torch.int32, device=device)
    semantic = torch.zeros(tdf.shape, dtype=torch.int32, device=device)
    mapping: dict[int, int] = {}
    segment_queries: dict[int, list[int]] = {}
    if kept_queries.numel() > 0 and tdf.numel() > 0:
        winner, own = _sparse_winner(scores[kept_queries], mask_logits[:, kept_queries])
        winner, own = winner.to(device), own.to(device)
        assigned = own >= mask_threshold
        owned = torch.bincount(winner[assigned], minlength=kept_queries.numel()).tolist()
        query_segment, mapping, segment_queries = _segments(labels[kept_queries].tolist(), owned,
                                                            kept_queries.tolist(), stuff)
        # assigned voxels take their winner's segment; unassigned surface voxels too (the dense fill step: a
        # voxel with logits fills from its own arg-max query, whose segment may be 0)
        lut = host_to_device(query_segment, device, torch.int32)
        take = assigned | (tdf.abs() <= surface_threshold)
        panoptic = torch.where(take, lut[winner], 0).to(torch.int32)
        semantic = _class_table(mapping, device)[panoptic.long()]
    return PanopticVoxels(panoptic=panoptic, semantic=semantic, mapping=mapping, segment_queries=segment_queries,
                          scores=scores, labels=labels)


def mapping_from_pairs(pairs: Mapping[int, int] | Sequence[Sequence[int]] | Tensor) -> dict[int, int]:
    """Normalise a segment-id -> class mapping given as a dict or ``[M, 2]`` rows into an ordered dict."""
    if isinstance(pairs, Mapping):
        return {int(k): int(v) for k, v in pairs.items()}
    rows = torch.as_tensor(pairs).reshape(-1, 2).tolist()
    out: dict[int, int] = {}
    for seg_id, cls in rows:
        if int(seg_id) in out:
            raise PanopticFusionError(f"segment id {seg_id} appears twice in the mapping rows")
        out[int(seg_id)] = int(cls)
    return out
