"""Training losses of both stages, built from the spec.

* 2D stage (:func:`build_criterion`): the toolkit's weighted sum, class 2, mask 5, dice 5 (each also on every
  intermediate decoder prediction when ``deep_supervision``), depth 5 and multi-plane occupancy 5, with the
  Hungarian matcher (cost class 2, mask 5, dice 5 on random points).
* 3D stage (:class:`Stage3DCriterion`): the frustum3d reconstruction losses with the 2D Hungarian assignment.
  The queries are matched on the frozen 2D predictions against the 2D targets; the 3D mask targets of a sample
  are stored in the same order as its 2D targets, so the same ``(query, target)`` pairs supervise the 3D
  masks. Terms (:class:`frustum3d.losses.FrustumLoss`): geometry x ``surface_weight``, occupancy x
  ``completion_weights`` (64/128/256), panoptic x ``panoptic_weight`` per level (plus soft dice x
  ``panoptic_dice_weight`` and the voxel-ownership cross-entropy x ``panoptic_ce_weight`` when set, the latter
  scored with the frozen 2D class logits as the 3D panoptic fusion scores them); the total is their sum.
  ``num_masks`` is the batch's GT segment count averaged over DDP processes (at least 1). With
  ``hidden_thing_weight`` != 1 the voxel weighting of the GT thing voxels that the image does not show is
  multiplied by it first (:mod:`nvp3d.training.hidden_things`). With ``semantic_weight`` > 0 the decoder's
  per-voxel semantic logits add ``loss_semantic`` = that weight x their cross-entropy against the GT 3D semantics
  (``frustum3d.losses.semantic_loss_sparse``: every labelled voxel, also of objects no 2D target shows).
"""

from __future__ import annotations

from typing import Any

import torch
from frustum3d.losses import FrustumLoss, semantic_loss_sparse
from maskformer_head import HungarianMatcher, SetCriterion
from maskformer_head.criterion import average_target_count
from torch import nn

from nvp3d.data.targets import criterion_targets, targets_3d
from nvp3d.model.build import head_settings
from nvp3d.model.net3d import geometry_from_spec
from nvp3d.training.hidden_things import upweight_hidden_things

__all__ = ["Stage3DCriterion", "build_criterion"]


def build_criterion(spec: Any, num_decoder_layers: int, use_occupancy: bool) -> SetCriterion:
    """Matcher + set criterion with the spec's weights (aux weights repeated for deep supervision)."""
    v = head_settings(spec)
    matcher = HungarianMatcher(cost_class=v["class_weight"], cost_mask=v["mask_weight"], cost_dice=v["dice_weight"],
                               num_points=v["train_num_points"])
    weights = {"loss_ce": v["class_weight"], "loss_mask": v["mask_weight"], "loss_dice": v["dice_weight"],
               "loss_depth": v["depth_weight"]}
    if use_occupancy:
        weights["loss_mp_occ"] = v["mp_occ_weight"]
    if v["deep_supervision"]:
        for i in range(num_decoder_layers):
            weights.update({f"loss_ce_{i}": v["class_weight"], f"loss_mask_{i}": v["mask_weight"],
                            f"loss_dice_{i}": v["dice_weight"]})
    losses = ["labels", "masks", "depths"] + (["mp_occ"] if use_occupancy else [])
    return SetCriterion(v["num_classes"], matcher, weights, v["no_object_weight"], losses,
                        num_points=v["train_num_points"], oversample_ratio=v["oversample_ratio"],
                        importance_sample_ratio=v["importance_sample_ratio"], depth_loss=v["depth_loss"])



class Stage3DCriterion(nn.Module):
    """2D matching + 3D losses (module docstring). ``forward(outputs, batch) -> (total, terms, indices)``."""

    def __init__(self, spec: Any) -> None:
        super().__init__()
        v = head_settings(spec)
        f3 = spec.model.frustum3d
        self.matcher = HungarianMatcher(cost_class=v["class_weight"], cost_mask=v["mask_weight"],
                                        cost_dice=v["dice_weight"], num_points=v["train_num_points"])
        self.loss = FrustumLoss(surface_weight=f3.surface_weight, completion_weights=tuple(f3.completion_weights),
                                panoptic_weight=f3.panoptic_weight, truncation=f3.truncation,
                                panoptic_dice_weight=f3.panoptic_dice_weight,
                                panoptic_ce_weight=f3.panoptic_ce_weight)
        self.hidden_thing_weight = float(f3.hidden_thing_weight)
        self.semantic_weight = float(f3.semantic_weight)
        self.geometry = geometry_from_spec(spec) if self.hidden_thing_weight != 1.0 else None

    @staticmethod
    def num_masks(batch: dict[str, Any], device: torch.device) -> float:
        return average_target_count(sum(len(lab) for lab in batch["labels"]), device)

    def match(self, out2d: dict[str, Any], batch: dict[str, Any], device: torch.device) -> list:
        targets = criterion_targets(batch, tuple(out2d["padded_size"]), device, with_occupancy=False)
        pred = {"pred_logits": out2d["pred_logits"].float(), "pred_masks": out2d["pred_masks"].float()}
        return self.matcher(pred, targets)

    def forward(self, outputs: dict[str, Any], batch: dict[str, Any]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list]:
        device = outputs["occupancy_64"].device
        indices = self.match(outputs["out2d"], batch, device)
        targets = targets_3d(batch, device)
        if self.geometry is not None:
            targets = upweight_hidden_things(targets, batch, self.hidden_thing_weight, self.geometry)
        terms = self.loss(outputs, targets, indices, self.num_masks(batch, device),
                          class_logits=outputs["out2d"]["pred_logits"])
        if self.semantic_weight > 0:
            if "semantic_3d" not in batch:
                raise ValueError("model.frustum3d.semantic_weight > 0 needs the batch's semantic_3d volume (datasets3d "
                                 "DatasetConfig.semantic_3d_target, set by nvp3d's data module for the 3D stage)")
            terms["loss_semantic"] = self.semantic_weight * semantic_loss_sparse(outputs["semantic_256"],
                                                                                 batch["semantic_3d"].to(device))
        total = torch.stack(list(terms.values())).sum()
        return total, terms, indices
