"""Where does 3D PRQ go? Split a trained 3D checkpoint's PRQ into its geometry and its labelling part.

    python tools/diagnose_3d.py --bench OUT            # a finished tools/bench_learning.py run (its 3D spec)
    python tools/diagnose_3d.py --bench OUT --checkpoint path/to/model_epoch_..._step_....pth
    python tools/diagnose_3d.py --demo OUT             # a finished ``nvp3d demo --out OUT`` (its spec_3d.yaml)

For every test frame the 3D stage is run and fused as in ``nvp3d evaluate``; then, besides the plain PRQ:

* **surface**: the predicted surface (``|tdf| < iso``) against the GT surface inside the frustum: IoU,
  precision, recall, and the same with one voxel of tolerance (a predicted voxel next to a GT surface voxel
  counts as right) -- how much of the geometry error is a one-voxel offset;
* **visibility**: how many 3D GT segments (things: instances; stuff: classes) are 2D targets of the frame at
  all; the others (occluded, or under ``dataset.min_instance_pixels``) can never be matched and cap RQ;
* **predicted labels on GT geometry** (geometry oracle): the GT TDF with every GT surface voxel taking the
  segment of the nearest labelled predicted voxel (within 1.5 voxels); PRQ is then limited only by the 2D
  queries, the 3D masks and the fusion.
* **GT labels on predicted geometry** (label oracle): the predicted TDF with every predicted surface voxel taking
  the GT segment of the nearest GT surface voxel (within 1.5 voxels); PRQ is then limited only by the geometry
  (an upper bound for it: predicted surface farther from every GT segment stays unlabelled, so it adds no false
  segment). Next to the geometry oracle it tells whether geometry or labelling costs more, per things / stuff.
* **GT 2D things carried through the predicted geometry** (``gt_2d_things_<d>m``, an oracle of 2D-to-3D label
  transfer): the fused volume with every voxel from one band in front of the predicted first surface of its pixel
  to ``d`` metres behind it relabelled by the GT 2D thing segment at that pixel. Against the label oracle it tells
  how much of the things' PRQ perfect 2D things, carried along the camera rays, would recover;
* **GT depth lifting** (depth oracle): the same checkpoint evaluated again with the lifting plane's depth replaced
  by the GT depth (valid pixels; the 2D network's elsewhere), everything else as trained: how much PRQ the 2D
  depth error costs this network (a network trained on GT-depth lifting could do better still). **GT scale
  lifting**: the 2D network's depth times one factor per image, the median of GT / predicted depth: how much of
  that is one scale error per image (the room's size misjudged) rather than the depth's shape;
* **no spurious things** (an oracle of a perfect thing filter): the plain PRQ with every predicted thing segment
  that matches no GT thing dropped (its false positives removed): what a per-segment quality score could win;
* **things**: where every GT thing of the test frames ends up (:mod:`nvp3d.evaluation.thing_outcomes`, also in
  ``nvp3d evaluate``'s ``metrics_3d.json``): matched, found at too low an IoU by a segment of its class, covered
  by stuff or by another thing, or missed; and what the unmatched predicted things are (duplicates, low-IoU
  pieces, spurious); once for all GT things and once for those that are 2D targets. It names which part of the
  3D labelling loses the things;
* **2D labels** (``--labels-2d-bands``, default 1): the same checkpoint evaluated again with
  ``model.frustum3d.labels_2d_bands`` set (the visible surface labelled by the 2D masks,
  :func:`nvp3d.model.mask_prior.use_2d_labels`), through the network's own code path;
* **fusion sweep**: the same network outputs fused again (no retraining) with other ``object_mask_threshold`` /
  ``mask_threshold`` values, with thing masks taking precedence over stuff masks, and with the 2D mask prior
  added to the 3D mask logits, and with the 2D mask logits instead of the 3D ones near each pixel's predicted depth
  (one or two truncation bands; optionally spread to the nearest hidden voxels), or near the visible surface of the
  *predicted geometry* (the first occupied voxel along each pixel's ray; optionally for thing pixels only), or
  from there through 0.5-2 m behind it where a thing wins the pixel; Mask2Former's overlap rule applied to the 3D
  thing masks (a query keeping less than 50 / 80 % of the voxels its mask claims is dropped and the frame fused
  again); only the thing queries that own a 2D segment; thing segments split into their 3D-connected pieces;
  thing segments under 32 or 128 voxels dropped: whether the post-processing is a lever;
* **depth**: the frozen 2D network's depth on the lifting plane against the GT depth there (valid pixels):
  signed mean, median absolute error and the share of pixels within one and half a voxel; on the held-out frames
  and on ``--depth-train-frames`` training frames (underfitting or not generalising). The 3D stage lifts its
  features along each ray at this depth, so a depth error of several voxels puts visible surfaces in the wrong
  cells before the 3D network sees them. The same after one scale per image (as the GT-scale lifting) tells
  scale from shape errors.

Prints one table (all / things / stuff) and writes ``<bench>/diagnose_3d.json`` (``<demo>/diagnose_3d.json``). Not a test: a tool for the
learning issue (which part of the 3D stage to improve first).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from frustum3d.panoptic import kept_query_mask
from nvp3d.evaluation.depth2d import image_scale
from nvp3d.model.semantic_gate import gate_to_classes
from nvp3d.model.things_of_2d import as_no_object, thing_queries_of_2d, winning_query
from scipy.ndimage import binary_dilation, distance_transform_edt


def _nearest_fill(labels: np.ndarray, max_distance: float = 1.5) -> np.ndarray:
    """Every voxel within ``max_distance`` voxels of a non-zero voxel of ``labels`` takes the nearest one's
    value; farther voxels stay 0 (a surface the other side does not have stays unlabelled)."""
    if not labels.any():
        return labels
    dist, idx = distance_transform_edt(labels == 0, return_indices=True)
    return np.where(dist <= max_distance, labels[tuple(idx)], 0).astype(labels.dtype)


def gt_panoptic(eval_masks: Any, eval_labels: Any) -> tuple[np.ndarray, dict[int, int]]:
    """The evaluated GT segments (bool ``[G, X, Y, Z]``, disjoint) as one panoptic volume with ids 1..G in
    matching order, and its id -> class mapping."""
    masks = torch.as_tensor(eval_masks).bool().numpy()
    pan = np.zeros(masks.shape[1:], np.int32)
    for g in range(masks.shape[0]):
        pan[masks[g]] = g + 1
    return pan, {g + 1: int(c) for g, c in enumerate(torch.as_tensor(eval_labels).tolist())}


def refuse(raw: dict[str, Any], stuff_ids: tuple[int, ...], object_mask_threshold: float,
           mask_threshold: float = 0.5, *, things_first: bool = False, prior: bool = False,
           labels_2d: float = 0.0, nearest_2d: float = 0.0, labels_2d_surface: float = 0.0,
           things_only_2d: bool = False, overlap_3d: float = 0.0, things_of_2d: bool = False,
           things_through_2d: float = 0.0, grow_things: float = 0.0, gt_gate: str = "",
           split_things: int = 0, min_thing_voxels: int = 0, min_thing_score: float = 0.0) -> Any:
    """The fusion of one frame's kept raw outputs again, with other thresholds; ``prior`` adds the 2D mask prior
    (:mod:`nvp3d.model.mask_prior`) to the mask logits first, as a network trained with
    ``model.frustum3d.mask_prior_2d`` does; ``things_first`` takes every voxel that a kept thing query claims
    (sigmoid >= ``mask_threshold``) away from the stuff queries, so that a wall or floor mask cannot outbid an
    object lying on it. ``labels_2d`` > 0: the voxels within ``labels_2d`` truncation bands of their pixel's
    predicted depth take the frozen 2D network's mask logits *instead of* the 3D ones (the visible surface is
    labelled by the 2D segmentation, the 3D masks decide only behind and in front of it); ``nearest_2d`` > 0 then
    also gives every other labelled voxel the segment of the nearest voxel so labelled within that many voxels
    (a hidden back face takes the label of the visible front of its object). ``labels_2d_surface`` > 0 does the
    same on the *predicted geometry's* visible surface instead: the voxels within that many truncation bands of
    the first occupied voxel along their pixel's ray (:func:`nvp3d.model.mask_prior.surface_depth_gap`), so the
    2D labels land on the surface the 3D network reconstructed even where the 2D depth is voxels off;
    ``things_only_2d`` replaces only where the 2D masks' winning kept query is a thing (stuff keeps its 3D
    masks). ``overlap_3d`` > 0: Mask2Former's overlap rule in 3D, for things: a kept thing query whose won voxels
    are less than this fraction of the voxels its own mask claims (sigmoid >= ``mask_threshold``) is dropped and
    the frame fused again without it (its voxels go to the next-best query). ``things_of_2d``: only the thing
    queries that own a segment of the 2D panoptic result enter the fusion (the 2D post-processing has already
    removed duplicates and hidden queries). ``things_through_2d`` > 0 (metres): where a thing wins the voxel's pixel
    in the 2D masks, every voxel from one band in front of the predicted geometry's first surface to this far behind
    it takes the 2D mask logits (an object's hidden back and inside labelled by its visible front). ``grow_things``
    > 0 (voxels): after the fusion, every stuff voxel within that distance of a thing voxel takes the nearest
    thing's segment (a thing's predicted surface that spills past its mask's edge). ``nearest_2d`` and
    ``grow_things`` change the volume's ``panoptic`` only (PRQ reads it with ``mapping``), not its ``semantic``.
    ``gt_gate`` (an oracle of a 3D semantic head; needs ``raw["gt_class"]``, the GT class of the nearest GT segment
    voxel within 1.5 voxels of each predicted voxel, 0 = none): ``"class"`` lets a voxel go only to kept queries of
    its GT class, ``"thing_stuff"`` only to thing queries at GT thing voxels and stuff queries at GT stuff voxels;
    where no kept query qualifies, or the voxel has no GT class, it stays unrestricted. ``split_things`` > 0
    (voxels): after the fusion, every piece of a thing segment that is not 26-connected to the segment's largest
    piece and has at least that many voxels becomes a segment of its own, same class (one query's mask spanning
    two separate objects; :func:`split_disconnected_things`). ``min_thing_voxels`` > 0: then every thing segment of
    fewer voxels is dropped (its voxels become void; :func:`small_things`). ``min_thing_score`` > 0: every thing
    segment whose class score times mean mask probability is under it is dropped (:func:`weak_things`)."""
    from frustum3d.panoptic import panoptic_fusion

    logits = raw["mask_logits"] + prior_in_band(raw) if prior else raw["mask_logits"]
    band = None
    if labels_2d > 0 and logits.numel():
        band = raw["depth_gap"].abs() <= labels_2d * raw["band_m"]
    elif labels_2d_surface > 0 and logits.numel():
        band = raw["surface_gap"].abs() <= labels_2d_surface * raw["band_m"]
    elif things_through_2d > 0 and logits.numel():
        gap = raw["surface_gap"]
        band = (gap >= -raw["band_m"]) & (gap <= things_through_2d)
        things_only_2d = True
    if band is not None:
        if things_only_2d:
            band = band & _thing_wins_2d(raw, stuff_ids, object_mask_threshold)
        logits = torch.where(band[:, None], raw["prior_any"], logits)
    if things_first and logits.numel():
        _, kept, is_stuff = _kept_queries(raw, stuff_ids, object_mask_threshold)
        things = kept & ~is_stuff
        if bool(things.any()):
            claimed = (torch.sigmoid(logits[:, things]) >= mask_threshold).any(1)
            logits = logits.clone()
            logits[claimed[:, None] & is_stuff[None, :]] = -30.0
    class_logits = raw["class_logits"]
    if things_of_2d:
        _, kept, is_stuff = _kept_queries(raw, stuff_ids, object_mask_threshold)
        class_logits = as_no_object(class_logits, kept & ~is_stuff & ~raw["thing_queries_2d"])
    if gt_gate and raw.get("gt_class") is not None and logits.numel():
        logits = gate_by_gt_class(logits, class_logits, raw["gt_class"], stuff_ids, object_mask_threshold, gt_gate)
    vol = panoptic_fusion(class_logits, logits, raw["tdf"], coordinates=raw["coords"],
                          stuff_classes=stuff_ids, object_mask_threshold=object_mask_threshold,
                          mask_threshold=mask_threshold)
    if overlap_3d > 0 and logits.numel():
        scores, kept, is_stuff = _kept_queries({"class_logits": class_logits}, stuff_ids, object_mask_threshold)
        cand = (kept & ~is_stuff).nonzero().flatten()
        if cand.numel():
            winner = winning_query(scores, kept, logits, 1)
            own = torch.sigmoid(logits[:, cand]) >= mask_threshold
            won = ((winner[:, None] == cand[None, :]) & own).sum(0).float()
            claimed = own.sum(0).float()
            weak = cand[(claimed > 0) & (won < overlap_3d * claimed)]
            if weak.numel():
                drop = torch.zeros(class_logits.shape[0], dtype=torch.bool)
                drop[weak] = True
                vol = panoptic_fusion(as_no_object(class_logits, drop), logits, raw["tdf"], coordinates=raw["coords"],
                                      stuff_classes=stuff_ids, object_mask_threshold=object_mask_threshold,
                                      mask_threshold=mask_threshold)
    if grow_things > 0:
        pan = vol.panoptic.numpy()
        stuff = {int(c) for c in stuff_ids}
        stuff_segments = [sid for sid, cls in vol.mapping.items() if cls in stuff]
        is_stuff = np.isin(pan, stuff_segments)
        things = np.where((pan != 0) & ~is_stuff, pan, 0).astype(np.int32)
        spread = _nearest_fill(things, grow_things)
        out = np.where(is_stuff & (spread != 0), spread, pan).astype(np.int32)
        vol = dataclasses.replace(vol, panoptic=torch.from_numpy(out))
    if split_things > 0:
        vol = split_disconnected_things(vol, stuff_ids, split_things)
    if min_thing_score > 0 and logits.numel():
        vol = drop_segments(vol, weak_things(vol, logits, raw["coords"], stuff_ids, min_thing_score))
    if min_thing_voxels > 0:
        vol = drop_segments(vol, small_things(vol.panoptic, vol.mapping, stuff_ids, min_thing_voxels))
    if band is None or nearest_2d <= 0:
        return vol
    pan = vol.panoptic.numpy()
    visible = np.zeros(pan.shape, bool)
    c = raw["coords"][band].numpy()
    visible[c[:, 0], c[:, 1], c[:, 2]] = True
    spread = _nearest_fill(np.where(visible, pan, 0).astype(np.int32), nearest_2d)
    out = np.where((pan != 0) & ~visible & (spread != 0), spread, pan).astype(np.int32)
    return dataclasses.replace(vol, panoptic=torch.from_numpy(out))


#: 26-connectivity: the 13 voxel offsets of a half neighbourhood (the other 13 are their negatives)
HALF_NEIGHBOURS = tuple(o for o in itertools.product((-1, 0, 1), repeat=3) if o > (0, 0, 0))


def connected_components(coords: torch.Tensor, labels: torch.Tensor, dims: tuple[int, int, int]) -> torch.Tensor:
    """Component of each of ``N`` distinct voxels ``coords`` ``[N, 3]`` (inside ``dims``): two voxels are in one
    component when a chain of 26-adjacent voxels of their own ``labels`` ``[N]`` joins them. Returns ``[N]`` int64,
    the smallest row index of each voxel's component (so equal values mean one component). Minimum-label
    propagation over the adjacent pairs with pointer jumping: a few passes instead of one per voxel of diameter."""
    n = coords.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    c = coords.long()
    size = torch.tensor(dims, dtype=torch.long)
    key = (c[:, 0] * dims[1] + c[:, 1]) * dims[2] + c[:, 2]
    sorted_key, order = torch.sort(key)
    src, dst = [], []
    for offset in HALF_NEIGHBOURS:
        nb = c + torch.tensor(offset)
        inside = ((nb >= 0) & (nb < size)).all(1)
        nb_key = (nb[:, 0] * dims[1] + nb[:, 1]) * dims[2] + nb[:, 2]
        pos = torch.searchsorted(sorted_key, nb_key).clamp_(max=n - 1)
        j = order[pos]
        hit = inside & (sorted_key[pos] == nb_key) & (labels[j] == labels)
        src.append(torch.nonzero(hit).flatten())
        dst.append(j[hit])
    a, b = torch.cat(src), torch.cat(dst)
    comp = torch.arange(n)
    while True:
        nxt = comp.clone()
        nxt.scatter_reduce_(0, a, comp[b], "amin")
        nxt.scatter_reduce_(0, b, comp[a], "amin")
        while True:  # pointer jumping: every voxel points at its pointer's pointer until nothing moves
            jumped = nxt[nxt]
            if torch.equal(jumped, nxt):
                break
            nxt = jumped
        if torch.equal(nxt, comp):
            return comp
        comp = nxt


def split_disconnected_things(vol: Any, stuff_ids: tuple[int, ...], min_voxels: int) -> Any:
    """The fused volume ``vol`` with each thing segment split into its 26-connected pieces: the largest keeps the
    segment id, every other piece of at least ``min_voxels`` voxels becomes a new segment (ids after the largest,
    same class); smaller pieces stay with the segment. Stuff segments are left whole."""
    stuff = {int(c) for c in stuff_ids}
    things = [sid for sid, cls in vol.mapping.items() if cls not in stuff]
    if not things:
        return vol
    dims = tuple(int(d) for d in vol.panoptic.shape)
    flat = vol.panoptic.reshape(-1).long()
    voxels = torch.nonzero(torch.isin(flat, torch.tensor(things))).flatten()
    coords = torch.stack(torch.unravel_index(voxels, dims), 1)
    segment = flat[voxels]
    comp = connected_components(coords, segment, dims)
    out, mapping, next_id = flat.clone(), dict(vol.mapping), max(vol.mapping) + 1
    for sid in things:
        mine = segment == sid
        pieces, sizes = torch.unique(comp[mine], return_counts=True)
        largest = int(sizes.argmax()) if pieces.numel() else 0
        for i, (piece, count) in enumerate(zip(pieces.tolist(), sizes.tolist())):
            if i != largest and count >= min_voxels:
                out[voxels[mine & (comp == piece)]] = next_id
                mapping[next_id] = mapping[sid]
                next_id += 1
    return dataclasses.replace(vol, panoptic=out.reshape(dims).to(vol.panoptic.dtype), mapping=mapping)


def drop_segments(vol: Any, drop: list[int]) -> Any:
    """The fused volume ``vol`` with the segments ``drop`` made void (0 in ``panoptic`` and ``semantic``) and left out
    of its mapping."""
    if not drop:
        return vol
    pan = torch.where(torch.isin(vol.panoptic, torch.tensor(drop, dtype=vol.panoptic.dtype)),
                      torch.zeros_like(vol.panoptic), vol.panoptic)
    return dataclasses.replace(vol, panoptic=pan, semantic=torch.where(pan == 0, torch.zeros_like(vol.semantic),
                                                                       vol.semantic),
                               mapping={sid: cls for sid, cls in vol.mapping.items() if sid not in drop})


def small_things(panoptic: torch.Tensor, mapping: dict[int, int], stuff_ids: tuple[int, ...],
                 min_voxels: int) -> list[int]:
    """The thing segments of fewer than ``min_voxels`` voxels (stuff segments never, whatever their size)."""
    stuff = {int(c) for c in stuff_ids}
    counts = torch.bincount(panoptic.reshape(-1).long(), minlength=max(mapping, default=0) + 1)
    return [sid for sid, cls in mapping.items() if cls not in stuff and int(counts[sid]) < min_voxels]


def weak_things(vol: Any, mask_logits: torch.Tensor, coords: torch.Tensor, stuff_ids: tuple[int, ...],
                min_score: float) -> list[int]:
    """Thing segments of a fused volume whose quality is under ``min_score``: the class score of the segment's query
    times the mean mask probability of that query over the segment's voxels that have logits (Mask2Former's
    instance score; a segment the 3D mask claims only weakly). ``mask_logits`` ``[N, Q]`` at ``coords`` ``[N, 3]``."""
    stuff = {int(c) for c in stuff_ids}
    c = coords.long()
    at = vol.panoptic[c[:, 0], c[:, 1], c[:, 2]]
    weak = []
    for sid, queries in vol.segment_queries.items():
        if sid not in vol.mapping or vol.mapping[sid] in stuff:
            continue
        mine = at == sid
        q = queries[0]
        mask = float(torch.sigmoid(mask_logits[mine, q].float()).mean()) if bool(mine.any()) else 0.0
        if float(vol.scores[q]) * mask < min_score:
            weak.append(sid)
    return weak


def gate_by_gt_class(logits: torch.Tensor, class_logits: torch.Tensor, gt_class: torch.Tensor,
                     stuff_ids: tuple[int, ...], object_mask_threshold: float, gate: str) -> torch.Tensor:
    """``[N, Q]`` mask logits with the queries a voxel may not go to (:func:`refuse`'s ``gt_gate``) gated out: the
    fusion's own gate (``nvp3d.model.semantic_gate.gate_to_classes``) with the GT classes, at every labelled voxel;
    ``"thing_stuff"`` gates by thing / stuff alone (queries' and voxels' classes reduced to 1 = stuff, 2 = thing)."""
    _, kept, is_stuff = _kept_queries({"class_logits": class_logits}, stuff_ids, object_mask_threshold)
    labels = class_logits.argmax(-1)
    gt = gt_class.long()
    if gate == "thing_stuff":
        gt_stuff = torch.isin(gt, torch.tensor([int(c) for c in stuff_ids], dtype=gt.dtype))
        labels, gt = torch.where(is_stuff, 1, 2), torch.where(gt > 0, torch.where(gt_stuff, 1, 2), 0)
    elif gate != "class":
        raise ValueError(f"gt_gate {gate!r}: use 'class' or 'thing_stuff'")
    return gate_to_classes(logits, gt, labels, kept, gt > 0)


def gt_class_at(coords: torch.Tensor, eval_masks: Any, eval_labels: Any) -> torch.Tensor:
    """The GT class of the nearest evaluated GT segment voxel within 1.5 voxels of each of ``coords`` ``[N, 3]``
    (0 = none), for :func:`gate_by_gt_class`."""
    gt_pan, mapping = gt_panoptic(eval_masks, eval_labels)
    filled = _nearest_fill(gt_pan)
    lut = np.zeros(max(mapping, default=0) + 1, np.int64)
    for seg, cls in mapping.items():
        lut[seg] = cls
    c = coords.long().numpy()
    return torch.from_numpy(lut[filled[c[:, 0], c[:, 1], c[:, 2]]])


#: how far behind the predicted first surface :func:`gt_2d_things_through` carries the GT 2D things (metres; 0:
#: the visible surface's band only)
GT_2D_DEPTHS = (0.0, 0.5, 1.0, 2.0)


def gt_2d_things_through(raw: dict[str, Any], sample: dict[str, Any], panoptic: torch.Tensor,
                         mapping: dict[int, int], depth_m: float) -> tuple[torch.Tensor, dict[int, int]]:
    """An oracle of 2D-to-3D label transfer: the frame's fused panoptic volume with every voxel from one band in
    front of the predicted geometry's first surface to ``depth_m`` behind it relabelled by the *GT* 2D thing
    segment at its pixel (one new segment per GT 2D thing). With perfect 2D things, this is what carrying them
    through the predicted geometry along the camera rays would score."""
    ui, vi, inside = raw["pixels"]
    h, w = raw["plane_hw"]
    masks = torch.nn.functional.interpolate(sample["masks"][None].float(), size=(h, w), mode="nearest")[0] > 0.5
    things = sample["is_thing"].bool()
    seg = torch.full((h, w), -1, dtype=torch.long)
    for t in range(masks.shape[0]):
        if bool(things[t]):
            seg[masks[t]] = t
    at = torch.where(inside, seg[vi.clamp(0, h - 1), ui.clamp(0, w - 1)], torch.full_like(ui, -1))
    gap = raw["surface_gap"]
    take = (at >= 0) & (gap >= -raw["band_m"]) & (gap <= max(depth_m, raw["band_m"]))
    out = panoptic.clone()
    new_mapping = dict(mapping)
    first = max(mapping, default=0) + 1
    c = raw["coords"][take]
    out[c[:, 0], c[:, 1], c[:, 2]] = (first + at[take]).to(out.dtype)
    for t in at[take].unique().tolist():
        new_mapping[first + int(t)] = int(sample["labels"][t])
    return out, new_mapping


def _kept_queries(raw: dict[str, Any], stuff_ids: tuple[int, ...], object_mask_threshold: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query, as the fusion keeps them: its score, whether it is kept (a class, not "no object", score over
    ``object_mask_threshold``) and whether its class is stuff."""
    scores, labels, kept = kept_query_mask(raw["class_logits"], object_mask_threshold)
    stuff = {int(c) for c in stuff_ids}
    return scores, kept, torch.tensor([int(c) in stuff for c in labels.tolist()], dtype=torch.bool)


def _thing_wins_2d(raw: dict[str, Any], stuff_ids: tuple[int, ...], object_mask_threshold: float) -> torch.Tensor:
    """Per voxel: is the query that wins its pixel in the 2D masks (arg-max of score x sigmoid over the kept
    queries, as the fusion takes it) a thing? bool ``[N]``."""
    scores, kept, is_stuff = _kept_queries(raw, stuff_ids, object_mask_threshold)
    if not bool(kept.any()):
        return torch.zeros(raw["prior_any"].shape[0], dtype=torch.bool)
    return ~is_stuff[winning_query(scores, kept, raw["prior_any"], 1)]


def prior_in_band(raw: dict[str, Any]) -> torch.Tensor:
    """The 2D mask prior as a network trained with ``model.frustum3d.mask_prior_2d`` adds it: the 2D logits of the
    voxels within one truncation band of their pixel's depth, 0 elsewhere (:func:`nvp3d.model.mask_prior.mask_prior_at`
    with the depth, derived from the kept 2D logits and depth gaps)."""
    inside = raw["depth_gap"].abs() <= raw["band_m"]
    return torch.where(inside[:, None], raw["prior_any"], torch.zeros_like(raw["prior_any"]))


def fusion_variants(omt: float, prior_trained: bool) -> dict[str, dict[str, Any]]:
    """The named :func:`refuse` settings of the fusion sweep (the recipe's own first)."""
    out = {f"omt {omt:g}, mask 0.5": dict(object_mask_threshold=omt)}
    for a, b in ((0.3, 0.5), (0.7, 0.5), (omt, 0.3), (omt, 0.7)):
        out.setdefault(f"omt {a:g}, mask {b:g}", dict(object_mask_threshold=a, mask_threshold=b))
    out["things first"] = dict(object_mask_threshold=omt, things_first=True)
    out["2D labels in band"] = dict(object_mask_threshold=omt, labels_2d=1.0)
    out["2D labels in 2 bands"] = dict(object_mask_threshold=omt, labels_2d=2.0)
    out["2D in band, things first"] = dict(object_mask_threshold=omt, labels_2d=1.0, things_first=True)
    out["2D in band + nearest 2"] = dict(object_mask_threshold=omt, labels_2d=1.0, nearest_2d=2.0)
    out["2D in band + nearest 4"] = dict(object_mask_threshold=omt, labels_2d=1.0, nearest_2d=4.0)
    out["2D on 3D surface"] = dict(object_mask_threshold=omt, labels_2d_surface=1.0)
    out["2D on 3D surface, 2 bands"] = dict(object_mask_threshold=omt, labels_2d_surface=2.0)
    out["2D on 3D surface + nearest 2"] = dict(object_mask_threshold=omt, labels_2d_surface=1.0, nearest_2d=2.0)
    out["2D things on 3D surface"] = dict(object_mask_threshold=omt, labels_2d_surface=1.0, things_only_2d=True)
    out["2D things through 0.5 m"] = dict(object_mask_threshold=omt, things_through_2d=0.5)
    out["2D things through 1 m"] = dict(object_mask_threshold=omt, things_through_2d=1.0)
    out["2D things through 2 m"] = dict(object_mask_threshold=omt, things_through_2d=2.0)
    out["things grow 1 voxel into stuff"] = dict(object_mask_threshold=omt, grow_things=1.0)
    out["things grow 2 voxels into stuff"] = dict(object_mask_threshold=omt, grow_things=2.0)
    out["3D overlap 0.5 (things)"] = dict(object_mask_threshold=omt, overlap_3d=0.5)
    out["3D overlap 0.8 (things)"] = dict(object_mask_threshold=omt, overlap_3d=0.8)
    out["things of the 2D result"] = dict(object_mask_threshold=omt, things_of_2d=True)
    out["2D things + 3D overlap 0.5"] = dict(object_mask_threshold=omt, things_of_2d=True, overlap_3d=0.5)
    out["things split, pieces >= 8"] = dict(object_mask_threshold=omt, split_things=8)
    out["things split, pieces >= 32"] = dict(object_mask_threshold=omt, split_things=32)
    out["things under 32 voxels dropped"] = dict(object_mask_threshold=omt, min_thing_voxels=32)
    out["things under 128 voxels dropped"] = dict(object_mask_threshold=omt, min_thing_voxels=128)
    out["2D things + under 128 dropped"] = dict(object_mask_threshold=omt, things_of_2d=True, min_thing_voxels=128)
    for t in (0.2, 0.4):
        out[f"things scored under {t:g} dropped"] = dict(object_mask_threshold=omt, min_thing_score=t)
    out["oracle: GT class gate"] = dict(object_mask_threshold=omt, gt_gate="class")
    out["oracle: GT thing/stuff gate"] = dict(object_mask_threshold=omt, gt_gate="thing_stuff")
    if not prior_trained:
        out["2D prior added"] = dict(object_mask_threshold=omt, prior=True)
        out["prior + things first"] = dict(object_mask_threshold=omt, prior=True, things_first=True)
    return out


def depth_gap_at(coords: torch.Tensor, intrinsic: torch.Tensor, geometry: Any, depth: torch.Tensor) -> torch.Tensor:
    """Metric depth of every voxel ``coords [N, 3]`` minus the plane depth ``depth [h, w]`` at the pixel it projects
    to (:func:`nvp3d.model.mask_prior.voxel_pixels`, the prior's projection); ``inf`` where it projects outside the
    image: how far in front of (< 0) or behind (> 0) the visible surface of its ray a voxel lies."""
    from nvp3d.model.mask_prior import voxel_pixels

    ui, vi, z, inside = voxel_pixels(coords, intrinsic, geometry, tuple(depth.shape), depth.device)
    gap = z - depth[vi, ui].double()
    return torch.where(inside, gap, torch.full_like(gap, float("inf")))


def keep_fusion_inputs(module: Any, store: dict[str, dict[str, Any]], iso: float = 0.75) -> None:
    """Make ``module``'s evaluation keep every frame's fusion inputs (2D class logits, level-256 mask logits and
    coordinates, dense TDF, the 2D mask logits at those voxels' pixels and their depth gap, :func:`depth_gap_at`,
    and their gap to the predicted surface (``|tdf| < iso``) seen through their pixel,
    :func:`nvp3d.model.mask_prior.surface_depth_gap`) on the CPU in ``store[key]``, for :func:`refuse` (which
    derives the banded prior, :func:`prior_in_band`)."""
    from nvp3d.model.mask_prior import mask_prior_at, surface_depth_gap, voxel_pixels

    fuse, eval_step = module.fuse, module._eval_step
    current: dict[str, Any] = {}

    def eval_step_keeping_keys(batch: dict[str, Any], mode: str) -> None:
        current["keys"] = [m["key"] for m in batch["meta"]]
        current["intrinsic"] = batch["intrinsic_reduced"]
        eval_step(batch, mode)

    def fuse_keeping_inputs(out: dict[str, Any]) -> Any:
        fused = fuse(out)
        pan, plane = out["panoptic_256"], out["plane"]
        for b, f in enumerate(fused):
            rows = (pan.coords[:, 0] == b).nonzero().flatten()
            coords = pan.coords[rows, 1:]
            kept = {"class_logits": plane.class_logits[b].detach().float().cpu(),
                    "mask_logits": pan.feats[rows].detach().float().cpu(), "coords": coords.cpu(), "tdf": f.tdf.cpu()}
            k = current["intrinsic"][b:b + 1].to(plane.mask_logits.device)
            geometry, logits_2d = module.model.geometry, plane.mask_logits[b:b + 1].float()
            kept["prior_any"] = mask_prior_at(coords.double(), torch.zeros_like(rows), logits_2d, k, geometry
                                              ).float().cpu()
            # float64, as the network compares it with the band (prior_in_band derives the prior from it)
            kept["depth_gap"] = depth_gap_at(coords, k[0], geometry, plane.depth[b].float()).cpu()
            c = coords.to(f.tdf.device).long()
            occupied = f.tdf[c[:, 0], c[:, 1], c[:, 2]].abs() < iso
            kept["surface_gap"] = surface_depth_gap(coords, occupied, k[0], geometry,
                                                    tuple(plane.depth[b].shape)).cpu()
            kept["band_m"] = float(geometry.truncation * geometry.voxel_size)
            kept["plane_hw"] = tuple(plane.depth[b].shape)
            ui, vi, _, inside = voxel_pixels(coords, k[0], geometry, tuple(plane.depth[b].shape), coords.device)
            kept["pixels"] = (ui.cpu(), vi.cpu(), inside.cpu())
            pan2d, segments = plane.panoptic_2d[b]
            kept["thing_queries_2d"] = thing_queries_of_2d(kept["class_logits"], plane.mask_logits[b].float().cpu(),
                                                           pan2d.cpu(), segments, float(module.model.object_mask_threshold))
            store[current["keys"][b]] = kept
        return fused

    module._eval_step = eval_step_keeping_keys
    module.fuse = fuse_keeping_inputs


def depth_errors(model: Any, samples: list[dict[str, Any]], voxel_size: float) -> dict[str, float]:
    """Error of the 2D network's plane depth (metres) against each sample's ``depth_reduced`` over its valid
    (> 0) pixels, pooled over ``samples``."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    errors, scaled, log_scales = [], [], []
    with torch.no_grad():
        for s in samples:
            image = s["image"][None].to(device)
            plane = model.plane(model.infer_2d(image), image.shape[-2:])
            pred = plane.depth[0].float().cpu()
            gt = s["depth_reduced"].float()
            if gt.shape != pred.shape:
                gt = F.interpolate(gt[None, None], size=pred.shape, mode="nearest")[0, 0]
            scale = image_scale(pred, gt)
            errors.append((pred - gt)[gt > 0])
            scaled.append((pred * scale - gt)[gt > 0])
            log_scales.append(float(scale.log().abs()))
    e = torch.cat(errors) if errors else torch.zeros(0)
    if e.numel() == 0:
        return {}
    a, a_scaled = e.abs(), torch.cat(scaled).abs()
    return {"pixels": int(e.numel()), "mean_m": float(e.mean()), "median_abs_m": float(a.median()),
            "median_abs_voxels": float(a.median()) / voxel_size, "within_1_voxel": float((a < voxel_size).float().mean()),
            "within_half_voxel": float((a < voxel_size / 2).float().mean()),
            # after one factor per image (image_scale): what is left is the depth's shape, not its scale
            "median_abs_scaled_m": float(a_scaled.median()),
            "within_1_voxel_scaled": float((a_scaled < voxel_size).float().mean()),
            "median_abs_log_scale": float(np.median(log_scales))}


def lifting_reach(model: Any, samples: list[dict[str, Any]], bands: tuple[int, ...] = (3, 5, 8)
                  ) -> dict[str, dict[str, float]]:
    """Share of the GT surface voxels (``|TDF| < 1`` in the frustum) that the lifting reaches, pooled over
    ``samples``, and the lifted voxels per frame: the model's own lifting (projective + occupancy-aware), the
    projective lifting alone at ``bands`` voxels around the predicted depth, and at the model's band around the GT
    depth. A surface voxel that no lifted voxel reaches gets its features only through the 3D network's
    completion; a wider band reaches more of it, but measures its distance channels from the predicted depth."""
    import torch.nn.functional as F
    from frustum3d.lifting import lift_depth

    device = next(model.parameters()).device
    own = model.lifting_band if model.lifting_band is not None else int(model.geometry.truncation)
    rows: dict[str, list[float]] = {}

    def add(name: str, coords: torch.Tensor, surface: torch.Tensor) -> None:
        hit = torch.zeros_like(surface)
        c = coords[:, 1:].cpu()
        hit[c[:, 0], c[:, 1], c[:, 2]] = True
        r = rows.setdefault(name, [0.0, 0.0, 0.0])
        r[0] += float(surface.sum())
        r[1] += float((surface & hit).sum())
        r[2] += float(hit.sum())

    with torch.no_grad():
        for s in samples:
            image = s["image"][None].to(device)
            k = s["intrinsic_reduced"][None].to(device)
            frustum = s["frustum_mask"].bool()
            surface = (s["geometry"].abs() < 1.0) & frustum
            plane = model.plane(model.infer_2d(image), image.shape[-2:])
            lifted, _ = model.lift(plane, k, frustum[None].to(device))
            add(f"model: projective +-{own} + occupancy-aware", lifted.coords[lifted.feats.abs().sum(1) > 0], surface)
            add("model, with the zero-feature shell", lifted.coords, surface)
            feats = [plane.mask_features, plane.depth_features]
            for band in bands:
                lp = lift_depth(plane.depth, k, feats, plane.semantic, geometry=model.geometry, truncation=band)
                add(f"projective +-{band}", lp.coords, surface)
            gt = s["depth_reduced"][None].float().to(device)
            if gt.shape[-2:] != plane.depth.shape[-2:]:
                gt = F.interpolate(gt[:, None], size=plane.depth.shape[-2:], mode="nearest")[:, 0]
            lp = lift_depth(gt, k, feats, plane.semantic, geometry=model.geometry, truncation=own)
            add(f"projective +-{own} at the GT depth", lp.coords, surface)
    n = max(1, len(samples))
    return {name: {"surface_reached": r[1] / max(1.0, r[0]), "lifted_per_frame": r[2] / n}
            for name, r in rows.items()}


def training_samples(spec: Any, n: int) -> list[dict[str, Any]]:
    """The first ``n`` training frames, read as the test split reads frames (no augmentation)."""
    from nvp3d.data.datamodule import NVP3DDataModule

    s = spec.model_copy(deep=True)
    s.dataset.test.json_path = spec.dataset.train.json_path
    s.dataset.test.base_dir = spec.dataset.train.base_dir
    dm = NVP3DDataModule(s, splits=("test",))
    dm.setup("test")
    ds = dm.datasets["test"]
    return [ds[i] for i in range(min(n, len(ds)))]


def image_scales(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """``[B]`` :func:`nvp3d.evaluation.depth2d.image_scale` of each image of ``pred`` and ``gt`` ``[B, h, w]``: the
    one factor per image that best aligns the predicted depth with the GT (a scale error the whole image shares,
    such as a room's size misjudged)."""
    return torch.stack([image_scale(p, g) for p, g in zip(pred, gt)])


def use_gt_depth(module: Any, scale_only: bool = False) -> None:
    """Make ``module`` (the 3D LightningModule) lift at each batch's GT plane depth (``depth_reduced``) wherever
    that is valid (> 0), keeping the 2D network's depth elsewhere: the depth-oracle evaluation. ``scale_only``:
    lift at the 2D network's depth times one factor per image (:func:`image_scales`): how much of the depth
    oracle's gain a per-image scale alone would give."""
    import dataclasses

    import torch.nn.functional as F

    model, current = module.model, {}
    plane, forward = model.plane, module.forward

    def forward_keeping_depth(batch: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        current["depth"] = batch["depth_reduced"]
        return forward(batch, *args, **kwargs)

    def plane_at_gt_depth(out2d: Any, image_hw: Any) -> Any:
        p = plane(out2d, image_hw)
        gt = current["depth"].to(p.depth)
        if gt.shape[-2:] != p.depth.shape[-2:]:
            gt = F.interpolate(gt[:, None], size=p.depth.shape[-2:], mode="nearest")[:, 0]
        if scale_only:
            return dataclasses.replace(p, depth=p.depth * image_scales(p.depth, gt)[:, None, None])
        return dataclasses.replace(p, depth=torch.where(gt > 0, gt, p.depth))

    module.forward = forward_keeping_depth
    model.plane = plane_at_gt_depth


def without_thing_fp(stats: Any, stuff_ids: tuple[int, ...]) -> torch.Tensor:
    """A frame's PRQ statistics (``frustum3d.metrics.STATS_COLUMNS`` per class) with no false-positive thing
    segment: the score of a fusion that dropped exactly the predicted things that match no GT thing (an oracle of a
    perfect thing filter; a dropped segment's voxels belong to no other segment, so nothing else changes)."""
    from frustum3d.metrics import STATS_COLUMNS

    out = torch.as_tensor(stats, dtype=torch.float64).clone()
    stuff = {int(c) for c in stuff_ids}
    things = [c for c in range(out.shape[0]) if c not in stuff]
    out[things, STATS_COLUMNS.index("fp")] = 0
    return out


def _kpi(stats: torch.Tensor, classes: dict[int, tuple[str, bool]], stuff: tuple[int, ...]) -> dict[str, float]:
    from nvp3d.evaluation.prq3d import PRQAccumulator

    acc = PRQAccumulator(classes, stuff)
    acc.add(stats)
    kpi = acc.compute(acc.stats)["kpi"]
    return {k: float(kpi[k]) for k in ("PRQ", "PRQ_th", "PRQ_st", "RSQ", "RRQ") if k in kpi}


def run_spec_3d(folder: Path, demo: bool) -> Any:
    """The 3D spec of a finished run: a bench run's ``bench_learning.json`` or a demo's ``spec_3d.yaml``."""
    from nvp3d.config import load_spec, validate_spec
    from nvp3d.demo.run3d import SPEC_3D_NAME

    if demo:
        path = folder / SPEC_3D_NAME
        if not path.is_file():
            raise SystemExit(f"diagnose_3d: {path} is missing: --demo needs a demo run by nvp3d-cli 0.3.30 or later "
                             "(run nvp3d demo again)")
        return load_spec(path)
    path = folder / "bench_learning.json"
    if not path.is_file():
        raise SystemExit(f"diagnose_3d: {path} is missing: --bench needs a finished tools/bench_learning.py --out folder")
    return validate_spec(json.loads(path.read_text())["stages"]["3d"]["spec"], source="bench 3D spec")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--bench", help="a tools/bench_learning.py --out folder")
    source.add_argument("--demo", help="a finished nvp3d demo --out folder (nvp3d-cli 0.3.30 or later: its spec_3d.yaml)")
    ap.add_argument("--checkpoint", default="", help="default: the run's latest 3D checkpoint")
    ap.add_argument("--iso", type=float, default=None, help="default: the spec's model.frustum3d.iso_recon_value")
    ap.add_argument("--labels-2d-bands", type=float, default=1.0, help="also evaluate the checkpoint with "
                    "model.frustum3d.labels_2d_bands set to this (0: skip)")
    ap.add_argument("--depth-train-frames", type=int, default=40, help="also measure the plane depth error on this "
                    "many training frames (0: skip): close to the held-out error means the depth underfits, far "
                    "below it that it does not generalise")
    ap.add_argument("--no-depth-oracle", action="store_true", help="skip the GT-depth lifting evaluation (saves one "
                    "evaluation pass)")
    args = ap.parse_args(argv)

    from frustum3d.metrics import frame_statistics
    from nvp3d.data.datamodule import NVP3DDataModule
    from nvp3d.evaluation.evaluate import evaluate
    from nvp3d.evaluation.thing_outcomes import OUTCOME_KEYS, format_outcomes, outcomes_dict, thing_outcomes
    from nvp3d.training.checkpointing import latest_file

    bench = Path(args.bench or args.demo).resolve()
    spec = run_spec_3d(bench, demo=bool(args.demo))
    if spec.model.frustum3d.things_of_2d:
        # the model would prune the thing queries before the raw outputs are kept, and the sweep would re-fuse the
        # pruned logits; evaluated without it, "plain" fuses every query and the sweep's "things of the 2D result"
        # row is the run's own fusion
        spec.model.frustum3d.things_of_2d = False
        print("diagnose_3d: the run's spec has model.frustum3d.things_of_2d on; 'plain' is evaluated without it, the "
              "row 'things of the 2D result' is the run's own fusion", flush=True)
    spec.evaluate.checkpoint = args.checkpoint or str(bench / "train3d" / latest_file("3d"))
    spec.train.num_gpus = spec.evaluate.num_gpus = 1 if torch.cuda.is_available() else 0
    iso = float(spec.model.frustum3d.iso_recon_value if args.iso is None else args.iso)
    spec.model.frustum3d.iso_recon_value = iso
    holder: dict[str, Any] = {}

    raw: dict[str, dict[str, Any]] = {}
    prior_trained = bool(spec.model.frustum3d.mask_prior_2d)  # then the sweep has no prior rows to add

    def hook(module: Any) -> None:
        module.keep_predictions = True
        keep_fusion_inputs(module, raw, iso)
        holder["module"] = module

    evaluate(spec, bench / "diagnose3d_eval", None, say=lambda *_: None, module_hook=hook)
    module = holder["module"]

    def oracle_hook(m: Any) -> None:
        m.keep_predictions = True
        use_gt_depth(m)
        holder["oracle"] = m

    def scale_hook(m: Any) -> None:
        m.keep_predictions = True
        use_gt_depth(m, scale_only=True)
        holder["scale_oracle"] = m

    if not args.no_depth_oracle:
        evaluate(spec, bench / "diagnose3d_eval_gt_depth", None, say=lambda *_: None, module_hook=oracle_hook)
        evaluate(spec, bench / "diagnose3d_eval_gt_scale", None, say=lambda *_: None, module_hook=scale_hook)

    def labels_hook(m: Any) -> None:
        m.keep_predictions = True
        m.model.labels_2d_bands = float(args.labels_2d_bands)
        holder["labels_2d"] = m

    if args.labels_2d_bands > 0 and not spec.model.frustum3d.labels_2d_bands:
        evaluate(spec, bench / "diagnose3d_eval_labels_2d", None, say=lambda *_: None, module_hook=labels_hook)
    dm = NVP3DDataModule(spec, splits=("test",))
    dm.setup("test")
    ds = dm.datasets["test"]
    by_key = {}
    for i in range(len(ds)):
        s = ds[i]
        by_key[s["meta"]["key"]] = s
    trunc = float(module.model.geometry.truncation)
    f = int(spec.dataset.downsample_factor)
    nc = module.metrics["test"].num_classes
    rows = {"plain": [], "no_spurious_things": [], "geometry_oracle": [], "label_oracle": [],
            "gt_depth_lifting": [p["stats"] for p in holder["oracle"].predictions] if "oracle" in holder else [],
            "gt_scale_lifting": ([p["stats"] for p in holder["scale_oracle"].predictions]
                                 if "scale_oracle" in holder else []),
            "labels_2d_bands": [p["stats"] for p in holder["labels_2d"].predictions] if "labels_2d" in holder else [],
            **{f"gt_2d_things_{d:g}m": [] for d in GT_2D_DEPTHS}}
    surf = []
    outcomes = {"all": torch.zeros(len(OUTCOME_KEYS), dtype=torch.float64)}
    outcomes["2d_targets"] = outcomes["all"].clone()
    classes, stuff = module.classes, module.stuff_ids
    omt = float(module.model.object_mask_threshold)
    variants = fusion_variants(omt, prior_trained)
    sweep: dict[str, list[Any]] = {name: [] for name in variants}
    sweep_things = {name: torch.zeros(len(OUTCOME_KEYS), dtype=torch.float64) for name in variants}
    for p in module.predictions:
        s = by_key[p["key"]]
        fused = p["fused"]
        frustum = s["frustum_mask"].bool()
        gt_tdf = s["geometry"].abs().float()
        pred_tdf = fused.tdf.cpu().float()
        fr = frustum.numpy()
        ps = (pred_tdf.abs() < iso).numpy() & fr
        gs = (gt_tdf < iso).numpy() & fr
        inter = (ps & gs).sum()
        near_g = binary_dilation(gs, np.ones((3, 3, 3), bool))
        near_p = binary_dilation(ps, np.ones((3, 3, 3), bool))
        surf.append({"pred": int(ps.sum()), "gt": int(gs.sum()), "iou": inter / max(1, (ps | gs).sum()),
                     "precision": inter / max(1, ps.sum()), "recall": inter / max(1, gs.sum()),
                     "precision_1vox": (ps & near_g).sum() / max(1, ps.sum()),
                     "recall_1vox": (gs & near_p).sum() / max(1, gs.sum())})
        thing_ids_2d = {int(i) for i, t in zip(s["instance_ids"].tolist(), s["is_thing"].tolist()) if t}
        stuff_2d = {int(c) for c, t in zip(s["labels"].tolist(), s["is_thing"].tolist()) if not t}
        seen = [(int(i) in thing_ids_2d) if t else (int(c) in stuff_2d) for i, c, t in
                zip(s["eval_instance_ids"].tolist(), s["eval_labels"].tolist(), s["eval_is_thing"].tolist())]
        things = [v for v, t in zip(seen, s["eval_is_thing"].tolist()) if t]
        surf[-1].update(gt_segments=len(seen), gt_segments_in_2d=sum(seen), gt_things=len(things),
                        gt_things_in_2d=sum(things))
        kw = dict(num_classes=nc, iso_value=iso, truncation=trunc, downsample_factor=f)
        rows["plain"].append(p["stats"])
        rows["no_spurious_things"].append(without_thing_fp(p["stats"], stuff))
        _, details = frame_statistics(s["eval_masks"], s["eval_labels"], fused.panoptic, fused.mapping,
                                      fused.tdf, frustum, **kw)
        outcomes["all"] += thing_outcomes(details, stuff)
        outcomes["2d_targets"] += thing_outcomes(details, stuff, gt_mask=seen)
        if p["key"] in raw:
            if f == 1:  # the evaluated GT segments are at the grid's own resolution
                raw[p["key"]]["gt_class"] = gt_class_at(raw[p["key"]]["coords"], s["eval_masks"], s["eval_labels"])
            for d in GT_2D_DEPTHS:
                pan, mapping = gt_2d_things_through(raw[p["key"]], s, fused.panoptic.cpu(), fused.mapping, d)
                st, _ = frame_statistics(s["eval_masks"], s["eval_labels"], pan, mapping, fused.tdf.cpu(), frustum,
                                         **kw)
                rows[f"gt_2d_things_{d:g}m"].append(st)
            for name, kwargs in variants.items():
                vol = refuse(raw[p["key"]], stuff, **kwargs)
                st, det = frame_statistics(s["eval_masks"], s["eval_labels"], vol.panoptic, vol.mapping,
                                           raw[p["key"]]["tdf"], frustum, **kw)
                sweep[name].append(st)
                sweep_things[name] += thing_outcomes(det, stuff)
        if f == 1:
            pred_pan = fused.panoptic.cpu().numpy().astype(np.int32)
            pan = torch.from_numpy(_nearest_fill(pred_pan))
            st, _ = frame_statistics(s["eval_masks"], s["eval_labels"], pan, fused.mapping, gt_tdf, frustum, **kw)
            rows["geometry_oracle"].append(st)
            gt_pan, gt_mapping = gt_panoptic(s["eval_masks"], s["eval_labels"])
            st, _ = frame_statistics(s["eval_masks"], s["eval_labels"], torch.from_numpy(_nearest_fill(gt_pan)),
                                     gt_mapping, pred_tdf, frustum, **kw)
            rows["label_oracle"].append(st)
    report = {"checkpoint": spec.evaluate.checkpoint, "iso": iso, "frames": len(surf)}
    for name, st in rows.items():
        if st:
            report[name] = _kpi(torch.stack([torch.as_tensor(x) for x in st]).sum(0), classes, stuff)
    if surf:
        report["things"] = outcomes_dict(outcomes["all"])
        report["things_2d_targets"] = outcomes_dict(outcomes["2d_targets"])
    report["fusion_sweep"] = {name: {**_kpi(torch.stack([torch.as_tensor(x) for x in st]).sum(0), classes, stuff),
                                     "things": outcomes_dict(sweep_things[name])}
                              for name, st in sweep.items() if st}
    counts = ("gt_segments", "gt_segments_in_2d", "gt_things", "gt_things_in_2d")
    report["surface"] = {k: float(np.mean([r[k] for r in surf])) for k in surf[0] if k not in counts} if surf else {}
    # a 3D GT segment whose instance (stuff: class) is no 2D target cannot be found: it bounds RQ from above
    report["visibility"] = {k: int(sum(r[k] for r in surf)) for k in counts} if surf else {}
    report["depth"] = depth_errors(module.model.eval(), [by_key[p["key"]] for p in module.predictions],
                                   float(module.model.geometry.voxel_size))
    report["lifting"] = lifting_reach(module.model, [by_key[p["key"]] for p in module.predictions])
    if args.depth_train_frames > 0:
        report["depth_train"] = depth_errors(module.model, training_samples(spec, args.depth_train_frames),
                                             float(module.model.geometry.voxel_size))
    print(f"diagnose_3d: {report['frames']} frames, iso {iso}, checkpoint {Path(report['checkpoint']).name}")
    row_width = max([16] + [len(name) for name in rows if name in report])
    for name in rows:
        if name in report:
            k = report[name]
            print(f"  {name:{row_width}s} PRQ {k['PRQ']:5.1f}  things {k.get('PRQ_th', float('nan')):5.1f}  "
                  f"stuff {k.get('PRQ_st', float('nan')):5.1f}  RSQ {k['RSQ']:5.1f}  RRQ {k['RRQ']:5.1f}")
    sf = report["surface"]
    if sf:
        print("  surface          " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in sf.items()))
    v = report["visibility"]
    if v:
        print(f"  visibility       {v['gt_segments_in_2d']} of {v['gt_segments']} 3D GT segments are 2D targets "
              f"(things {v['gt_things_in_2d']} of {v['gt_things']}): the rest are occluded or too small in the image")
    if "things" in report:
        print(f"  {format_outcomes(report['things'])}")
        t2 = report["things_2d_targets"]
        print(f"  of the {t2['gt_things']} GT things that are 2D targets: matched {t2['matched']}, low IoU "
              f"{t2['same_class_low_iou']}, covered by stuff {t2['other_class_by_stuff']}, by another thing "
              f"{t2['other_class_by_thing']}, missed {t2['missed']}")
    width = max((len(name) for name in report["fusion_sweep"]), default=0)  # one column for every row name
    for name, k in report["fusion_sweep"].items():
        t = k["things"]
        print(f"  fusion {name:{width}s} PRQ {k['PRQ']:5.1f}  things {k.get('PRQ_th', float('nan')):5.1f}  "
              f"stuff {k.get('PRQ_st', float('nan')):5.1f}  GT things matched {t['matched']}, low IoU "
              f"{t['same_class_low_iou']}, by stuff {t['other_class_by_stuff']}, by thing {t['other_class_by_thing']}, "
              f"missed {t['missed']}; predicted things {t['pred_things']}")
    for key, frames in (("depth", "held-out"), ("depth_train", "training")):
        d = report.get(key)
        if d:
            print(f"  {key:16s} 2D plane depth vs GT over {d['pixels']} pixels of {frames} frames: mean "
                  f"{d['mean_m']:+.3f} m, median |e| {d['median_abs_m']:.3f} m ({d['median_abs_voxels']:.1f} voxels); "
                  f"within 1 voxel {d['within_1_voxel']:.2f}, within half a voxel {d['within_half_voxel']:.2f}; "
                  f"after one scale per image (median |log scale| {d['median_abs_log_scale']:.3f}): median |e| "
                  f"{d['median_abs_scaled_m']:.3f} m, within 1 voxel {d['within_1_voxel_scaled']:.2f}")
    for name, r in report["lifting"].items():
        print(f"  lifting {name:44s} reaches {r['surface_reached']:.3f} of the GT surface voxels, "
              f"{r['lifted_per_frame']:.0f} lifted voxels per frame")
    (bench / "diagnose_3d.json").write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
