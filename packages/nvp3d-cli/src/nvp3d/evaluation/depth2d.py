"""Depth accuracy of the 2D stage: the standard monocular-depth errors over valid GT pixels (GT > 0).

``{mode}_depth_mae`` (metres), ``{mode}_depth_rmse`` (metres), ``{mode}_depth_abs_rel`` (mean |pred - gt| / gt)
and ``{mode}_depth_delta1`` (percent of pixels with max(pred / gt, gt / pred) < 1.25), pooled over every valid
pixel of the split. Two more separate a depth's scale from its shape: ``{mode}_depth_log_scale``, the mean over
images of |log s| with ``s`` the median of gt / pred over the image's valid pixels (the one factor that best
aligns the image, e.g. a room's size misjudged), and ``{mode}_depth_abs_rel_scaled``, the AbsRel of ``s * pred``
(the "median-scaled" AbsRel of the monocular-depth literature: what is left once each image's scale is right).
Not in the toolkit, whose 2D KPIs are PQ and depth-aware PQ only; the 3D stage lifts its features along each ray
at this depth, so its error bounds the 3D geometry (``tools/diagnose_3d.py``).
"""

from __future__ import annotations

import math

import torch
from maskformer_head import sum_over_ranks

__all__ = ["DELTA1", "DepthErrors", "image_scale"]

#: ratio threshold of the delta-1 accuracy
DELTA1 = 1.25


def image_scale(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """The one factor that best aligns an image's predicted depth with its GT: the median of gt / pred over the
    pixels with both (``gt > 0``, ``pred > 0``); 1 where there is none. A 0-dim tensor of ``pred``'s dtype."""
    both = (gt > 0) & (pred > 0)
    if not bool(both.any()):
        return torch.ones((), dtype=pred.dtype, device=pred.device)
    return (gt[both] / pred[both]).median()


class DepthErrors:
    """Sums ``[pixels, sum |e|, sum e^2, sum |e| / gt, pixels with ratio < 1.25, sum |s pred - gt| / gt, images,
    sum |log s|]`` over updates (and ranks); ``s`` is each image's median of gt / pred (module docstring)."""

    def __init__(self) -> None:
        self.stats = torch.zeros(8, dtype=torch.float64)

    def reset(self) -> None:
        self.stats.zero_()

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """One image: predicted and GT depth maps of the same shape (metres; GT 0 = no depth)."""
        if pred.shape != gt.shape:
            raise ValueError(f"predicted depth {tuple(pred.shape)} and GT depth {tuple(gt.shape)} differ in shape")
        pred, gt = pred.double(), gt.double()
        valid = gt > 0
        p, g = pred[valid], gt[valid]
        e = (p - g).abs()
        ratio = torch.maximum(p / g, g / p.clamp_min(1e-12))
        scale = image_scale(p, g)
        images = torch.ones((), dtype=p.dtype) if p.numel() else torch.zeros((), dtype=p.dtype)
        self.stats += torch.stack([valid.sum().double(), e.sum(), (e * e).sum(), (e / g).sum(),
                                   (ratio < DELTA1).sum().double(), ((scale * p - g).abs() / g).sum(), images,
                                   scale.log().abs() * images]).cpu()

    def sync(self) -> None:
        """Sum over all ranks (no-op outside ``torch.distributed``)."""
        self.stats = sum_over_ranks(self.stats)

    def kpis(self, mode: str) -> dict[str, float]:
        """``{mode}_depth_{mae,rmse,abs_rel,delta1,abs_rel_scaled,log_scale}``; NaN when no valid pixel was seen."""
        n, abs_sum, sq_sum, rel_sum, good, scaled_rel_sum, images, log_scale_sum = (float(v) for v in self.stats)
        if n == 0:
            return {f"{mode}_depth_{k}": math.nan
                    for k in ("mae", "rmse", "abs_rel", "delta1", "abs_rel_scaled", "log_scale")}
        return {f"{mode}_depth_mae": abs_sum / n, f"{mode}_depth_rmse": math.sqrt(sq_sum / n),
                f"{mode}_depth_abs_rel": rel_sum / n, f"{mode}_depth_delta1": 100.0 * good / n,
                f"{mode}_depth_abs_rel_scaled": scaled_rel_sum / n, f"{mode}_depth_log_scale": log_scale_sum / images}
