"""How well the 3D semantic head (``model.frustum3d.semantic_weight``) names the voxels it predicts.

A confusion matrix over the decoder's finest predicted voxels whose GT 3D class (``semantic_3d``) is labelled:
rows the GT class, columns the head's arg-max over the classes but free space 0. Its summary (voxel accuracy, and
per class recall, precision and IoU, with the mean IoU over the classes that occur) says whether the head learned
objects or answers "wall" everywhere, which decides whether its fusion gate can help (stop 57: on the CPU demo the
head recalled 0-9 % of each thing class).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from frustum3d.losses import sparse_lookup
from frustum3d.sparse import SparseVoxels

__all__ = ["SemanticVoxelConfusion", "format_semantic_summary"]


class SemanticVoxelConfusion:
    """``[K, K]`` counts (int64, on the CPU) of GT class x predicted class over labelled predicted voxels."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self.counts = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.counts.zero_()

    def update(self, logits: SparseVoxels, semantic: torch.Tensor) -> None:
        """Add the voxels of ``logits`` (``[N, K]`` class logits) whose GT class in ``semantic`` ``[B, X, Y, Z]`` is in
        1..K-1."""
        k = self.num_classes
        gt = sparse_lookup(logits, semantic.to(logits.feats.device).long(), fill=0)
        predicted = logits.feats[:, 1:].argmax(1) + 1
        valid = (gt > 0) & (gt < k)
        pairs = torch.where(valid, gt * k + predicted, torch.full_like(gt, k * k))  # k * k: a bin for the rest
        self.counts += torch.bincount(pairs, minlength=k * k + 1)[: k * k].reshape(k, k).cpu()

    def summary(self, counts: torch.Tensor, classes: Mapping[int, tuple[str, bool]]) -> dict[str, Any] | None:
        """Voxel accuracy, mean IoU over the classes with GT voxels, and per class (name, thing, GT voxels, recall,
        precision, IoU); None without any labelled voxel. ``counts`` may be summed over processes."""
        c = counts.double()
        total = float(c.sum())
        if total == 0:
            return None
        rows = []
        for k in range(1, self.num_classes):
            gt, pred, hit = float(c[k].sum()), float(c[:, k].sum()), float(c[k, k])
            if gt == 0 and pred == 0:
                continue
            name, thing = classes.get(k, (str(k), False))
            union = gt + pred - hit
            rows.append({"class_id": k, "name": name, "isthing": bool(thing), "gt_voxels": int(gt),
                         "recall": hit / gt if gt else None, "precision": hit / pred if pred else None,
                         "iou": hit / union if union else None})
        present = [r["iou"] for r in rows if r["gt_voxels"] > 0]
        things = [r["recall"] for r in rows if r["gt_voxels"] > 0 and r["isthing"]]
        return {"voxels": int(total), "voxel_accuracy": float(c.diag().sum()) / total,
                "mean_iou": sum(present) / len(present) if present else None,
                "thing_recall_mean": sum(things) / len(things) if things else None, "per_class": rows}


def format_semantic_summary(summary: Mapping[str, Any]) -> str:
    """One line for the console."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    return (f"3D semantic head: {summary['voxels']} labelled voxels, accuracy {pct(summary['voxel_accuracy'])} %, "
            f"mean IoU {pct(summary['mean_iou'])}, mean thing recall {pct(summary['thing_recall_mean'])} %")
