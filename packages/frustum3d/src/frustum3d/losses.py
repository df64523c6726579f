"""3D reconstruction losses of the completion U-Net (Uni-3D / TAO NVPanoptix3D stage-2 recipe).

Terms (each already multiplied by its weight in :class:`FrustumLoss`):

* ``loss_geometry``: L1 between the predicted TDF (level 256, at the predicted sparse coordinates) and the GT
  TDF clipped to [0, truncation], times the voxel weighting, mean over predicted voxels, x ``surface_weight``
  (5). The GT is clipped like the prediction (Dahnert); the toolkit clips it at 12 instead (set
  ``clip_target=False`` for that behaviour).
* ``loss_occupancy_{64,128,256}``: BCE-with-logits x weighting, x ``completion_weights`` (50, 25, 10). Level 64
  is dense and only counts voxels with finite logits (the decoder sets -inf outside the max-pooled frustum);
  levels 128/256 are evaluated at the coordinates where the decoder predicted occupancy (before pruning).
  GT missing at a coordinate (outside the dense target grid) counts as empty (0) with weight 1.
* ``loss_panoptic_{64,128,256}``: for each matched (query, GT mask) pair, BCE-with-logits of the query's 3D mask
  logits against the GT mask x weighting, averaged over that sample's voxels (level 64: voxels inside the
  frustum; 128/256: the sample's predicted voxels), summed over pairs, divided by the number of GT masks
  (``num_masks``, at least 1), x ``panoptic_weight`` (25).

* ``loss_panoptic_{64,128,256}_dice`` (only with ``panoptic_dice_weight`` > 0; not in the toolkit recipe): soft
  dice of the same matched pairs over the same voxels, summed over pairs / ``num_masks``, x
  ``panoptic_dice_weight``. The voxel-mean BCE of a small object is dominated by the empty voxels; dice is not.
* ``loss_panoptic_{64,128,256}_ce`` (only with ``panoptic_ce_weight`` > 0 and the queries' class logits; not in
  the toolkit recipe): at every voxel of a matched GT segment, cross-entropy over *all* queries of
  ``log(score_q) + log(sigmoid(mask_q))`` with the segment's query as the target. Panoptic fusion gives a voxel
  to the arg-max of ``score * sigmoid(mask)``, so this trains exactly that competition: the per-pair BCE lets a
  wall's mask stay high on a chair's few voxels (they are a tiny share of the wall's voxel mean), and the wall
  then owns the chair. Balanced per segment (each segment's voxel mean, summed / ``num_masks``), so a chair
  weighs as much as the floor. ``score_q`` is the query's best real-class probability (neither free space nor
  no-object), taken as a constant.

Every term is a scalar tensor connected to the graph even when a level is empty (then it is 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sparse import SparseVoxels
from .sparse.transfer import host_to_device

__all__ = [
    "batch_row_ranges",
    "semantic_loss_sparse",
    "sparse_lookup",
    "geometry_loss",
    "occupancy_loss_dense",
    "occupancy_loss_sparse",
    "panoptic_mask_loss_dense",
    "panoptic_mask_loss_sparse",
    "panoptic_dice_loss_dense",
    "panoptic_dice_loss_sparse",
    "dice_loss",
    "fusion_log_scores",
    "ownership_ce",
    "panoptic_ownership_loss_dense",
    "panoptic_ownership_loss_sparse",
    "FrustumLoss",
]

Indices = Sequence[tuple[Tensor, Tensor]]


def _grid_index(coords: Tensor, stride: int, grid_shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(``[N, 3]`` grid index of each voxel at ``stride``, clamped into ``grid_shape``; ``[N]`` inside it).

    Clamping instead of boolean row selection keeps every shape fixed, so no step waits for the device to
    count the rows inside; the callers mask the clamped lookups with ``inside``.
    """
    xyz = torch.div(coords[:, 1:], stride, rounding_mode="floor")
    shape = host_to_device(list(grid_shape), coords.device)
    inside = ((xyz >= 0) & (xyz < shape)).all(1)
    return torch.minimum(xyz.clamp_min(0), shape - 1), inside


