"""PRQ / RSQ / RRQ of reconstructed frames: a thin adaptor on :mod:`frustum3d.metrics` (the one definition).

Per frame, :func:`frustum3d.metrics.frame_statistics` scores the fused panoptic volume and predicted TDF
(``model.frustum3d.iso_recon_value``) against the data loader's evaluation segments (``eval_masks`` /
``eval_labels`` of ``datasets3d`` with ``eval_targets``, built by the same module with ``dataset.iso_value``)
at ``grid / downsample_factor`` (3D-FRONT: 256^3, factor 1, iso 1; Matterport-style: 128^3 from 256^3,
factor 2, iso 2). :class:`PRQAccumulator` sums the per-class ``[iou, tp, fp, fn, n]`` rows over frames (and
processes) and formats the KPIs (x100), the thing/stuff split and the per-class rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from frustum3d.metrics import STATS_COLUMNS, PanopticReconstructionQuality, frame_statistics, mask_iou

from nvp3d.evaluation.thing_outcomes import OUTCOME_KEYS

__all__ = ["KPI_KEYS", "PRQAccumulator", "format_table_3d", "mask_iou", "sample_stats"]

#: One frame's per-class ``[num_classes, 5]`` statistics and its details: ``frustum3d.metrics.frame_statistics``
#: (the one PRQ definition), under the name the 3D LightningModule uses.
sample_stats = frame_statistics

KPI_KEYS = ("PRQ", "RSQ", "RRQ", "PRQ_th", "RSQ_th", "RRQ_th", "PRQ_st", "RSQ_st", "RRQ_st")


class PRQAccumulator:
    """Sums per-frame statistics; :meth:`compute` gives PRQ/RSQ/RRQ (x100), thing/stuff split, per-class rows.
    Beside them it sums the frames' thing outcomes (:mod:`nvp3d.evaluation.thing_outcomes`) in ``outcomes``.

    Args:
        classes: class id -> (name, isthing) for ids 1..K-1 (0 = free space).
        stuff_ids: stuff classes (one GT segment per class and frame).
    """

    def __init__(self, classes: Mapping[int, tuple[str, bool]], stuff_ids: Sequence[int]) -> None:
        self.classes = {int(k): (str(v[0]), bool(v[1])) for k, v in classes.items() if int(k) > 0}
        self.stuff_ids = tuple(int(s) for s in stuff_ids)
        self.num_classes = max(self.classes) + 1
        self.stats = torch.zeros(self.num_classes, len(STATS_COLUMNS), dtype=torch.float64)
        self.outcomes = torch.zeros(len(OUTCOME_KEYS), dtype=torch.float64)
        self.frames = 0

    def reset(self) -> None:
        self.stats.zero_()
        self.outcomes.zero_()
        self.frames = 0

    def add(self, stats: torch.Tensor, outcomes: torch.Tensor | None = None) -> None:
        """One frame's ``[num_classes, 5]`` statistics and, optionally, its thing outcome counts."""
        self.stats += stats.to(self.stats)
        if outcomes is not None:
            self.outcomes += outcomes.to(self.outcomes)
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
