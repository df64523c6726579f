"""Where the ground-truth things of an evaluation end up, and what the unmatched predicted things are.

PRQ (3D) and PQ (2D) say how many things were matched; when few are, the next question is why. For every GT
thing of a frame (from per-frame details: the IoU of every GT/predicted segment pair, the matches and the
labels; 3D from :func:`frustum3d.metrics.frame_statistics`, 2D from :func:`details_2d`) one outcome is counted:

* ``matched``: the metric's match (same class, IoU > 0.25 for PRQ, > 0.5 for PQ);
* ``same_class_low_iou``: a predicted segment of its class overlaps it, but too little (shape or position);
* ``other_class_by_stuff`` / ``other_class_by_thing``: only segments of other classes overlap it; the one that
  overlaps most is a stuff segment (a wall or floor mask took its voxels) or another thing (wrong class or merged);
* ``missed``: no predicted segment touches it (no surface there, or no query kept).

Every unmatched predicted thing segment is a ``duplicate`` (it overlaps a *matched* GT thing of its class: a second
piece of a found object), a ``low_iou`` piece (it overlaps an unmatched GT thing of its class) or ``spurious``.
The counts are a float64 vector (:data:`OUTCOME_KEYS`) so that frames and processes sum them like PRQ's statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["OUTCOME_KEYS", "details_2d", "format_outcomes", "outcomes_dict", "thing_outcomes"]

#: the GT-thing outcomes (each GT thing counts in exactly one of them)
GT_OUTCOMES = ("matched", "same_class_low_iou", "other_class_by_stuff", "other_class_by_thing", "missed")
#: the columns of a :func:`thing_outcomes` vector
OUTCOME_KEYS = (*GT_OUTCOMES, "pred_things", "duplicate", "low_iou", "spurious", "matched_iou_sum")

#: a predicted thing overlapping a GT thing of its class above this IoU is a piece of it (else spurious)
PIECE_IOU = 0.1


def thing_outcomes(details: Mapping[str, Any], stuff_ids: Iterable[int], gt_mask: Iterable[bool] | None = None
                   ) -> torch.Tensor:
    """The outcome counts (:data:`OUTCOME_KEYS`) of one frame. ``details``: ``iou`` [G, P], ``matches``
    [(g, p)], ``gt_labels`` [G], ``pred_labels`` [P]; a label in ``stuff_ids`` is stuff, any other a thing.
    ``gt_mask`` (one bool per GT segment) restricts the GT side to some things (e.g. those visible in 2D); the
    predicted side always counts every predicted thing."""
    iou = torch.as_tensor(details["iou"], dtype=torch.float64).tolist()  # [G][P] floats: no tensor per lookup
    gl = [int(c) for c in details["gt_labels"]]
    pl = [int(c) for c in details["pred_labels"]]
    stuff = {int(c) for c in stuff_ids}
    use = [True] * len(gl) if gt_mask is None else [bool(m) for m in gt_mask]
    if len(use) != len(gl):
        raise ValueError(f"gt_mask has {len(use)} entries for {len(gl)} GT segments")
    matched = {int(g): int(p) for g, p in details["matches"]}
    out = dict.fromkeys(OUTCOME_KEYS, 0.0)
    for g, label in enumerate(gl):
        if label in stuff or not use[g]:
            continue
        if g in matched:
            out["matched"] += 1
            out["matched_iou_sum"] += iou[g][matched[g]]
            continue
        touching = [p for p in range(len(pl)) if iou[g][p] > 0]
        if any(pl[p] == label for p in touching):
            out["same_class_low_iou"] += 1
        elif touching:
            top = max(touching, key=lambda p: iou[g][p])
            out["other_class_by_stuff" if pl[top] in stuff else "other_class_by_thing"] += 1
        else:
            out["missed"] += 1
    found = set(matched.values())
    for p, label in enumerate(pl):
        if label in stuff:
            continue
        out["pred_things"] += 1
        if p in found:
            continue
        pieces = [g for g in range(len(gl)) if gl[g] == label and iou[g][p] > PIECE_IOU]
        out["duplicate" if any(g in matched for g in pieces) else "low_iou" if pieces else "spurious"] += 1
    return torch.tensor([out[k] for k in OUTCOME_KEYS], dtype=torch.float64)


def details_2d(matching: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """:func:`thing_outcomes`' details from a 2D image's :func:`maskformer_head.image_segment_matching`."""
    match = matching["match"]
    return {"iou": matching["iou"], "gt_labels": matching["gt_labels"].tolist(),
            "pred_labels": matching["pred_labels"].tolist(), "matches": torch.nonzero(match).tolist()}


def outcomes_dict(counts: torch.Tensor) -> dict[str, Any]:
    """A summed outcome vector as ``{key: int}`` plus ``gt_things`` and ``matched_mean_iou`` (None when no
    thing was matched)."""
    values = dict(zip(OUTCOME_KEYS, counts.double().tolist(), strict=True))
    iou_sum = values.pop("matched_iou_sum")
    out: dict[str, Any] = {k: int(round(v)) for k, v in values.items()}
    out["gt_things"] = sum(out[k] for k in GT_OUTCOMES)
    out["matched_mean_iou"] = iou_sum / out["matched"] if out["matched"] else None
    return out


def format_outcomes(d: Mapping[str, Any], match_iou: float = 0.25) -> str:
    """One line for the console: where the GT things went and what the unmatched predicted things are
    (``match_iou``: the metric's matching threshold, 0.25 for PRQ, 0.5 for PQ)."""
    iou = "" if d.get("matched_mean_iou") is None else f" (mean IoU {d['matched_mean_iou']:.2f})"
    return (f"things: {d['gt_things']} GT -> matched {d['matched']}{iou}, found at IoU <= {match_iou:g} "
            f"{d['same_class_low_iou']}, covered by stuff {d['other_class_by_stuff']}, by another thing "
            f"{d['other_class_by_thing']}, missed {d['missed']}; {d['pred_things']} predicted thing segments, "
            f"unmatched: {d['duplicate']} duplicates, {d['low_iou']} low-IoU pieces, {d['spurious']} spurious")