def sparse_lookup(x: SparseVoxels, dense: Tensor, fill: float = 0.0) -> Tensor:
    """Values of ``dense[B, X/s, Y/s, Z/s]`` (the grid at ``x.stride``) at the voxels of ``x`` -> [N].

    Voxels outside the dense grid get ``fill``.
    """
    c = x.coords
    if dense.numel() == 0:
        return dense.new_full((c.shape[0],), fill)
    xi, inside = _grid_index(c, x.stride, dense.shape[1:])
    inside = inside & (c[:, 0] < dense.shape[0])
    b = c[:, 0].clamp(0, dense.shape[0] - 1)
    return torch.where(inside, dense[b, xi[:, 0], xi[:, 1], xi[:, 2]], fill)


def semantic_loss_sparse(logits: SparseVoxels, semantic: Tensor, balance: bool = True) -> Tensor:
    """Cross-entropy of per-voxel class logits ``[N, K]`` against the GT classes ``semantic`` ``[B, X, Y, Z]`` (at
    ``logits.stride``'s grid), averaged over the voxels whose GT class is in 1..K-1 (0: unlabelled / free space); 0
    without any. ``balance``: each voxel weighs 1 / sqrt(the number of such voxels of its class in the call), a
    weighted mean, so that walls and floors (most labelled voxels) do not teach the head to answer "wall"
    everywhere. Masked sums, not boolean row selections, so that no step waits for the device to count rows."""
    labels = sparse_lookup(logits, semantic.long(), fill=0)
    feats = logits.feats.to(_accumulation_dtype(logits.feats))
    k = feats.shape[1]
    valid = (labels > 0) & (labels < k)  # a label past the head's classes counts as unlabelled
    labels = torch.where(valid, labels, torch.zeros_like(labels))
    per_voxel = F.cross_entropy(feats, labels, reduction="none")
    weight = valid.to(feats.dtype)
    if balance:
        counts = torch.bincount(labels, weights=weight, minlength=k)
        weight = weight * counts.clamp(min=1).rsqrt()[labels]
    return (per_voxel * weight).sum() / weight.sum().clamp(min=torch.finfo(feats.dtype).tiny)


def batch_row_ranges(x: SparseVoxels) -> list[tuple[int, int]]:
    """Row range ``[start, end)`` of every batch item of ``x``.

    Rows of a SparseVoxels are sorted by batch index, so each item is one contiguous block: slicing it avoids
    boolean row masks, whose backward is an accumulating scatter of a full-size copy.
    """
    counts = x.coordinate_set.batch_counts()  # cached on the coordinate set: no read for one item, else one per set
    ranges, start = [], 0
    for n in counts:
        ranges.append((start, start + n))
        start += n
    return ranges


def _zero(*tensors: Tensor) -> Tensor:
    """A 0 that keeps the graph (so backward works when a level is empty)."""
    total = None
    for t in tensors:
        z = t.sum() * 0.0
        total = z if total is None else total + z
    return total


def geometry_loss(
    pred: SparseVoxels,
    target_tdf: Tensor,
    weighting: Tensor | None = None,
    truncation: float = 3.0,
    clip_target: bool = True,
) -> Tensor:
    """Weighted L1 of the predicted TDF (``pred.feats[:, 0]``) at its coordinates; mean over voxels."""
    if pred.num_voxels == 0:
        return _zero(pred.feats)
    p = pred.feats[:, 0]
    gt = sparse_lookup(pred, target_tdf.to(p.dtype), fill=truncation).abs()
    if clip_target:
        gt = gt.clamp(0.0, truncation)
    loss = (p - gt).abs()
    if weighting is not None:
        loss = loss * sparse_lookup(pred, weighting.to(p.dtype), fill=1.0)
    return loss.mean()


def _accumulation_dtype(x: Tensor) -> torch.dtype:
    """At least fp32 for the sums and voxel counts of a masked mean: a bf16 result would round both (by up to
    0.4 % each at these voxel counts); fp64 inputs stay fp64."""
    return torch.promote_types(x.dtype, torch.float32)


