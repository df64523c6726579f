"""Panoptic Reconstruction Quality (PRQ / RSQ / RRQ) exactly as the single-image 3D benchmark scores it.

Reference semantics (Dahnert et al. 2021, reused unchanged by BUOL, Uni-3D and NVIDIA TAO):

* **Segments.** Ground truth is built from raw instance / semantic volumes (:func:`ground_truth_segments`):
  each non-zero instance id is a thing whose label is the majority vote of its voxels' semantic labels
  (ignoring 0 and the stuff classes, ties -> smallest label); an instance with no such vote is not a
  segment; afterwards every voxel labelled with a stuff class is moved to that class's single stuff
  segment. Predictions are a panoptic id volume plus an ordered id -> class mapping.
* **Evaluated mask.** For a segment, the shell ``(volume == id) & (|tdf| < iso_value)`` (the distance is
  read in float32), at ``downsample_factor`` f > 1 max-pooled (kernel f+1, stride f, padding 1), then
  *thickened*: every shell voxel p also marks p + o for o in {0,1,2}^3 (a +0..+2 shift, not a centred
  dilation; targets outside the grid are dropped), then AND the frustum mask (nearest-resized for f > 1).
* **Matching.** Ground-truth segments in mapping order (things by ascending raw id, then stuff) each
  scan the predictions in mapping order, skipping matched ones and other classes, and take the *first*
  with IoU strictly greater than ``matching_threshold``. Unmatched GT -> fn, unmatched prediction -> fp,
  every GT segment -> n (even with an empty mask).
* **Reduction.** Per class PRQ = sum IoU / (tp + fp/2 + fn/2), RSQ = sum IoU / tp (0 if tp = 0),
  RRQ = tp / (tp + fp/2 + fn/2); the mean runs over classes with tp+fp+fn > 0 *and* n > 0.

The implementation never builds one dense mask per segment: all segments of a sample are packed as bits
of int64 "word" volumes (63 segments per word), the shell is max-pooled and thickened with separable
bitwise ORs, and the IoU of every GT/prediction pair follows from one ``unique`` over the occupied voxels'
bit patterns and a small matrix product.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from frustum3d.panoptic import FRONT3D_CLASSES, PanopticFusionError, mapping_from_pairs
from frustum3d.sparse.transfer import host_to_device

__all__ = [
    "FRONT3D_CLASSES",
    "FRONT3D_EVAL_STUFF_CLASSES",
    "MATTERPORT_EVAL_STUFF_CLASSES",
    "STATS_COLUMNS",
    "PRQInputError",
    "PanopticReconstructionQuality",
    "SampleEvaluation",
    "SegmentOverlaps",
    "Segments",
    "VoxelSegments",
    "class_statistics",
    "downsample_frustum",
    "downsample_shell",
    "frame_statistics",
    "ground_truth_segments",
    "ground_truth_voxel_segments",
    "mask_iou",
    "match_segments",
    "prediction_segments",
    "segment_masks",
    "segment_overlaps",
    "thicken",
    "voxel_segment_masks",
]

STATS_COLUMNS: tuple[str, ...] = ("iou", "tp", "fp", "fn", "n")
"""Column order of the per-class statistics tensor."""

FRONT3D_EVAL_STUFF_CLASSES: tuple[int, ...] = (10, 11)
"""Stuff classes merged into GT segments for 3D-FRONT (wall, floor)."""

MATTERPORT_EVAL_STUFF_CLASSES: tuple[int, ...] = (10, 11, 12)
"""Stuff classes merged into GT segments for Matterport3D (wall, floor, ceiling)."""

_BITS_PER_WORD = 63  # int64 words, sign bit unused


class PRQInputError(ValueError):
    """Raised for inconsistent PRQ inputs (shapes, unknown classes, bad mapping, bad configuration)."""


# ----------------------------------------------------------------------------------------------------
# Segments
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segments:
    """Segments of one volume in matching order.

    Attributes:
        panoptic: int32 ``[X, Y, Z]`` segment id per voxel (0 = none).
        ids: int64 ``[S]`` segment ids in mapping (= matching) order.
        labels: int64 ``[S]`` class id of each segment.
        instance_ids: int64 ``[S]`` raw GT instance id of each segment (0 for stuff); set by
            :func:`ground_truth_segments`, None for predictions.
    """

    panoptic: Tensor
    ids: Tensor
    labels: Tensor
    instance_ids: Tensor | None = None

    def __len__(self) -> int:
        return int(self.ids.numel())


def _as_volume(value: object, name: str) -> Tensor:
    """Tensor view of a 3D volume; leading singleton axes (batch / channel) are dropped."""
    tensor = torch.as_tensor(value)
    while tensor.dim() > 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 3:
        raise PRQInputError(f"{name} must be a [X, Y, Z] volume, got shape {tuple(torch.as_tensor(value).shape)}")
    return tensor


def _unique_inverse(values: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted unique values of a flat non-negative int64 tensor and the inverse index of every element.

    Uses a presence table (linear time) when the ids are small, ``torch.unique`` otherwise.
    """
    if values.numel() == 0:
        return values.new_zeros(0), values.new_zeros(0)
    top = int(values.max())
    if top <= 4 * values.numel() + 4096:
        present = torch.bincount(values, minlength=top + 1) > 0
        uniq = torch.nonzero(present).flatten()
        rank = torch.cumsum(present.long(), 0) - 1
        return uniq, rank[values]
    uniq, inverse = torch.unique(values, sorted=True, return_inverse=True)
    return uniq, inverse


def _index_of(values: Tensor, keys: Tensor) -> Tensor:
    """Position of every element of ``values`` in the unique ``keys`` (-1 where absent), int64."""
    out = torch.full(values.shape, -1, dtype=torch.long, device=values.device)
    if keys.numel() == 0:
        return out
    keys = keys.to(values.device)
    sorted_keys, order = torch.sort(keys)
    pos = torch.searchsorted(sorted_keys, values).clamp_(max=keys.numel() - 1)
    hit = sorted_keys[pos] == values
    out[hit] = order[pos[hit]]
    return out


def _not_in(values: Tensor, classes: Sequence[int]) -> Tensor:
    """``values`` not in the short list ``classes`` (chained comparisons beat ``torch.isin`` here)."""
    keep = torch.ones(values.shape, dtype=torch.bool, device=values.device)
    for c in classes:
        keep &= values != c
    return keep


