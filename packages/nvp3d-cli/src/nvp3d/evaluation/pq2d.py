"""2D panoptic quality of the 2D stage: toolkit-named KPIs, per-class tables, panoptic maps -> label maps.

The metric itself is :class:`maskformer_head.DepthAwarePanopticQuality` (PQ and depth-aware PQ at the
thresholds -1 (plain PQ), 0.5, 0.25 and 0.1); this module names and formats its results.
"""

from __future__ import annotations

from typing import Any

import torch
from maskformer_head import DepthAwarePanopticQuality
from maskformer_head.metrics import pq_from_stats

__all__ = ["DPQ_THRESHOLDS", "format_table", "kpis_from_metric", "panoptic_to_maps", "per_class_table"]

DPQ_THRESHOLDS = (-1.0, 0.5, 0.25, 0.1)


def panoptic_to_maps(panoptic: torch.Tensor, segments: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(semantic, instance) maps from a panoptic map + segments_info (void/unassigned = class 0)."""
    sem = torch.zeros_like(panoptic, dtype=torch.long)
    inst = torch.zeros_like(panoptic, dtype=torch.long)
    for seg in segments:
        m = panoptic == seg["id"]
        sem[m] = int(seg["category_id"])
        if seg.get("isthing"):
            inst[m] = int(seg["id"])
    return sem, inst


def kpis_from_metric(metric: DepthAwarePanopticQuality, mode: str) -> dict[str, float]:
    """Toolkit-named KPIs in percent: ``{mode}_dpq[_th|_st]_{threshold}`` (-1.0 = plain PQ) and averages,
    plus ``PQ``/``PQ_th``/``PQ_st``/``SQ``/``RQ`` for convenience."""
    res = metric.compute()
    kpi: dict[str, float] = {}
    for t in metric.thresholds:
        r = res[t]
        kpi[f"{mode}_dpq_{t}"] = 100.0 * r["pq"]
        kpi[f"{mode}_dpq_th_{t}"] = 100.0 * r["pq_th"]
        kpi[f"{mode}_dpq_st_{t}"] = 100.0 * r["pq_st"]
    if "averages" in res:
        a = res["averages"]
        kpi[f"{mode}_dpq_averages"] = 100.0 * a["pq"]
        kpi[f"{mode}_dpq_th_averages"] = 100.0 * a["pq_th"]
        kpi[f"{mode}_dpq_st_averages"] = 100.0 * a["pq_st"]
    plain = res[metric.thresholds[0]]
    kpi.update(PQ=100.0 * plain["pq"], PQ_th=100.0 * plain["pq_th"], PQ_st=100.0 * plain["pq_st"],
               SQ=100.0 * plain["sq"], RQ=100.0 * plain["rq"])
    return kpi


def per_class_table(stats: torch.Tensor, class_ids: list[int], names: dict[int, str] | None = None
                    ) -> list[dict[str, Any]]:
    """Per-class PQ/SQ/RQ (percent) and TP/FP/FN from a ``[num_classes, 4]`` statistics tensor."""
    rows = []
    for c in class_ids:
        r = pq_from_stats(stats, [c])
        iou, tp, fp, fn = (float(x) for x in stats[c])
        rows.append({"class_id": c, "name": (names or {}).get(c, str(c)), "PQ": 100.0 * r["pq"],
                     "SQ": 100.0 * r["sq"], "RQ": 100.0 * r["rq"], "TP": int(tp), "FP": int(fp), "FN": int(fn)})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text per-class table (PQ SQ RQ TP FP FN)."""
    lines = [f"{'class':<12} {'PQ':>6} {'SQ':>6} {'RQ':>6} {'TP':>4} {'FP':>4} {'FN':>4}"]
    for r in rows:
        lines.append(f"{r['name'][:12]:<12} {r['PQ']:6.1f} {r['SQ']:6.1f} {r['RQ']:6.1f} {r['TP']:4d} {r['FP']:4d} "
                     f"{r['FN']:4d}")
    return "\n".join(lines)
