"""Hungarian matching of predicted masks to ground-truth segments (Mask2Former costs).

Cost per (query, target) = cost_class * (-p(class)) + cost_mask * mean point BCE +
cost_dice * point dice, evaluated on ``num_points`` uniformly random points shared by all
masks of an image, then solved with ``scipy.optimize.linear_sum_assignment``. A batch is costed in one
go (its queries against all its targets) and copied to the host once: matching image by image cost a
dozen small kernels and a device sync per image and decoder layer, which made a GPU training step wait
on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from .batch_targets import BatchTargets
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

    def _weighted(self, cost_class: torch.Tensor, out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """The weighted cost of sampled mask logits ``out [N, P]`` against sampled targets ``tgt [M, P]`` (mask
        costs in float32, or float64 for float64 inputs, outside autocast) plus the class cost ``[N, M]``."""
        with torch.autocast(device_type=out.device.type, enabled=False):
            out = out.float() if out.dtype != torch.float64 else out
            tgt = tgt.to(out.dtype)
            cost_mask = batch_sigmoid_ce_cost(out, tgt)
            cost_dice = batch_dice_cost(out, tgt)
        return self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice

    def cost_matrix(self, logits, masks, tgt_labels, tgt_masks, point_coords) -> torch.Tensor:
        """Cost ``[Q, n]`` of one image for given point coordinates ``[1, P, 2]``."""
        prob = logits.softmax(-1)
        cost_class = -prob[:, tgt_labels]
        tgt = tgt_masks.to(masks)[:, None]
        out = masks[:, None]
        tgt = point_sample(tgt, point_coords.repeat(tgt.shape[0], 1, 1), align_corners=False).squeeze(1)
        out = point_sample(out, point_coords.repeat(out.shape[0], 1, 1), align_corners=False).squeeze(1)
        return self._weighted(cost_class, out, tgt)

    def batch_costs(self, logits: torch.Tensor, masks: torch.Tensor, targets: Sequence[dict],
                    point_coords: torch.Tensor, batch: BatchTargets | None = None) -> torch.Tensor:
        """Costs ``[B*Q, N]`` of every query of the batch against every target of the batch (``N`` = all
        targets, image 0's first), each image's masks sampled at its own points ``point_coords [B, P, 2]``.

        Only the diagonal blocks (queries and targets of one image) are used; computing the full cross product
        in a few large kernels is cheaper on a GPU than a dozen small kernels per image.
        """
        bs, nq = logits.shape[:2]
        prob = logits.softmax(-1).reshape(bs * nq, -1)
        if batch is None:
            batch = BatchTargets(targets, prob.device)
        cost_class = -prob[:, batch.labels()]
        out = point_sample(masks, point_coords, align_corners=False).reshape(bs * nq, -1)  # [B*Q, P]
        if batch.same_size_masks():
            # every image's padded masks sampled at its own points in one call, then the real rows
            sampled = point_sample(batch.padded_masks().to(masks), point_coords, align_corners=False)
            tgt = sampled.flatten(0, 1)[batch.mask_rows()]  # [N, P]
        else:
            tgt = torch.cat([
                point_sample(t["masks"].to(masks)[:, None], point_coords[b:b + 1].expand(len(t["labels"]), -1, -1),
                             align_corners=False).squeeze(1)
                for b, t in enumerate(targets)
            ])  # [N, P]
        return self._weighted(cost_class, out, tgt)

    @torch.no_grad()
    def forward(self, outputs: dict, targets: Sequence[dict], rand: RandomSource | None = None,
                batch: BatchTargets | None = None):
        """Per image ``(query rows, target columns)`` of the minimum-cost assignment (host tensors).
        ``batch``: the targets prepared once by the caller (:class:`~maskformer_head.batch_targets.BatchTargets`),
        else built here."""
        rand = rand or self.rand or default_random()
        logits_all, masks_all = outputs["pred_logits"], outputs["pred_masks"]
        bs, num_queries = logits_all.shape[:2]
        if len(targets) != bs:
            raise ValueError(f"matcher: {len(targets)} target dicts for a batch of {bs}")
        masks_all = masks_all.to(sampling_dtype(masks_all))
        # one point draw per image, image 0 first (the order of a RandomSource tape)
        coords = torch.cat([rand((1, self.num_points, 2), masks_all.device, masks_all.dtype) for _ in range(bs)])
        sizes = [len(t["labels"]) for t in targets]
        empty = torch.zeros(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in range(bs)]
        costs = self.batch_costs(logits_all, masks_all, targets, coords, batch)
        host = costs.float().cpu().numpy() if costs.dtype != torch.float64 else costs.cpu().numpy()  # one copy
        indices, start = [], 0
        for b, n in enumerate(sizes):
            rows, cols = linear_sum_assignment(host[b * num_queries:(b + 1) * num_queries, start:start + n])
            start += n
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