def ground_truth_segments(instance: Tensor, semantic: Tensor, stuff_classes: Iterable[int]) -> Segments:
    """Turn raw GT instance / semantic volumes into benchmark segments.

    Thing instance with raw id r gets panoptic id ``rank(r) + len(stuff_classes)``, where rank counts the
    sorted unique raw ids with 0 at rank 0 (so the first thing of 3D-FRONT is 3). Its label is the majority
    of its voxels' labels outside {0} and the stuff classes (ties -> smallest); without any such voxel it
    is no segment. Then voxels labelled ``stuff_classes[i]`` get id ``i + 1`` (overriding things) and one
    segment per present stuff class is appended. Segment order: things by ascending raw id, then stuff.

    If no voxel has instance 0 the reference would let the first thing collide with the last stuff id;
    here the rank of the first non-zero id is always 1 (identical whenever free space exists).
    """
    inst = _as_volume(instance, "gt_instance")
    sem = _as_volume(semantic, "gt_semantic")
    if inst.shape != sem.shape:
        raise PRQInputError(f"gt_instance shape {tuple(inst.shape)} differs from gt_semantic {tuple(sem.shape)}")
    for name, volume in (("gt_instance", inst), ("gt_semantic", sem)):
        if volume.dtype.is_floating_point or volume.dtype == torch.bool:
            raise PRQInputError(f"{name} must hold integer ids, got dtype {volume.dtype}")
        if volume.numel() and int(volume.min()) < 0:
            raise PRQInputError(f"{name} has negative values; ids / labels must be >= 0 (0 = none / free space)")
    stuff = _check_stuff(stuff_classes)

    # Work on the labelled voxels only: instances and stuff cover a thin layer of the grid.
    inst_flat = inst.reshape(-1)
    sem_flat = sem.reshape(-1)
    labelled = torch.nonzero((inst_flat != 0) | ~_not_in(sem_flat, stuff)).flatten()
    voxel_ids, ids, labels, raw = _label_voxels(inst_flat[labelled], sem_flat[labelled], stuff)
    panoptic = torch.zeros(inst_flat.shape, dtype=torch.int32, device=inst.device)
    panoptic[labelled] = voxel_ids
    return Segments(
        panoptic=panoptic.view(inst.shape),
        ids=torch.tensor(ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        instance_ids=torch.tensor(raw, dtype=torch.long),
    )


def _check_stuff(stuff_classes: Iterable[int]) -> list[int]:
    stuff = [int(c) for c in stuff_classes]
    if len(set(stuff)) != len(stuff) or 0 in stuff:
        raise PRQInputError(f"stuff_classes must be distinct non-zero class ids, got {stuff}")
    return stuff


def _label_voxels(
    instance: Tensor, semantic: Tensor, stuff: Sequence[int]
) -> tuple[Tensor, list[int], list[int], list[int]]:
    """The GT segment rule (:func:`ground_truth_segments`) on a list of voxels.

    ``instance`` / ``semantic``: ``[L]`` ids of every voxel that has a non-zero instance or a stuff label
    (all others are 0 / non-stuff). Returns the int32 ``[L]`` panoptic id of each voxel (0 = none) and the
    segments' ids, labels and raw instance ids in matching order.
    """
    thing_voxels = torch.nonzero(instance != 0).flatten()
    raw_ids = instance[thing_voxels].long()
    thing_semantic = semantic[thing_voxels].long()
    uniq, inverse = _unique_inverse(raw_ids)
    panoptic_of_unique = torch.arange(uniq.numel(), device=instance.device) + 1 + len(stuff)

    votes = _not_in(thing_semantic, [0, *stuff])
    num_labels = int(thing_semantic.max()) + 1 if thing_semantic.numel() else 1
    counts = torch.bincount(
        inverse[votes] * num_labels + thing_semantic[votes], minlength=uniq.numel() * num_labels
    ).view(uniq.numel(), num_labels)
    thing_rows = torch.nonzero(counts.sum(dim=1) > 0).flatten()
    ids = [int(i) for i in panoptic_of_unique[thing_rows].tolist()]
    labels = [int(c) for c in counts[thing_rows].argmax(dim=1).tolist()]
    raw = [int(r) for r in uniq[thing_rows].tolist()]

    panoptic = torch.zeros(instance.shape, dtype=torch.int32, device=instance.device)
    panoptic[thing_voxels] = panoptic_of_unique[inverse].to(torch.int32)
    if stuff:
        stuff_voxels = torch.nonzero(~_not_in(semantic, stuff)).flatten()
        stuff_semantic = semantic[stuff_voxels]
        for index, stuff_class in enumerate(stuff):
            voxels = stuff_voxels[stuff_semantic == stuff_class]
            if voxels.numel() > 0:
                panoptic[voxels] = index + 1
                ids.append(index + 1)
                labels.append(stuff_class)
                raw.append(0)
    return panoptic, ids, labels, raw


@dataclass(frozen=True)
class VoxelSegments:
    """Segments given by their member voxels (the sparse form of :class:`Segments`).

    Attributes:
        shape: the grid ``(X, Y, Z)``.
        voxels: int64 ``[N]`` row-major flat index of every member voxel.
        segment: int64 ``[N]`` index (into ``labels``) of the segment each voxel belongs to.
        labels: int64 ``[S]`` class of each segment, in matching order.
        instance_ids: int64 ``[S]`` raw GT instance id of each segment (0 for stuff).
    """

    shape: tuple[int, int, int]
    voxels: Tensor
    segment: Tensor
    labels: Tensor
    instance_ids: Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())


