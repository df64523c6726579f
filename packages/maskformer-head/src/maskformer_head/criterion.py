"""Training losses of the 2D head (Mask2Former set criterion + NVPanoptix3D depth terms).

* ``labels``: cross-entropy over K+1 classes, unmatched queries -> no-object (weight eos_coef).
* ``masks``: BCE and dice on importance-sampled points of matched masks, each summed over
  masks and divided by the batch's target count (``num_masks``, all-reduced under DDP).
* ``depths``: L1 on pixels with target depth > 0 (target bilinearly resized to the prediction),
  mean per image, then mean over images (the toolkit's reduction without sample weights); with
  ``depth_loss="log_l1"`` the same on log depth.
* ``mp_occ``: BCE-with-logits of the multi-plane occupancy logits against binary targets,
  summed over bins and averaged over pixels whose target depth map is non-zero.
Deep supervision: every ``aux_outputs`` entry is matched again and gets ``labels``/``masks``
losses with suffix ``_{i}`` (no auxiliary depth or occupancy terms, as in the toolkit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .batch_targets import BatchTargets, MatchedPairs
from .matcher import HungarianMatcher
from .point_sampling import (
    RandomSource,
    default_random,
    point_sample,
    sampling_dtype,
    uncertain_point_coords_with_randomness,
)
from .point_sampling import uncertainty as mask_uncertainty

KNOWN_LOSSES = ("labels", "masks", "depths", "mp_occ")
#: forms of the ``depths`` term: ``l1`` in metres (the toolkit's), ``log_l1`` on log depth (relative error, so
#: near and far pixels weigh alike and the gradient through an ``exp`` output does not grow with depth)
DEPTH_LOSS_FORMS = ("l1", "log_l1")


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Mean BCE per mask, summed over masks, divided by ``num_masks``."""
    return F.binary_cross_entropy_with_logits(inputs, targets, reduction="none").mean(1).sum() / num_masks


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Soft dice (+1 smoothing) per mask, summed over masks, divided by ``num_masks``."""
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def average_target_count(count: float, device: torch.device | str, distributed: bool = True) -> float:
    """A process's target ``count`` averaged over the DDP ranks (when ``distributed`` and a process group is up),
    at least 1: the normaliser of the mask losses. One process makes no device round trip (a copy and a wait)."""
    if not (distributed and dist.is_available() and dist.is_initialized()):
        return max(float(count), 1.0)
    n = torch.as_tensor([float(count)], device=device)
    dist.all_reduce(n)
    return torch.clamp(n / dist.get_world_size(), min=1).item()


class SetCriterion(nn.Module):
    """Computes the losses named in ``losses`` (see module docstring); returns unweighted terms.

    ``weight_dict`` is stored for ``weighted_total``. ``rand`` (or ``forward(..., rand=)``) is the
    random source of both the matcher and the point sampling, drawn in the reference order.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        eos_coef: float,
        losses: Sequence[str],
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        rand: RandomSource | None = None,
        depth_loss: str = "l1",
    ) -> None:
        super().__init__()
        if depth_loss not in DEPTH_LOSS_FORMS:
            raise ValueError(f"SetCriterion: depth_loss={depth_loss!r}; choose one of {list(DEPTH_LOSS_FORMS)}")
        self.depth_loss = depth_loss
        unknown = [name for name in losses if name not in KNOWN_LOSSES]
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {unknown}; known: {list(KNOWN_LOSSES)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.losses = list(losses)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.rand = rand
        self._batch: BatchTargets | None = None  # the targets of the forward call in progress

    # -- individual losses ------------------------------------------------------------------
    def _prepared(self, targets, indices, device) -> tuple[BatchTargets, tuple[torch.Tensor, ...]]:
        """The batch's prepared targets (this call's, else built now) and the matched pairs on the device."""
        batch = self._batch if self._batch is not None and self._batch.targets is targets else BatchTargets(
            targets, device)
        pairs = indices if isinstance(indices, MatchedPairs) else MatchedPairs(indices)
        return batch, pairs.on_device(batch)

    def loss_labels(self, outputs, targets, indices, num_masks, rand):
        logits = outputs["pred_logits"]
        logits = logits if logits.dtype == torch.float64 else logits.float()
        prepared, (batch, src, _, label_row, _) = self._prepared(targets, indices, logits.device)
        matched = prepared.labels()[label_row]
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch, src] = matched
        loss = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits.dtype))
        return {"loss_ce": loss}

    def loss_masks(self, outputs, targets, indices, num_masks, rand):
        prepared, (batch, src, _, _, padded_row) = self._prepared(targets, indices, outputs["pred_masks"].device)
        src_masks = outputs["pred_masks"][batch, src][:, None]
        src_masks = src_masks.to(sampling_dtype(src_masks))  # losses in fp32 even for bf16 predictions
        padded = prepared.padded_masks()
        target_masks = padded.flatten(0, 1)[padded_row].to(src_masks)[:, None]
        with torch.no_grad():
            coords = uncertain_point_coords_with_randomness(
                src_masks, mask_uncertainty, self.num_points, self.oversample_ratio,
                self.importance_sample_ratio, rand,
            )
            point_labels = point_sample(target_masks, coords, align_corners=False).squeeze(1)
        point_logits = point_sample(src_masks, coords, align_corners=False).squeeze(1)
        return {
            "loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks),
        }

    def loss_depths(self, outputs, targets, indices, num_masks, rand):
        pred = outputs["pred_depths"]
        if pred.ndim == 3:
            pred = pred[:, None]
        gts = []
        for t in targets:
            gt = t["depths"].to(pred)
            gt = gt.reshape(1, 1, *gt.shape[-2:]) if gt.ndim == 2 else gt[:1].reshape(1, 1, *gt.shape[-2:])
            if gt.shape[-2:] != pred.shape[-2:]:
                gt = F.interpolate(gt, size=pred.shape[-2:], mode="bilinear", align_corners=False)
            gts.append(gt)
        gt = torch.cat(gts)
        # per image: mean |gt - pred| over its valid (gt > 0) pixels, 0 without any; a masked sum, not a boolean
        # index, so that no device sync is needed
        valid = gt > 0
        pred = pred[:, :1]
        if self.depth_loss == "log_l1":
            # clamped logs: invalid pixels (gt 0) and a non-positive prediction stay finite; both are masked or
            # only reachable with a non-exp activation
            tiny = torch.finfo(pred.dtype).tiny
            gt, pred = gt.clamp(min=tiny).log(), pred.clamp(min=tiny).log()
        err = torch.where(valid, (gt - pred).abs(), torch.zeros((), dtype=pred.dtype, device=pred.device))
        per_image = err.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1).to(pred.dtype)
        return {"loss_depth": per_image.mean()}

    def loss_mp_occ(self, outputs, targets, indices, num_masks, rand):
        logits = outputs["occupancy_logits"]
        occ = torch.stack([t["occupancy"] for t in targets]).to(logits)
        if occ.shape != logits.shape:
            raise ValueError(f"occupancy target {tuple(occ.shape)} != prediction {tuple(logits.shape)}")
        valid = torch.stack([t["depth_map"].reshape(1, *t["depth_map"].shape[-2:]) != 0 for t in targets])
        valid = valid.to(logits.device)
        if valid.shape[-2:] != logits.shape[-2:]:
            valid = F.interpolate(valid.float(), size=logits.shape[-2:], mode="nearest").bool()
        bce = F.binary_cross_entropy_with_logits(logits, occ, reduction="none") * valid
        return {"loss_mp_occ": bce.sum() / (valid.sum() + 1e-7)}

    def get_loss(self, name, outputs, targets, indices, num_masks, rand):
        fn = {
            "labels": self.loss_labels, "masks": self.loss_masks,
            "depths": self.loss_depths, "mp_occ": self.loss_mp_occ,
        }[name]
        return fn(outputs, targets, indices, num_masks, rand)

    def num_target_masks(self, targets, device, distributed: bool = True) -> float:
        """Total target count over the batch, averaged over DDP ranks (``distributed``), at least 1."""
        return average_target_count(sum(len(t["labels"]) for t in targets), device, distributed)

    def forward(self, outputs: dict, targets: Sequence[dict], rand: RandomSource | None = None,
                distributed: bool = True) -> dict:
        """Loss terms. ``distributed=False`` normalises by this process's target count alone: evaluation
        passes it, since ranks may see different numbers of frames and a collective per call would hang."""
        rand = rand or self.rand or default_random()
        main = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        device = outputs["pred_logits"].device
        # every decoder layer is scored against the same targets: prepare them once (batch_targets module)
        self._batch = BatchTargets(targets, device)
        try:
            indices = MatchedPairs(self.matcher(main, targets, rand=rand, batch=self._batch))
            num_masks = self.num_target_masks(targets, device, distributed)
            losses: dict[str, torch.Tensor] = {}
            for name in self.losses:
                losses.update(self.get_loss(name, outputs, targets, indices, num_masks, rand))
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                aux_indices = MatchedPairs(self.matcher(aux, targets, rand=rand, batch=self._batch))
                for name in self.losses:
                    if name in ("depths", "mp_occ"):
                        continue
                    terms = self.get_loss(name, aux, targets, aux_indices, num_masks, rand)
                    losses.update({f"{k}_{i}": v for k, v in terms.items()})
        finally:
            self._batch = None
        return losses

    def weighted_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of ``weight_dict[k] * losses[k]`` over the keys present in ``weight_dict``."""
        terms = [losses[k] * w for k, w in self.weight_dict.items() if k in losses]
        if not terms:
            raise ValueError("weighted_total: no loss key appears in weight_dict")
        return torch.stack(terms).sum()
