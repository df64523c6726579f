"""Training loss of the 3D stage: the frustum3d reconstruction losses with the 2D Hungarian assignment.

The queries are matched on the frozen 2D predictions (class logits and mask logits) against the 2D targets
(toolkit: ``HungarianMatcher`` with cost class 2, mask 5, dice 5 on random points); the 3D mask targets of a
sample are stored in the same order as its 2D targets, so the same ``(query, target)`` pairs supervise the 3D
masks. Terms (:class:`frustum3d.losses.FrustumLoss`): geometry x ``surface_weight``, occupancy x
``completion_weights`` (64/128/256), panoptic x ``panoptic_weight`` per level; the total is their sum.
``num_masks`` is the batch's GT segment count averaged over DDP processes (at least 1).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from frustum3d.losses import FrustumLoss
from maskformer_head import HungarianMatcher
from torch import nn

from nvp3d.lightning.targets import criterion_targets
from nvp3d.model.builder import head_settings

__all__ = ["LEVELS", "Stage3DCriterion", "targets_3d"]

LEVELS = ("64", "128", "256")


def targets_3d(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """FrustumLoss targets from a collated ``datasets3d`` batch (enable_3d)."""
    missing = [k for k in ("geometry", "occupancy_256", "masks_3d_256", "weighting_256") if k not in batch]
    if missing:
        raise ValueError(f"batch lacks the 3D targets {missing} (it has {sorted(batch)}): the 3D stage needs "
                         "dataset.enable_3d: true data")
    t: dict[str, Any] = {"geometry": batch["geometry"].to(device)}
    for lvl in LEVELS:
        t[f"occupancy_{lvl}"] = batch[f"occupancy_{lvl}"].to(device)
        t[f"weighting_{lvl}"] = batch[f"weighting_{lvl}"].to(device)
        t[f"masks_{lvl}"] = [m.to(device) for m in batch[f"masks_3d_{lvl}"]]
    return t


def gt_occupancy(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """Dense GT occupancy per level for the decoder's training-time prune fallback."""
    return {lvl: batch[f"occupancy_{lvl}"].to(device) for lvl in LEVELS}


class Stage3DCriterion(nn.Module):
    """2D matching + 3D losses (module docstring). ``forward(outputs, batch) -> (total, terms, indices)``."""

    def __init__(self, spec: Any) -> None:
        super().__init__()
        v = head_settings(spec)
        f3 = spec.model.frustum3d
        self.matcher = HungarianMatcher(cost_class=v["class_weight"], cost_mask=v["mask_weight"],
                                        cost_dice=v["dice_weight"], num_points=v["train_num_points"])
        self.loss = FrustumLoss(surface_weight=f3.surface_weight, completion_weights=tuple(f3.completion_weights),
                                panoptic_weight=f3.panoptic_weight, truncation=f3.truncation)

    @staticmethod
    def num_masks(batch: dict[str, Any], device: torch.device) -> float:
        n = torch.as_tensor([float(sum(len(lab) for lab in batch["labels"]))], device=device)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            world = dist.get_world_size()
        return max(float(n.item()) / world, 1.0)

    def match(self, out2d: dict[str, Any], batch: dict[str, Any], device: torch.device) -> list:
        targets = criterion_targets(batch, tuple(out2d["padded_size"]), device, with_occupancy=False)
        pred = {"pred_logits": out2d["pred_logits"].float(), "pred_masks": out2d["pred_masks"].float()}
        return self.matcher(pred, targets)

    def forward(self, outputs: dict[str, Any], batch: dict[str, Any]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list]:
        device = outputs["occupancy_64"].device
        indices = self.match(outputs["out2d"], batch, device)
        terms = self.loss(outputs, targets_3d(batch, device), indices, self.num_masks(batch, device))
        total = torch.stack(list(terms.values())).sum()
        return total, terms, indices