def ground_truth_voxel_segments(
    voxels: Tensor, instance: Tensor, semantic: Tensor, shape: Sequence[int], stuff_classes: Iterable[int]
) -> VoxelSegments:
    """:func:`ground_truth_segments` for volumes given only at their labelled voxels.

    ``voxels`` int64 ``[L]``: distinct flat indices that include every voxel with a non-zero instance id or
    a stuff label (the volumes are 0 elsewhere); ``instance`` / ``semantic`` ``[L]``: their ids. Same
    segments, order, labels and masks as the dense function, at a cost that follows the labelled voxels.
    """
    grid = tuple(int(n) for n in shape)
    voxels, instance, semantic = (torch.as_tensor(v).reshape(-1) for v in (voxels, instance, semantic))
    if len(grid) != 3 or not voxels.numel() == instance.numel() == semantic.numel():
        raise PRQInputError(f"need a 3D shape and one instance and semantic id per voxel; got shape {grid}, "
                            f"{voxels.numel()} voxels, {instance.numel()} instance, {semantic.numel()} semantic ids")
    for name, values in (("gt_instance", instance), ("gt_semantic", semantic)):
        if values.dtype.is_floating_point or values.dtype == torch.bool:
            raise PRQInputError(f"{name} must hold integer ids, got dtype {values.dtype}")
        if values.numel() and int(values.min()) < 0:
            raise PRQInputError(f"{name} has negative values; ids / labels must be >= 0 (0 = none / free space)")
    stuff = _check_stuff(stuff_classes)
    voxel_ids, ids, labels, raw = _label_voxels(instance, semantic, stuff)
    index = _index_of(voxel_ids.long(), torch.tensor(ids, dtype=torch.long))
    member = index >= 0
    return VoxelSegments(grid, voxels.long()[member], index[member],  # type: ignore[arg-type]
                         torch.tensor(labels, dtype=torch.long), torch.tensor(raw, dtype=torch.long))


def prediction_segments(
    panoptic: Tensor, mapping: Mapping[int, int] | Sequence[Sequence[int]] | Tensor
) -> Segments:
    """Predicted segments from a panoptic id volume and its id -> class mapping (dict or ``[M, 2]`` rows).

    The mapping order is the matching order. Ids without voxels are kept (empty masks, false positives).
    """
    volume = _as_volume(panoptic, "pred_panoptic")
    if volume.dtype.is_floating_point or volume.dtype == torch.bool:
        raise PRQInputError(f"pred_panoptic must hold integer segment ids, got dtype {volume.dtype}")
    try:
        ordered = mapping_from_pairs(mapping)
    except PanopticFusionError as error:
        raise PRQInputError(f"pred_mapping: {error}") from error
    if 0 in ordered:
        raise PRQInputError("pred_mapping uses segment id 0, which means void; number segments from 1")
    return Segments(
        panoptic=volume.to(torch.int32),
        ids=torch.tensor(list(ordered.keys()), dtype=torch.long),
        labels=torch.tensor(list(ordered.values()), dtype=torch.long),
    )


# ----------------------------------------------------------------------------------------------------
# Evaluated masks as bit-packed volumes
# ----------------------------------------------------------------------------------------------------


def _check_factor(shape: torch.Size, downsample_factor: int) -> None:
    if not isinstance(downsample_factor, int) or downsample_factor < 1:
        raise PRQInputError(f"downsample_factor must be a positive int, got {downsample_factor!r}")
    if any(n % downsample_factor for n in shape):
        raise PRQInputError(f"grid {tuple(shape)} is not divisible by downsample_factor={downsample_factor}")


def _check_geometry(shape: torch.Size, iso_value: float, truncation: float, downsample_factor: int) -> None:
    _check_factor(shape, downsample_factor)
    if abs(truncation) < iso_value:
        raise PRQInputError(
            f"truncation ({truncation}) must be >= iso_value ({iso_value}); otherwise every voxel outside a "
            "segment would count as its surface"
        )


