"""Hungarian matching of predicted masks to ground-truth segments (Mask2Former costs).

Cost per (query, target) = cost_class * (-p(class)) + cost_mask * mean point BCE +
cost_dice * point dice, evaluated on ``num_points`` uniformly random points shared by all
masks of an image, then solved with ``scipy.optimize.linear_sum_assignment``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from .point_sampling import RandomSource, default_random, point_sample, sampling_dtype


def batch_dice_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise dice cost ``[N, M]`` between mask logits ``[N, P]`` and binary targets ``[M, P]``."""
    inputs = inputs.sigmoid()
    numerator = 2 * torch.einsum("nc,mc->nm", inputs, targets)
    denominator = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_ce_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise mean binary cross-entropy ``[N, M]`` over the ``P`` points."""
    hw = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    loss = torch.einsum("nc,mc->nm", pos, targets) + torch.einsum("nc,mc->nm", neg, 1 - targets)
    return loss / hw


class HungarianMatcher(nn.Module):
    """One-to-one assignment between queries and targets, per image.

    ``forward(outputs, targets, rand=None)``: ``outputs`` has ``pred_logits [B, Q, K+1]`` and
    ``pred_masks [B, Q, h, w]``; ``targets`` is a list of ``{"labels": [n], "masks": [n, H, W]}``.
    Returns per image ``(query_indices, target_indices)`` int64 tensors. ``rand`` (or the
    constructor's) supplies the ``[1, num_points, 2]`` point draw of each image, image 0 first.
    """

    def __init__(
        self, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0, num_points: int = 0,
        rand: RandomSource | None = None,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: all costs are zero")
        if num_points <= 0:
            raise ValueError(f"HungarianMatcher: num_points must be positive, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.rand = rand

    def cost_matrix(self, logits, masks, tgt_labels, tgt_masks, point_coords) -> torch.Tensor:
        """Cost ``[Q, n]`` of one image for given point coordinates ``[1, P, 2]``."""
        prob = logits.softmax(-1)
        cost_class = -prob[:, tgt_labels]
        tgt = tgt_masks.to(masks)[:, None]
        out = masks[:, None]
        tgt = point_sample(tgt, point_coords.repeat(tgt.shape[0], 1, 1), align_corners=False).squeeze(1)
        out = point_sample(out, point_coords.repeat(out.shape[0], 1, 1), align_corners=False).squeeze(1)
        with torch.autocast(device_type=out.device.type, enabled=False):
            out = out.float() if out.dtype != torch.float64 else out
            tgt = tgt.to(out.dtype)
            cost_mask = batch_sigmoid_ce_cost(out, tgt)
            cost_dice = batch_dice_cost(out, tgt)
        return self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice

    @torch.no_grad()
    def forward(self, outputs: dict, targets: Sequence[dict], rand: RandomSource | None = None):
        rand = rand or self.rand or default_random()
        logits_all, masks_all = outputs["pred_logits"], outputs["pred_masks"]
        bs, num_queries = logits_all.shape[:2]
        if len(targets) != bs:
            raise ValueError(f"matcher: {len(targets)} target dicts for a batch of {bs}")
        costs = []
        for b in range(bs):  # the point draws in image order, as before
            masks = masks_all[b]
            masks = masks.to(sampling_dtype(masks))
            coords = rand((1, self.num_points, 2), masks.device, masks.dtype)
            c = self.cost_matrix(logits_all[b], masks, targets[b]["labels"], targets[b]["masks"], coords)
            costs.append(c.reshape(num_queries, len(targets[b]["labels"])))
        # one device-to-host copy for the whole batch: a copy per image would stall a GPU once per image
        sizes = [c.shape[1] for c in costs]
        host = torch.cat([c.float() if c.dtype != torch.float64 else c for c in costs], dim=1).cpu().numpy() \
            if costs else None
        indices, start = [], 0
        for n in sizes:
            rows, cols = linear_sum_assignment(host[:, start:start + n])
            start += n
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