def occupancy_loss_dense(
    logits: Tensor, target: Tensor, weighting: Tensor | None = None, valid: Tensor | None = None
) -> Tensor:
    """Dense BCE x weighting over ``valid`` voxels (default: finite logits); mean over those voxels.

    ``logits`` [B, X, Y, Z] or [B, 1, X, Y, Z]; ``target``/``weighting``/``valid`` [B, X, Y, Z].
    """
    if logits.dim() == 5:
        logits = logits[:, 0]
    if valid is None:
        valid = torch.isfinite(logits)
    # a masked mean rather than boolean selection: no wait for the device to count the valid voxels
    lg = logits.masked_fill(~valid, 0)
    vm = valid.to(lg.dtype)
    loss = F.binary_cross_entropy_with_logits(lg, target.to(lg.dtype), reduction="none") * vm
    if weighting is not None:
        loss = loss * weighting.to(lg.dtype)
    acc = _accumulation_dtype(lg)
    return loss.sum(dtype=acc) / vm.sum(dtype=acc).clamp_min(1.0)


def occupancy_loss_sparse(logits: SparseVoxels, target: Tensor, weighting: Tensor | None = None) -> Tensor:
    """BCE x weighting at the voxels of ``logits`` (feats [N, 1]); ``target`` is the dense GT at that level."""
    if logits.num_voxels == 0:
        return _zero(logits.feats)
    lg = logits.feats[:, 0]
    t = sparse_lookup(logits, target.to(lg.dtype), fill=0.0)
    loss = F.binary_cross_entropy_with_logits(lg, t, reduction="none")
    if weighting is not None:
        loss = loss * sparse_lookup(logits, weighting.to(lg.dtype), fill=1.0)
    return loss.mean()


def _count_masks(indices: Indices) -> int:
    return sum(int(len(q)) for q, _ in indices)


def _dense_pairs(logits: Tensor, targets: Sequence[Tensor], indices: Indices, valid: Tensor):
    """Per sample with matches: ``(b, logits [M, V], targets [M, V], valid [V] as 0/1 floats)`` over all
    ``V = X*Y*Z`` voxels, invalid logits set to 0 (the callers weight by ``valid``; fixed shapes, no sync)."""
    for b, (qi, ti) in enumerate(indices):
        if len(qi) == 0:
            continue
        vb = valid[b].reshape(-1)
        lg = logits[b][qi.to(logits.device)].flatten(1).masked_fill(~vb, 0)  # [M, V]
        tg = targets[b][ti.to(logits.device)].flatten(1).to(lg.dtype)
        yield b, lg, tg, vb.to(lg.dtype)


def _sparse_pairs(logits: SparseVoxels, targets: Sequence[Tensor], indices: Indices):
    """Per sample with matches and voxels: ``(b, logits [M, N_b], targets [M, N_b], inside [N_b], grid
    index [N_b, 3] clamped into the grid)``; voxels outside the target grid get target 0."""
    c = logits.coords
    ranges = batch_row_ranges(logits)
    for b, (qi, ti) in enumerate(indices):
        start, end = ranges[b] if b < len(ranges) else (0, 0)
        if len(qi) == 0 or end <= start:
            continue
        lg = logits.feats[start:end, qi.to(c.device)].T  # [M, N_b]
        tb = targets[b][ti.to(c.device)].to(lg.dtype)  # [M, X, Y, Z]
        xi, inside = _grid_index(c[start:end], logits.stride, tb.shape[1:])
        tg = torch.where(inside[None], tb[:, xi[:, 0], xi[:, 1], xi[:, 2]], 0.0)
        yield b, lg, tg, inside, xi


def dice_loss(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-row soft dice loss ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)`` with ``p = sigmoid(logits)``
    ([M, V] -> [M]), over the voxels where ``mask [V]`` is 1 (default: all). Unlike the voxel-mean BCE it does
    not shrink with the object's share of the voxels, so a small object's mask is learnt as fast as a wall's."""
    p = logits.sigmoid()
    if mask is not None:
        p, targets = p * mask, targets * mask
    num = 2.0 * (p * targets).sum(1) + 1.0
    den = p.sum(1) + targets.sum(1) + 1.0
    return 1.0 - num / den