def _shell_words(
    parts: Sequence[tuple[Segments, Tensor]], iso_value: float, shape: torch.Size, device: torch.device
) -> tuple[Tensor, int]:
    """Pack the iso-surface shells of all segments of ``parts`` into ``[W, X, Y, Z]`` int64 bit words.

    Segment j of the concatenated list (parts in order) is bit ``j % 63`` of word ``j // 63``.
    """
    total = sum(len(segments) for segments, _ in parts)
    num_words = max(1, math.ceil(total / _BITS_PER_WORD))
    words = torch.zeros(num_words, shape.numel(), dtype=torch.long, device=device)
    base = 0
    for segments, tdf in parts:
        distance = tdf.to(device).reshape(-1)
        if distance.dtype != torch.float32:
            distance = distance.float()  # the reference reads the distance in float32
        candidates = torch.nonzero(distance.abs() < iso_value).flatten()
        index = _index_of(segments.panoptic.to(device).reshape(-1)[candidates].long(), segments.ids)
        voxels = candidates[index >= 0]
        bit = index[index >= 0] + base
        values = torch.bitwise_left_shift(torch.ones_like(bit), bit % _BITS_PER_WORD)
        # Each voxel holds at most one segment per part and parts use distinct bits: sum == OR.
        words.index_put_((bit // _BITS_PER_WORD, voxels), values, accumulate=True)
        base += len(segments)
    return words.view(num_words, *shape), total


def _strided(x: Tensor, dim: int, start: int, count: int, step: int) -> Tensor:
    index = [slice(None)] * x.dim()
    index[dim] = slice(start, start + (count - 1) * step + 1, step)
    return x[tuple(index)]


def _or_pool(words: Tensor, factor: int) -> Tensor:
    """Bitwise-OR max-pool (kernel factor+1, stride factor, padding 1) over the three spatial axes."""
    for dim in (1, 2, 3):
        n = words.shape[dim]
        m = n // factor
        pad_shape = list(words.shape)
        pad_shape[dim] = 1
        padded = torch.cat([words.new_zeros(pad_shape), words], dim=dim)  # padded[i] = words[i - 1]
        pooled = _strided(padded, dim, 0, m, factor).clone()
        for j in range(1, factor + 1):
            pooled.bitwise_or_(_strided(padded, dim, j, m, factor))
        words = pooled
    return words


def _thicken(words: Tensor) -> Tensor:
    """Every set voxel p also sets p + o, o in {0,1,2}^3 (separable, out-of-grid targets dropped).

    Overwrites ``words`` (used as a ping-pong buffer) and returns the result.
    """
    src, dst = words, torch.empty_like(words)
    for dim in (1, 2, 3):
        n = src.shape[dim]
        dst.narrow(dim, 0, 1).copy_(src.narrow(dim, 0, 1))
        if n > 1:
            torch.bitwise_or(src.narrow(dim, 1, n - 1), src.narrow(dim, 0, n - 1), out=dst.narrow(dim, 1, n - 1))
        if n > 2:
            dst.narrow(dim, 2, n - 2).bitwise_or_(src.narrow(dim, 0, n - 2))
        src, dst = dst, src
    return src


def _downsampled_frustum(frustum: Tensor, factor: int) -> Tensor:
    """Nearest resize to 1/factor: output voxel i reads input voxel i * factor (as F.interpolate does)."""
    if factor == 1:
        return frustum
    return frustum[::factor, ::factor, ::factor]


def _resolve_frustum(frustum_mask: Tensor | None, shape: torch.Size, device: torch.device) -> Tensor:
    if frustum_mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    frustum = _as_volume(frustum_mask, "frustum_mask")
    if frustum.shape != shape:
        raise PRQInputError(f"frustum_mask shape {tuple(frustum.shape)} differs from the volumes {tuple(shape)}")
    return frustum.to(device=device, dtype=torch.bool)


def _evaluated_words(
    parts: Sequence[tuple[Segments, Tensor]],
    frustum_mask: Tensor | None,
    iso_value: float,
    truncation: float,
    downsample_factor: int,
    crop: bool,
) -> tuple[Tensor, Tensor, int]:
    """Bit words of the evaluated (shell, pooled, thickened) masks and the frustum they are ANDed with."""
    shape = parts[0][0].panoptic.shape
    for segments, tdf in parts:
        if segments.panoptic.shape != shape or tdf.shape != shape:
            raise PRQInputError(
                f"all volumes must share one shape; got panoptic {tuple(segments.panoptic.shape)}, "
                f"tdf {tuple(tdf.shape)} vs {tuple(shape)}"
            )
    _check_geometry(shape, iso_value, truncation, downsample_factor)
    device = parts[0][0].panoptic.device
    frustum = _downsampled_frustum(_resolve_frustum(frustum_mask, shape, device), downsample_factor)
    words, total = _shell_words(parts, iso_value, shape, device)
    if not crop:
        if downsample_factor > 1:
            words = _or_pool(words, downsample_factor)
        return _thicken(words), frustum, total

    # Work inside the bounding box of the occupied voxels (pooled space), plus the +2 reach of thickening.
    factor = downsample_factor
    occupied = (words != 0).any(dim=0)
    if not bool(occupied.any()):
        return words[:, :0, :0, :0], frustum[:0, :0, :0], total
    source, box, local = [], [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = torch.nonzero(occupied.any(dim=other)).flatten()
        lo, hi = int(hits[0]), int(hits[-1])
        size = shape[axis] // factor
        # pooled voxel i reads full-resolution voxels i*f-1 .. i*f+f-1
        first = max(0, -((factor - 1 - lo) // factor))
        last = hi if factor == 1 else min(size - 1, (hi + 1) // factor)
        source.append(slice(first * factor, (last + 1) * factor))
        box.append(slice(first, min(size, last + 3)))
        local.append(slice(0, last + 1 - first))
    words = words[(slice(None), *source)].contiguous()
    if factor > 1:
        words = _or_pool(words, factor)
    padded = words.new_zeros((words.shape[0], *(s.stop - s.start for s in box)))
    padded[(slice(None), *local)] = words
    return _thicken(padded), frustum[tuple(box)], total


def _unique_rows(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct rows of an int64 ``[N, W]`` matrix and how often each occurs."""
    if rows.shape[1] == 1:
        codes, counts = torch.unique(rows[:, 0], sorted=False, return_counts=True)
        return codes.unsqueeze(1), counts
    inverse = None
    for col in range(rows.shape[1]):
        uniq, col_inverse = torch.unique(rows[:, col], return_inverse=True)
        if inverse is None:
            inverse = col_inverse
        else:
            _, inverse = torch.unique(inverse * uniq.numel() + col_inverse, return_inverse=True)
    num = int(inverse.max()) + 1
    counts = torch.bincount(inverse, minlength=num)
    representative = torch.empty(num, dtype=torch.long, device=rows.device)
    representative.scatter_(0, inverse, torch.arange(rows.shape[0], device=rows.device))
    return rows[representative], counts


def _unpack_bits(codes: Tensor, total: int) -> Tensor:
    """``[U, W]`` int64 words -> ``[U, total]`` float64 0/1 matrix of segment membership."""
    shifts = torch.arange(_BITS_PER_WORD, device=codes.device)
    bits = torch.bitwise_and(torch.bitwise_right_shift(codes.unsqueeze(-1), shifts), 1)
    return bits.reshape(codes.shape[0], -1)[:, :total].double()


@dataclass(frozen=True)
class SegmentOverlaps:
    """Voxel counts of the evaluated masks of one sample.

    Attributes:
        gt_sizes: int64 ``[G]`` |mask| of each GT segment.
        pred_sizes: int64 ``[P]`` |mask| of each predicted segment.
        intersection: int64 ``[G, P]`` |GT mask AND prediction mask| for every pair.
    """

    gt_sizes: Tensor
    pred_sizes: Tensor
    intersection: Tensor

    def iou(self) -> Tensor:
        """float64 ``[G, P]`` IoU of every pair (0 when the union is empty)."""
        inter = self.intersection.double()
        union = self.gt_sizes.double().unsqueeze(1) + self.pred_sizes.double().unsqueeze(0) - inter
        return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def segment_overlaps(
    gt: Segments,
    gt_tdf: Tensor,
    pred: Segments,
    pred_tdf: Tensor,
    frustum_mask: Tensor | None = None,
    *,
    iso_value: float = 1.0,
    truncation: float = 3.0,
    downsample_factor: int = 1,
) -> SegmentOverlaps:
    """Sizes and pairwise intersections of the evaluated GT and predicted masks (all pairs at once)."""
    gt_tdf = _as_volume(gt_tdf, "gt_tdf")
    pred_tdf = _as_volume(pred_tdf, "pred_tdf")
    words, frustum, total = _evaluated_words(
        [(gt, gt_tdf), (pred, pred_tdf)], frustum_mask, iso_value, truncation, downsample_factor, crop=True
    )
    num_gt, num_pred = len(gt), len(pred)
    active = (words != 0).any(dim=0) & frustum
    if total == 0 or not bool(active.any()):
        zeros = torch.zeros(num_gt + num_pred, dtype=torch.long)
        return SegmentOverlaps(zeros[:num_gt], zeros[num_gt:], torch.zeros(num_gt, num_pred, dtype=torch.long))
    codes, counts = _unique_rows(words[:, active].T.contiguous())
    bits = _unpack_bits(codes, total)
    weights = counts.double()
    sizes = bits.T @ weights
    intersection = bits[:, :num_gt].T @ (bits[:, num_gt:] * weights.unsqueeze(1))
    sizes = sizes.round().long().cpu()
    return SegmentOverlaps(sizes[:num_gt], sizes[num_gt:], intersection.round().long().cpu())


def segment_masks(
    segments: Segments,
    tdf: Tensor,
    frustum_mask: Tensor | None = None,
    *,
    iso_value: float = 1.0,
    truncation: float = 3.0,
    downsample_factor: int = 1,
) -> Tensor:
    """Dense bool ``[S, X/f, Y/f, Z/f]`` evaluated mask of every segment (module docstring).

    This is the benchmark's segment definition as dense masks: the data loader's GT evaluation segments
    (``datasets3d.eval_targets``, through :func:`voxel_segment_masks`) and the prediction side of
    :func:`frame_statistics` both come from here. It works on the shell voxels only (pooling and thickening
    as coordinate offsets), so its cost follows the surface area, not the grid volume;
    :func:`segment_overlaps` reaches the same masks through bit-packed volumes (the tests hold the two
    paths equal).
    """
    tdf = _as_volume(tdf, "tdf")
    shape = segments.panoptic.shape
    if tdf.shape != shape:
        raise PRQInputError(f"all volumes must share one shape; got panoptic {tuple(shape)}, tdf {tuple(tdf.shape)}")
    _check_geometry(shape, iso_value, truncation, downsample_factor)
    device = segments.panoptic.device
    candidates = torch.nonzero(_shell(tdf.to(device).reshape(-1), iso_value)).flatten()
    index = _index_of(segments.panoptic.to(device).reshape(-1)[candidates].long(), segments.ids)
    member = index >= 0
    return _shell_masks(index[member], candidates[member], shape, frustum_mask, downsample_factor, len(segments))


def voxel_segment_masks(
    segments: VoxelSegments,
    distance: Tensor,
    frustum_mask: Tensor | None = None,
    *,
    iso_value: float = 1.0,
    downsample_factor: int = 1,
) -> Tensor:
    """:func:`segment_masks` of segments in voxel form; ``distance`` ``[N]`` is the distance field at
    ``segments.voxels`` (the shell is ``|distance| < iso_value``, read in float32)."""
    distance = torch.as_tensor(distance).reshape(-1)
    if distance.numel() != segments.voxels.numel():
        raise PRQInputError(f"distance has {distance.numel()} values for {segments.voxels.numel()} segment voxels; "
                            "pass the distance field at segments.voxels")
    shape = torch.Size(segments.shape)
    _check_factor(shape, downsample_factor)
    shell = _shell(distance.to(segments.voxels.device), iso_value)
    return _shell_masks(segments.segment[shell], segments.voxels[shell], shape, frustum_mask, downsample_factor,
                        len(segments))


def _shell(distance: Tensor, iso_value: float) -> Tensor:
    """``|distance| < iso_value`` with the distance read in float32 (as the reference reads it)."""
    if distance.dtype != torch.float32:
        distance = distance.float()
    return distance.abs() < iso_value


def _shell_masks(seg: Tensor, voxels: Tensor, shape: torch.Size, frustum_mask: Tensor | None, factor: int,
                 total: int) -> Tensor:
    """Shell voxels (flat index, segment index) -> dense ``[total, X/f, Y/f, Z/f]`` evaluated masks: pooled
    (kernel f+1, stride f, padding 1), thickened by {0,1,2}^3, ANDed with the (nearest-resized) frustum.

    The shell is scattered straight into the (pooled) output; thickening and the frustum AND then run per
    segment inside its bounding box (+2 voxels of reach), so the cost follows the segments' extent."""
    device = voxels.device
    frustum = _downsampled_frustum(_resolve_frustum(frustum_mask, shape, device), factor)
    out_shape = torch.Size(n // factor for n in shape)
    masks = torch.zeros((total, *out_shape), dtype=torch.bool, device=device)
    if total == 0 or voxels.numel() == 0:
        return masks
    coords = torch.stack([voxels // (shape[1] * shape[2]), (voxels // shape[2]) % shape[1], voxels % shape[2]], 1)
    if factor > 1:
        # pooled voxel i covers full-resolution voxels i*f-1 .. i*f+f-1: x reaches i = (x+1)//f and, when
        # (x+1) % f == 0, also i - 1 (clamped into the grid: the clamped copy is then a duplicate)
        top = (coords + 1) // factor
        low = torch.where((coords + 1) % factor == 0, top - 1, top).clamp(min=0)
        top = torch.minimum(top, host_to_device([n - 1 for n in out_shape], device))
        segs, rows = [], []
        for pick in range(8):
            rows.append(torch.stack([top[:, a] if (pick >> a) & 1 else low[:, a] for a in range(3)], 1))
            segs.append(seg)
        seg, coords = torch.cat(segs), torch.cat(rows)
    masks[seg, coords[:, 0], coords[:, 1], coords[:, 2]] = True
    index = seg[:, None].expand(-1, 3)
    lo = torch.full((total, 3), max(out_shape), dtype=torch.long, device=device)
    hi = torch.full((total, 3), -1, dtype=torch.long, device=device)
    lo = lo.scatter_reduce(0, index, coords, "amin").tolist()
    hi = hi.scatter_reduce(0, index, coords, "amax").tolist()
    for j in range(total):
        if hi[j][0] < 0:
            continue  # no shell voxel: empty mask
        box = (j, *(slice(lo[j][a], min(out_shape[a], hi[j][a] + 3)) for a in range(3)))
        thick = _thicken(masks[box].unsqueeze(0).clone())[0]
        masks[box] = thick & frustum[box[1:]]
    return masks


def thicken(mask: Tensor) -> Tensor:
    """The benchmark's dilation of a bool ``[X, Y, Z]`` mask: every true voxel p also marks p + o for
    o in {0,1,2}^3 (a 3x3x3 dilation shifted by +1 voxel; targets outside the grid are dropped)."""
    volume = _as_volume(mask, "mask").bool()
    return _thicken(volume.unsqueeze(0).clone())[0]


def downsample_shell(mask: Tensor, factor: int) -> Tensor:
    """Max-pool a bool ``[X, Y, Z]`` shell to ``[X/f, Y/f, Z/f]`` with kernel f+1, stride f, padding 1 (the
    benchmark's coarse evaluation); every dimension must be divisible by ``factor``."""
    volume = _as_volume(mask, "mask").bool()
    _check_factor(volume.shape, factor)
    return volume if factor == 1 else _or_pool(volume.unsqueeze(0), factor)[0]


def downsample_frustum(frustum_mask: Tensor, factor: int) -> Tensor:
    """Nearest resize of a bool ``[X, Y, Z]`` frustum to 1/factor (voxel i reads voxel i * factor, as
    ``F.interpolate(mode="nearest")`` does); every dimension must be divisible by ``factor``."""
    volume = _as_volume(frustum_mask, "frustum_mask").bool()
    _check_factor(volume.shape, factor)
    return _downsampled_frustum(volume, factor)


# ----------------------------------------------------------------------------------------------------
# Matching and statistics
# ----------------------------------------------------------------------------------------------------


def match_segments(
    iou: Tensor, gt_labels: Tensor, pred_labels: Tensor, matching_threshold: float = 0.25
) -> list[tuple[int, int]]:
    """Greedy first-match: each GT (in order) takes the first unmatched same-class prediction with IoU > thr.

    Returns the ``(gt_index, pred_index)`` pairs in GT order.
    """
    iou_rows = iou.tolist()
    gt = [int(c) for c in torch.as_tensor(gt_labels).tolist()]
    pred = [int(c) for c in torch.as_tensor(pred_labels).tolist()]
    taken = [False] * len(pred)
    matches: list[tuple[int, int]] = []
    for g, gt_class in enumerate(gt):
        for p, pred_class in enumerate(pred):
            if taken[p] or pred_class != gt_class:
                continue
            if iou_rows[g][p] > matching_threshold:
                taken[p] = True
                matches.append((g, p))
                break
    return matches


def class_statistics(
    iou: Tensor,
    matches: Sequence[tuple[int, int]],
    gt_labels: Sequence[int] | Tensor,
    pred_labels: Sequence[int] | Tensor,
    num_classes: int,
) -> Tensor:
    """float64 ``[num_classes, 5]`` per-class ``[iou, tp, fp, fn, n]`` of one sample (row = class id).

    Matched IoUs are added in match order; every GT segment counts in n, unmatched GT in fn, unmatched
    predictions in fp of their own class. Labels outside ``1 .. num_classes-1`` are an error.
    """
    gt = [int(c) for c in torch.as_tensor(gt_labels).tolist()]
    pred = [int(c) for c in torch.as_tensor(pred_labels).tolist()]
    for name, labels in (("ground-truth", gt), ("predicted", pred)):
        bad = sorted({c for c in labels if not 0 < c < num_classes})
        if bad:
            raise PRQInputError(f"{name} segment classes {bad} are outside 1..{num_classes - 1}; pass the class "
                                "list the data set uses (num_classes = max class id + 1)")
    rows = [[0.0] * len(STATS_COLUMNS) for _ in range(num_classes)]
    matched_gt = {g for g, _ in matches}
    matched_pred = {p for _, p in matches}
    for g, p in matches:
        rows[gt[g]][0] += float(iou[g, p])
        rows[gt[g]][1] += 1
    for g, c in enumerate(gt):
        rows[c][4] += 1
        if g not in matched_gt:
            rows[c][3] += 1
    for p, c in enumerate(pred):
        if p not in matched_pred:
            rows[c][2] += 1
    return torch.tensor(rows, dtype=torch.float64)


def mask_iou(gt_masks: Tensor, pred_masks: Tensor, chunk: int = 1 << 20) -> Tensor:
    """float64 ``[G, P]`` IoU of bool masks ``gt_masks [G, ...]`` and ``pred_masks [P, ...]`` (same spatial
    shape; 0 where the union is empty). Only voxels some mask covers are visited, ``chunk`` at a time."""
    g = gt_masks.reshape(gt_masks.shape[0], math.prod(gt_masks.shape[1:])).bool()
    p = pred_masks.reshape(pred_masks.shape[0], math.prod(pred_masks.shape[1:])).bool().to(g.device)
    if g.shape[1] != p.shape[1]:
        raise PRQInputError(f"mask_iou: GT masks have {g.shape[1]} voxels, predictions {p.shape[1]}; both must be "
                            "at the same evaluation resolution")
    inter = torch.zeros(g.shape[0], p.shape[0], dtype=torch.float64, device=g.device)
    if g.shape[0] == 0 or p.shape[0] == 0:
        return inter
    active = (g.any(0) | p.any(0)).nonzero().flatten()
    for start in range(0, active.numel(), chunk):
        idx = active[start:start + chunk]
        inter += g[:, idx].double() @ p[:, idx].double().T
    union = g.sum(1).double()[:, None] + p.sum(1).double()[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def frame_statistics(
    gt_masks: Tensor,
    gt_labels: Tensor | Sequence[int],
    pred_panoptic: Tensor,
    pred_mapping: Mapping[int, int] | Sequence[Sequence[int]] | Tensor,
    pred_tdf: Tensor,
    frustum: Tensor | None,
    *,
    num_classes: int,
    iso_value: float,
    truncation: float = 3.0,
    downsample_factor: int = 1,
    matching_threshold: float = 0.25,
) -> tuple[Tensor, dict[str, object]]:
    """PRQ statistics of one frame whose GT is given as ready evaluated masks (e.g. a data loader's
    ``eval_masks`` / ``eval_labels`` built by :func:`segment_masks` of :func:`ground_truth_segments`).

    The prediction's masks are :func:`segment_masks` of the panoptic volume, its ordered id -> class
    mapping and the predicted distance field (``|tdf| < iso_value``, as for the GT), pooled by
    ``downsample_factor`` and ANDed with ``frustum`` (full resolution; None = everything); then
    :func:`match_segments` and :func:`class_statistics`. Summing the returned rows over frames (or
    :meth:`PanopticReconstructionQuality.merge`) and calling ``compute()`` gives PRQ / RSQ / RRQ.

    Args:
        gt_masks: bool ``[G, X/f, Y/f, Z/f]`` evaluated GT masks in matching order.
        gt_labels: ``[G]`` class of each GT segment.
        pred_panoptic, pred_mapping, pred_tdf: the fused prediction at full resolution.
        frustum: bool ``[X, Y, Z]`` frustum mask at full resolution, or None.
        num_classes: rows of the statistics (max class id + 1).

    Returns:
        ``(stats, details)``: float64 ``[num_classes, 5]`` with columns :data:`STATS_COLUMNS` and
        ``{"iou": [G, P] float64, "matches": [(g, p)], "gt_labels": [int], "pred_labels": [int]}``.
    """
    segments = prediction_segments(pred_panoptic.cpu(), pred_mapping)
    pred_masks = segment_masks(segments, pred_tdf.cpu(), None if frustum is None else frustum.cpu(),
                               iso_value=iso_value, truncation=truncation, downsample_factor=downsample_factor)
    gt_masks = torch.as_tensor(gt_masks).cpu().bool()
    if gt_masks.dim() != 4 or gt_masks.shape[1:] != pred_masks.shape[1:]:
        raise PRQInputError(f"gt_masks are {tuple(gt_masks.shape)} but the predictions evaluate at "
                            f"{tuple(pred_masks.shape[1:])} (grid / downsample_factor={downsample_factor}); build "
                            "both at the same downsample_factor")
    gt = [int(c) for c in torch.as_tensor(gt_labels).tolist()]
    if len(gt) != gt_masks.shape[0]:
        raise PRQInputError(f"{len(gt)} gt_labels for {gt_masks.shape[0]} gt_masks; pass one label per mask")
    pred = [int(c) for c in segments.labels.tolist()]
    iou = mask_iou(gt_masks, pred_masks)
    matches = match_segments(iou, torch.tensor(gt, dtype=torch.long), segments.labels, matching_threshold)
    stats = class_statistics(iou, matches, gt, pred, num_classes)
    return stats, {"iou": iou, "matches": matches, "pred_labels": pred, "gt_labels": gt}


@dataclass(frozen=True)
class SampleEvaluation:
    """Everything PRQ computed for one sample.

    Attributes:
        gt, pred: the segments in matching order.
        overlaps: mask sizes and pairwise intersections.
        iou: float64 ``[G, P]`` IoU of every pair.
        matches: matched ``(gt_index, pred_index)`` pairs.
        stats: float64 ``[num_classes, 5]`` per-class ``[iou, tp, fp, fn, n]`` of this sample.
    """

    gt: Segments
    pred: Segments
    overlaps: SegmentOverlaps
    iou: Tensor
    matches: list[tuple[int, int]]
    stats: Tensor


def _group_mean(rows: Sequence[tuple[float, float, float]]) -> tuple[float, float, float]:
    if not rows:
        return math.nan, math.nan, math.nan
    pq = sq = rq = 0.0
    for row_pq, row_sq, row_rq in rows:
        pq += row_pq
        sq += row_sq
        rq += row_rq
    return pq / len(rows), sq / len(rows), rq / len(rows)


class PanopticReconstructionQuality:
    """Accumulating PRQ / RSQ / RRQ metric over samples (and processes, by summing :attr:`stats`).

    Args:
        classes: class id -> ``(name, isthing)``; ids >= 1 (0 is void). E.g. :data:`FRONT3D_CLASSES`.
        stuff_classes: classes merged into one GT segment per sample (3D-FRONT: (10, 11); Matterport:
            (10, 11, 12)). ``None`` = every class whose isthing is False.
        matching_threshold: a pair matches only if IoU is strictly greater.
        iso_value: shell threshold on |tdf| (1.0 for 3D-FRONT, 2.0 for Matterport).
        truncation: distance assumed outside a segment (must be >= iso_value).
        downsample_factor: evaluate at 1/f resolution (Matterport: 2).
    """

    def __init__(
        self,
        classes: Mapping[int, tuple[str, bool]],
        stuff_classes: Iterable[int] | None = None,
        matching_threshold: float = 0.25,
        iso_value: float = 1.0,
        truncation: float = 3.0,
        downsample_factor: int = 1,
    ) -> None:
        if not classes:
            raise PRQInputError("classes is empty; pass e.g. frustum3d.metrics.FRONT3D_CLASSES")
        parsed: dict[int, tuple[str, bool]] = {}
        for class_id, spec in classes.items():
            if int(class_id) < 1:
                raise PRQInputError(f"class id {class_id} is invalid: ids start at 1 (0 is void)")
            name, isthing = spec
            parsed[int(class_id)] = (str(name), bool(isthing))
        self.classes: dict[int, tuple[str, bool]] = dict(sorted(parsed.items()))
        if stuff_classes is None:
            stuff_classes = [c for c, (_, isthing) in self.classes.items() if not isthing]
        self.stuff_classes: tuple[int, ...] = tuple(int(c) for c in stuff_classes)
        for c in self.stuff_classes:
            if c not in self.classes or self.classes[c][1]:
                raise PRQInputError(f"stuff class {c} must be a class of `classes` with isthing=False")
        _check_geometry(torch.Size(), iso_value, truncation, downsample_factor)
        self.matching_threshold = float(matching_threshold)
        self.iso_value = float(iso_value)
        self.truncation = float(truncation)
        self.downsample_factor = downsample_factor
        self.num_classes = max(self.classes) + 1
        self._stats = torch.zeros(self.num_classes, len(STATS_COLUMNS), dtype=torch.float64)

    # -- state ---------------------------------------------------------------------------------------

    @property
    def stats(self) -> Tensor:
        """float64 ``[num_classes, 5]`` accumulated ``[iou, tp, fp, fn, n]``; row = class id."""
        return self._stats.clone()

    def reset(self) -> None:
        """Forget all accumulated samples."""
        self._stats.zero_()

    def load_stats(self, stats: Tensor) -> None:
        """Replace the accumulated statistics (e.g. with an all-reduced sum over processes)."""
        stats = torch.as_tensor(stats, dtype=torch.float64).cpu()
        if stats.shape != self._stats.shape:
            raise PRQInputError(f"stats must have shape {tuple(self._stats.shape)}, got {tuple(stats.shape)}")
        self._stats = stats.clone()

    def merge(self, other: PanopticReconstructionQuality | Tensor) -> PanopticReconstructionQuality:
        """Add another metric's (or a stats tensor's) statistics to this one; returns self."""
        stats = other.stats if isinstance(other, PanopticReconstructionQuality) else other
        stats = torch.as_tensor(stats, dtype=torch.float64).cpu()
        if stats.shape != self._stats.shape:
            raise PRQInputError(f"cannot merge stats of shape {tuple(stats.shape)} into {tuple(self._stats.shape)}")
        self._stats += stats
        return self

    # -- per sample ----------------------------------------------------------------------------------

    def _check_labels(self, labels: Tensor, what: str) -> None:
        for c in labels.tolist():
            if c not in self.classes:
                raise PRQInputError(
                    f"{what} segment has class {c}, which is not in `classes` (known: {sorted(self.classes)})"
                )

    def evaluate(
        self,
        gt_instance: Tensor,
        gt_semantic: Tensor,
        gt_tdf: Tensor,
        pred_panoptic: Tensor,
        pred_mapping: Mapping[int, int] | Sequence[Sequence[int]] | Tensor,
        pred_tdf: Tensor,
        frustum_mask: Tensor | None = None,
    ) -> SampleEvaluation:
        """Score one sample without accumulating it (see :meth:`add` for the arguments)."""
        gt = ground_truth_segments(gt_instance, gt_semantic, self.stuff_classes)
        pred = prediction_segments(pred_panoptic, pred_mapping)
        self._check_labels(gt.labels, "a ground-truth")
        self._check_labels(pred.labels, "a predicted")
        overlaps = segment_overlaps(
            gt,
            gt_tdf,
            pred,
            pred_tdf,
            frustum_mask,
            iso_value=self.iso_value,
            truncation=self.truncation,
            downsample_factor=self.downsample_factor,
        )
        iou = overlaps.iou()
        matches = match_segments(iou, gt.labels, pred.labels, self.matching_threshold)
        stats = class_statistics(iou, matches, gt.labels, pred.labels, self.num_classes)
        return SampleEvaluation(gt=gt, pred=pred, overlaps=overlaps, iou=iou, matches=matches, stats=stats)

    def add(
        self,
        gt_instance: Tensor,
        gt_semantic: Tensor,
        gt_tdf: Tensor,
        pred_panoptic: Tensor,
        pred_mapping: Mapping[int, int] | Sequence[Sequence[int]] | Tensor,
        pred_tdf: Tensor,
        frustum_mask: Tensor | None = None,
    ) -> Tensor:
        """Score one sample and add it to the running statistics.

        Args:
            gt_instance: int ``[X, Y, Z]`` raw GT instance ids (0 = none).
            gt_semantic: int ``[X, Y, Z]`` GT class per voxel (0 = free space).
            gt_tdf: ``[X, Y, Z]`` GT distance field in voxel units (truncated).
            pred_panoptic: int ``[X, Y, Z]`` predicted segment ids (0 = void).
            pred_mapping: segment id -> class, dict or ``[M, 2]`` rows, in matching order.
            pred_tdf: ``[X, Y, Z]`` predicted distance field (sign ignored).
            frustum_mask: bool ``[X, Y, Z]``, True = evaluated; ``None`` = everything.

        Returns:
            float64 ``[num_classes, 5]`` statistics of this sample alone.
        """
        evaluation = self.evaluate(
            gt_instance, gt_semantic, gt_tdf, pred_panoptic, pred_mapping, pred_tdf, frustum_mask
        )
        # Add matched IoUs one by one, in match order, like the reference's running sums.
        gt_labels = evaluation.gt.labels.tolist()
        for g, p in evaluation.matches:
            self._stats[gt_labels[g], 0] += float(evaluation.iou[g, p])
        self._stats[:, 1:] += evaluation.stats[:, 1:]
        return evaluation.stats

    # -- reduction -----------------------------------------------------------------------------------

    def compute(self) -> dict[str, object]:
        """PRQ / RSQ / RRQ (fractions), their thing / stuff split and per-class rows.

        A class enters the means only if it has tp + fp + fn > 0 and n > 0 (GT present). Means over an
        empty set are NaN. ``per_class`` has one row per class of ``classes`` with ``counted`` telling
        whether it entered the mean (PRQ/RSQ/RRQ are NaN for rows that did not).
        """
        per_class: dict[int, dict[str, object]] = {}
        counted_all: list[tuple[float, float, float]] = []
        counted_things: list[tuple[float, float, float]] = []
        counted_stuff: list[tuple[float, float, float]] = []
        for class_id, (name, isthing) in self.classes.items():
            iou, tp, fp, fn, n = (float(v) for v in self._stats[class_id].tolist())
            counted = tp + fp + fn > 0 and n > 0
            if counted:
                denominator = tp + 0.5 * fp + 0.5 * fn
                values = (iou / denominator, iou / tp if tp != 0 else 0.0, tp / denominator)
                counted_all.append(values)
                (counted_things if isthing else counted_stuff).append(values)
            else:
                values = (math.nan, math.nan, math.nan)
            per_class[class_id] = {
                "name": name,
                "isthing": isthing,
                "counted": counted,
                "PRQ": values[0],
                "RSQ": values[1],
                "RRQ": values[2],
                "iou": iou,
                "tp": int(tp),
                "fp": int(fp),
                "fn": int(fn),
                "n": int(n),
            }
        result: dict[str, object] = {}
        for suffix, rows in (("", counted_all), ("_th", counted_things), ("_st", counted_stuff)):
            pq, sq, rq = _group_mean(rows)
            result[f"PRQ{suffix}"] = pq
            result[f"RSQ{suffix}"] = sq
            result[f"RRQ{suffix}"] = rq
        result["num_classes_counted"] = len(counted_all)
        result["num_things_counted"] = len(counted_things)
        result["num_stuff_counted"] = len(counted_stuff)
        result["per_class"] = per_class
        return result
