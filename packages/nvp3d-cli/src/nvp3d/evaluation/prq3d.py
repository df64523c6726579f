"""PRQ / RSQ / RRQ of reconstructed frames against the dataset's evaluation segments.

The ground truth comes from the data loader (``eval_masks``/``eval_labels`` of ``datasets3d`` with
``eval_targets``: every GT segment's thickened near-surface mask at ``grid / downsample_factor``, ANDed with
the frustum, built with ``dataset.iso_value``). The prediction's evaluated masks are built by
:func:`frustum3d.metrics.segment_masks` from the fused panoptic volume and the predicted TDF with
``model.frustum3d.iso_recon_value`` and the same ``downsample_factor`` (3D-FRONT: 256^3, factor 1, iso 1;
Matterport-style: 128^3 from a 256^3 grid, factor 2, iso 2). Matching and reduction are the benchmark's
(:func:`frustum3d.metrics.match_segments`: first same-class prediction with IoU > 0.25, in order; per class
``[iou, tp, fp, fn, n]``), so per-frame statistics can be summed over frames and processes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from frustum3d.metrics import (
    STATS_COLUMNS,
    PanopticReconstructionQuality,
    match_segments,
    prediction_segments,
    segment_masks,
)

__all__ = ["KPI_KEYS", "PRQAccumulator", "format_table_3d", "mask_iou", "sample_stats"]

KPI_KEYS = ("PRQ", "RSQ", "RRQ", "PRQ_th", "RSQ_th", "RRQ_th", "PRQ_st", "RSQ_st", "RRQ_st")


def mask_iou(gt: torch.Tensor, pred: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """float64 ``[G, P]`` IoU of bool masks ``gt [G, ...]`` and ``pred [P, ...]`` (same spatial shape).

    Only voxels covered by some mask are visited, in chunks, so 256^3 volumes stay cheap.
    """
    g = gt.reshape(gt.shape[0], math.prod(gt.shape[1:]))
    p = pred.reshape(pred.shape[0], math.prod(pred.shape[1:])).to(g.device)
    if g.shape[1] != p.shape[1]:
        raise ValueError(f"mask_iou: GT masks have {g.shape[1]} voxels, predictions {p.shape[1]}")
    ng, npred = g.shape[0], p.shape[0]
    inter = torch.zeros(ng, npred, dtype=torch.float64, device=g.device)
    if ng == 0 or npred == 0:
        return inter
    active = (g.any(0) | p.any(0)).nonzero().flatten()
    for start in range(0, active.numel(), chunk):
        idx = active[start:start + chunk]
        inter += (g[:, idx].double() @ p[:, idx].double().T)
    gs, ps = g.sum(1).double(), p.sum(1).double()
    union = gs[:, None] + ps[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def sample_stats(gt_masks: torch.Tensor, gt_labels: torch.Tensor, pred_panoptic: torch.Tensor,
                 pred_mapping: Mapping[int, int], pred_tdf: torch.Tensor, frustum: torch.Tensor | None, *,
                 num_classes: int, iso_value: float, truncation: float = 3.0, downsample_factor: int = 1,
                 matching_threshold: float = 0.25) -> tuple[torch.Tensor, dict[str, Any]]:
    """Per-class ``[num_classes, 5]`` statistics of one frame and the details (IoU matrix, matches).

    ``frustum`` is the full-resolution frustum mask (subsampled here for ``downsample_factor`` > 1).
    """
    segs = prediction_segments(pred_panoptic.cpu(), dict(pred_mapping))
    pred_masks = segment_masks(segs, pred_tdf.cpu(), None if frustum is None else frustum.cpu(),
                               iso_value=iso_value, truncation=truncation, downsample_factor=downsample_factor)
    gt_masks = gt_masks.cpu().bool()
    if gt_masks.shape[1:] != pred_masks.shape[1:]:
        raise ValueError(f"GT evaluation masks are {tuple(gt_masks.shape[1:])} but predictions evaluate at "
                         f"{tuple(pred_masks.shape[1:])}: dataset.downsample_factor must match the evaluation")
    iou = mask_iou(gt_masks, pred_masks)
    gl = [int(c) for c in gt_labels.tolist()]
    pl = [int(c) for c in segs.labels.tolist()]
    matches = match_segments(iou, torch.tensor(gl, dtype=torch.long), segs.labels, matching_threshold)
    stats = torch.zeros(num_classes, len(STATS_COLUMNS), dtype=torch.float64)
    for name, labels in (("GT", gl), ("predicted", pl)):
        bad = [c for c in labels if not 0 < c < num_classes]
        if bad:
            raise ValueError(f"{name} segment classes {bad} are outside 1..{num_classes - 1}")
    for g, p in matches:
        stats[gl[g], 0] += float(iou[g, p])
        stats[gl[g], 1] += 1
    mg, mp = {g for g, _ in matches}, {p for _, p in matches}
    for g, c in enumerate(gl):
        stats[c, 4] += 1
        if g not in mg:
            stats[c, 3] += 1
    for p, c in enumerate(pl):
        if p not in mp:
            stats[c, 2] += 1
    return stats, {"iou": iou, "matches": matches, "pred_labels": pl, "gt_labels": gl}


class PRQAccumulator:
    """Sums per-frame statistics; :meth:`compute` gives PRQ/RSQ/RRQ (x100), thing/stuff split, per-class rows.

    Args:
        classes: class id -> (name, isthing) for ids 1..K-1 (0 = free space).
        stuff_ids: stuff classes (one GT segment per class and frame).
    """

    def __init__(self, classes: Mapping[int, tuple[str, bool]], stuff_ids: Sequence[int]) -> None:
        self.classes = {int(k): (str(v[0]), bool(v[1])) for k, v in classes.items() if int(k) > 0}
        self.stuff_ids = tuple(int(s) for s in stuff_ids)
        self.num_classes = max(self.classes) + 1
        self.stats = torch.zeros(self.num_classes, len(STATS_COLUMNS), dtype=torch.float64)
        self.frames = 0

    def reset(self) -> None:
        self.stats.zero_()
        self.frames = 0

    def add(self, stats: torch.Tensor) -> None:
        self.stats += stats.to(self.stats)
        self.frames += 1

    def compute(self, stats: torch.Tensor | None = None) -> dict[str, Any]:
        """``{"kpi": {PRQ, RSQ, RRQ, PRQ_th, ..., in percent}, "per_class": [rows], "summary": {...}}``."""
        metric = PanopticReconstructionQuality(self.classes, self.stuff_ids)
        metric.load_stats(self.stats if stats is None else stats)
        res = metric.compute()
        kpi = {}
        for key in KPI_KEYS:
            v = float(res[key])
            kpi[key] = 100.0 * v if math.isfinite(v) else 0.0 if key in ("PRQ", "RSQ", "RRQ") else math.nan
        rows = []
        for cid, r in res["per_class"].items():
            rows.append({"class_id": int(cid), "name": r["name"], "isthing": r["isthing"], "counted": r["counted"],
                         "PRQ": 100.0 * r["PRQ"], "RSQ": 100.0 * r["RSQ"], "RRQ": 100.0 * r["RRQ"],
                         "iou": r["iou"], "TP": r["tp"], "FP": r["fp"], "FN": r["fn"], "N": r["n"]})
        summary = {"num_classes_counted": res["num_classes_counted"], "num_things_counted": res["num_things_counted"],
                   "num_stuff_counted": res["num_stuff_counted"]}
        return {"kpi": kpi, "per_class": rows, "summary": summary}


def format_table_3d(rows: list[dict[str, Any]]) -> str:
    """Plain-text per-class PRQ table (counted classes)."""
    lines = [f"{'class':<12} {'PRQ':>6} {'RSQ':>6} {'RRQ':>6} {'TP':>4} {'FP':>4} {'FN':>4} {'N':>4}"]
    for r in rows:
        if r["counted"]:
            lines.append(f"{r['name'][:12]:<12} {r['PRQ']:6.1f} {r['RSQ']:6.1f} {r['RRQ']:6.1f} {r['TP']:4d} "
                         f"{r['FP']:4d} {r['FN']:4d} {r['N']:4d}")
    return "\n".join(lines)