def _normaliser(indices: Indices, num_masks: float | None) -> float:
    n = _count_masks(indices) if num_masks is None else num_masks
    return max(float(n), 1.0)


def panoptic_mask_loss_dense(
    logits: Tensor,
    targets: Sequence[Tensor],
    indices: Indices,
    weighting: Tensor | None = None,
    valid: Tensor | None = None,
    num_masks: float | None = None,
) -> Tensor:
    """Matched-query mask BCE on a dense level.

    Args:
        logits: [B, Q, X, Y, Z] mask logits (may be -inf outside the frustum; such voxels are excluded when
            ``valid`` is None).
        targets: per sample [T_b, X, Y, Z] GT masks.
        indices: per sample (query indices, target indices) from the matcher.
        weighting: [B, X, Y, Z] voxel weights.
        valid: [B, X, Y, Z] voxels that count (default: all voxels with finite logits in query 0).
        num_masks: normaliser (default: number of matched pairs), clamped to >= 1.
    """
    total = _zero(logits.masked_fill(~torch.isfinite(logits), 0))
    if valid is None:
        valid = torch.isfinite(logits[:, 0])
    for b, lg, tg, vm in _dense_pairs(logits, targets, indices, valid):
        loss = F.binary_cross_entropy_with_logits(lg, tg, reduction="none") * vm
        if weighting is not None:
            loss = loss * weighting[b].reshape(-1).to(lg.dtype)
        acc = _accumulation_dtype(lg)
        total = total + (loss.sum(1, dtype=acc) / vm.sum(dtype=acc).clamp_min(1.0)).sum()
    return total / _normaliser(indices, num_masks)


def panoptic_dice_loss_dense(
    logits: Tensor, targets: Sequence[Tensor], indices: Indices, valid: Tensor | None = None,
    num_masks: float | None = None,
) -> Tensor:
    """Matched-query soft dice (:func:`dice_loss`) on a dense level, summed over pairs / ``num_masks``
    (arguments as :func:`panoptic_mask_loss_dense`)."""
    total = _zero(logits.masked_fill(~torch.isfinite(logits), 0))
    if valid is None:
        valid = torch.isfinite(logits[:, 0])
    for _, lg, tg, vm in _dense_pairs(logits, targets, indices, valid):
        total = total + dice_loss(lg, tg, vm).sum()
    return total / _normaliser(indices, num_masks)


def panoptic_mask_loss_sparse(
    logits: SparseVoxels,
    targets: Sequence[Tensor],
    indices: Indices,
    weighting: Tensor | None = None,
    num_masks: float | None = None,
) -> Tensor:
    """Matched-query mask BCE at the sparse voxels of ``logits`` (feats [N, Q]); ``targets[b]`` is the dense
    [T_b, X/s, Y/s, Z/s] GT at that level; GT outside the grid counts as 0 with weight 1."""
    total = _zero(logits.feats)
    for b, lg, tg, inside, xi in _sparse_pairs(logits, targets, indices):
        loss = F.binary_cross_entropy_with_logits(lg, tg, reduction="none")
        if weighting is not None:
            w = torch.where(inside, weighting[b][xi[:, 0], xi[:, 1], xi[:, 2]].to(lg.dtype), 1.0)
            loss = loss * w[None]
        total = total + loss.mean(1).sum()
    return total / _normaliser(indices, num_masks)


def panoptic_dice_loss_sparse(
    logits: SparseVoxels, targets: Sequence[Tensor], indices: Indices, num_masks: float | None = None,
) -> Tensor:
    """Matched-query soft dice (:func:`dice_loss`) at the sparse voxels of ``logits``, summed over pairs /
    ``num_masks`` (arguments as :func:`panoptic_mask_loss_sparse`)."""
    total = _zero(logits.feats)
    for _, lg, tg, _, _ in _sparse_pairs(logits, targets, indices):
        total = total + dice_loss(lg, tg).sum()
    return total / _normaliser(indices, num_masks)


def fusion_log_scores(class_logits: Tensor) -> Tensor:
    """``[B, Q, K+1]`` class logits -> ``[B, Q]`` log of each query's panoptic-fusion score: its best real
    class's soft-max probability (class 0 = free space and the last column = no-object excluded), detached."""
    prob = class_logits.detach().to(_accumulation_dtype(class_logits)).softmax(-1)[..., 1:-1]
    return prob.amax(-1).clamp_min(1e-6).log()


def ownership_ce(logits: Tensor, log_scores: Tensor, queries: Tensor, targets: Tensor,
                 valid: Tensor | None = None) -> Tensor:
    """Segment-balanced voxel ownership cross-entropy of one sample (module docstring), summed over segments.

    Args:
        logits: ``[V, Q]`` mask logits of every query at V voxels.
        log_scores: ``[Q]`` :func:`fusion_log_scores` of the sample.
        queries: ``[M]`` matched query of each GT segment.
        targets: ``[M, V]`` 0/1 GT masks of the matched segments (disjoint).
        valid: ``[V]`` 0/1 voxels that count (default: all).
    """
    acc = _accumulation_dtype(logits)
    z = F.logsigmoid(logits.to(acc)) + log_scores.to(acc)[None]  # [V, Q]
    tg = targets.to(acc) if valid is None else targets.to(acc) * valid.to(acc)[None]
    segment = tg.argmax(0)  # [V] position in the matched list (0 where no segment: weighted out below)
    own = z.gather(1, queries.to(z.device)[segment].unsqueeze(1)).squeeze(1)
    ce = torch.logsumexp(z, 1) - own
    weight = tg.amax(0) / tg.sum(1).clamp_min(1.0)[segment]
    return (ce * weight).sum()


def panoptic_ownership_loss_dense(
    logits: Tensor, targets: Sequence[Tensor], indices: Indices, log_scores: Tensor,
    valid: Tensor | None = None, num_masks: float | None = None,
) -> Tensor:
    """:func:`ownership_ce` on a dense level (``logits`` [B, Q, X, Y, Z], -inf outside the frustum; other
    arguments as :func:`panoptic_mask_loss_dense`), summed over samples / ``num_masks``."""
    finite = logits.masked_fill(~torch.isfinite(logits), 0)
    total = _zero(finite)
    if valid is None:
        valid = torch.isfinite(logits[:, 0])
    for b, (qi, ti) in enumerate(indices):
        if len(qi) == 0:
            continue
        vb = valid[b].reshape(-1)
        tg = targets[b][ti.to(logits.device)].flatten(1)
        total = total + ownership_ce(finite[b].flatten(1).T, log_scores[b], qi, tg, vb)
    return total / _normaliser(indices, num_masks)


def panoptic_ownership_loss_sparse(
    logits: SparseVoxels, targets: Sequence[Tensor], indices: Indices, log_scores: Tensor,
    num_masks: float | None = None,
) -> Tensor:
    """:func:`ownership_ce` at the sparse voxels of ``logits`` (feats [N, Q]; arguments as
    :func:`panoptic_mask_loss_sparse`), summed over samples / ``num_masks``."""
    total = _zero(logits.feats)
    ranges = batch_row_ranges(logits)
    for b, _, tg, _, _ in _sparse_pairs(logits, targets, indices):
        start, end = ranges[b]
        total = total + ownership_ce(logits.feats[start:end], log_scores[b], indices[b][0], tg)
    return total / _normaliser(indices, num_masks)


class FrustumLoss(nn.Module):
    """All stage-2 reconstruction losses from the :class:`frustum3d.decoder.FrustumDecoder` output dict.

    ``outputs`` keys used: ``occupancy_64`` [B,X,Y,Z] (-inf outside frustum), ``occupancy_128``,
    ``occupancy_256`` (SparseVoxels [N,1], pre-pruning), ``geometry`` (SparseVoxels [N,1]), ``panoptic_64``
    [B,Q,X,Y,Z], ``panoptic_128``, ``panoptic_256`` (SparseVoxels [N,Q]); a missing key skips its term.
    ``targets`` keys: ``geometry`` [B,X,Y,Z] TDF (voxel units), ``occupancy_{64,128,256}`` [B,...] at each
    level, ``weighting_{64,128,256}`` (optional), ``masks_{64,128,256}`` (per sample [T_b,...]).
    ``indices``: per sample (query idx, target idx), e.g. from the 2D Hungarian matcher.
    ``class_logits``: ``[B, Q, K+1]`` query class logits, needed by the ownership term only.
    """

    def __init__(
        self,
        surface_weight: float = 5.0,
        completion_weights: Sequence[float] = (50.0, 25.0, 10.0),
        panoptic_weight: float = 25.0,
        truncation: float = 3.0,
        clip_target: bool = True,
        panoptic_dice_weight: float = 0.0,
        panoptic_ce_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if len(completion_weights) != 3:
            raise ValueError(f"completion_weights needs 3 values (64, 128, 256), got {completion_weights}")
        self.surface_weight = float(surface_weight)
        self.completion_weights = tuple(float(w) for w in completion_weights)
        self.panoptic_weight = float(panoptic_weight)
        self.panoptic_dice_weight = float(panoptic_dice_weight)
        self.panoptic_ce_weight = float(panoptic_ce_weight)
        self.truncation = float(truncation)
        self.clip_target = clip_target

    def forward(
        self,
        outputs: Mapping[str, object],
        targets: Mapping[str, object],
        indices: Indices | None = None,
        num_masks: float | None = None,
        class_logits: Tensor | None = None,
    ) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        levels = ("64", "128", "256")
        if "geometry" in outputs and "geometry" in targets:
            losses["loss_geometry"] = self.surface_weight * geometry_loss(
                outputs["geometry"], targets["geometry"], targets.get("weighting_256"), self.truncation,
                self.clip_target)
        for lvl, w in zip(levels, self.completion_weights, strict=True):
            key = f"occupancy_{lvl}"
            if key not in outputs or key not in targets:
                continue
            pred, tgt, wt = outputs[key], targets[key], targets.get(f"weighting_{lvl}")
            if isinstance(pred, SparseVoxels):
                losses[f"loss_{key}"] = w * occupancy_loss_sparse(pred, tgt, wt)
            else:
                losses[f"loss_{key}"] = w * occupancy_loss_dense(pred, tgt, wt)
        if indices is not None:
            n = _count_masks(indices) if num_masks is None else num_masks
            if self.panoptic_ce_weight > 0 and class_logits is None:
                raise ValueError("panoptic_ce_weight > 0 needs the queries' class_logits [B, Q, K+1]")
            log_scores = fusion_log_scores(class_logits) if self.panoptic_ce_weight > 0 else None
            for lvl in levels:
                key = f"panoptic_{lvl}"
                if key not in outputs or f"masks_{lvl}" not in targets:
                    continue
                pred, tgt, wt = outputs[key], targets[f"masks_{lvl}"], targets.get(f"weighting_{lvl}")
                dice = ce = None
                if isinstance(pred, SparseVoxels):
                    term = panoptic_mask_loss_sparse(pred, tgt, indices, wt, n)
                    if self.panoptic_dice_weight > 0:
                        dice = panoptic_dice_loss_sparse(pred, tgt, indices, n)
                    if log_scores is not None:
                        ce = panoptic_ownership_loss_sparse(pred, tgt, indices, log_scores, n)
                else:
                    valid = None
                    occ = outputs.get("occupancy_64")
                    if isinstance(occ, Tensor):
                        valid = torch.isfinite(occ[:, 0] if occ.dim() == 5 else occ)
                    term = panoptic_mask_loss_dense(pred, tgt, indices, wt, valid, n)
                    if self.panoptic_dice_weight > 0:
                        dice = panoptic_dice_loss_dense(pred, tgt, indices, valid, n)
                    if log_scores is not None:
                        ce = panoptic_ownership_loss_dense(pred, tgt, indices, log_scores, valid, n)
                losses[f"loss_{key}"] = self.panoptic_weight * term
                if dice is not None:
                    losses[f"loss_{key}_dice"] = self.panoptic_dice_weight * dice
                if ce is not None:
                    losses[f"loss_{key}_ce"] = self.panoptic_ce_weight * ce
        return losses
