"""``PanopticModule3D``: the LightningModule of the 3D stage (training, validation, test).

Training: the frozen 2D network runs under ``no_grad``; the lifting projection and the completion decoder
(with its query projections) minimise :class:`~nvp3d.training.losses.Stage3DCriterion` (geometry x surface
weight, occupancy x [50, 25, 10], panoptic x 25 per level, matched with the 2D Hungarian assignment). Logged
every step: ``train_loss`` (progress bar), ``geo``, ``occ``, ``panop`` (the level-256 terms, toolkit names),
``lr``, plus every individual ``loss_*`` term.

Validation / test: each frame is reconstructed, fused into a 3D panoptic volume and scored against the
dataset's PRQ segments (:mod:`nvp3d.evaluation.prq3d`); the per-class statistics are summed over the
frames and all-gathered over processes at the end of the epoch; KPIs ``PRQ``, ``RSQ``, ``RRQ`` (x100) and the
thing/stuff split go to the progress bar, the loggers and ``status.json`` (through the status callback).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nvp3d.data.targets import gt_occupancy
from nvp3d.evaluation.prq3d import KPI_KEYS, PRQAccumulator, sample_stats
from nvp3d.evaluation.semantic_voxels import SemanticVoxelConfusion
from nvp3d.evaluation.thing_outcomes import outcomes_dict, thing_outcomes
from nvp3d.model.fusion import FusedSample, fuse_batch
from nvp3d.model.net3d import NVPanoptix3D
from nvp3d.model.provenance import RECORD_KEY, spec_record
from nvp3d.training.eval_hooks import EvalHooksModule
from nvp3d.training.losses import Stage3DCriterion
from nvp3d.training.nonfinite import guard_loss
from nvp3d.training.optim import optimization_from_spec

__all__ = ["PanopticModule3D"]


class PanopticModule3D(EvalHooksModule):
    """3D stage of NVPanoptix3D driven by an :class:`nvp3d.config.ExperimentSpec`.

    Args:
        spec: the experiment spec (``dataset.enable_3d: true``).
        model: the 3D-stage network (2D weights already loaded).
        classes: class id -> (name, isthing) of the label space (PRQ rows).
        stuff_ids: stuff classes.
        status_callback: optional :class:`nvp3d.training.status_callback.StatusCallback` receiving KPIs.
    """

    def __init__(self, spec: Any, model: NVPanoptix3D, classes: dict[int, tuple[str, bool]],
                 stuff_ids: tuple[int, ...], status_callback: Any = None) -> None:
        super().__init__()
        self.spec = spec
        self.model = model
        self.criterion = Stage3DCriterion(spec)
        self.classes = dict(classes)
        self.stuff_ids = tuple(int(s) for s in stuff_ids)
        self.metrics = {mode: PRQAccumulator(self.classes, self.stuff_ids) for mode in ("val", "test")}
        #: the semantic head's confusion over labelled predicted voxels (models with the head, data with semantic_3d)
        self.semantic = SemanticVoxelConfusion(model.num_classes)
        self.status_callback = status_callback
        self.last_metrics: dict[str, Any] = {}
        self.keep_predictions = False  # tests: keep the fused volumes of the last evaluation
        self.predictions: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ forward / loss
    def forward(self, batch: dict[str, Any], with_gt: bool = False) -> dict[str, Any]:
        gt = gt_occupancy(batch, self.device) if with_gt else None
        return self.model(batch["image"].to(self.device), batch["intrinsic_reduced"].to(self.device),
                          batch["frustum_mask"].to(self.device), gt_occupancy=gt)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self(batch, with_gt=True)
        with torch.autocast(device_type=self.device.type, enabled=False):
            total, terms, _ = self.criterion(out, batch)
        if guard_loss(self, total, terms) is None:
            return None  # a skipped non-finite step (train.skip_nonfinite_steps)
        bs = batch["image"].shape[0]
        self.log("train_loss", total, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True)
        for key, name in (("loss_geometry", "geo"), ("loss_occupancy_256", "occ"), ("loss_panoptic_256", "panop")):
            if key in terms:
                self.log(name, terms[key], on_step=True, on_epoch=False, batch_size=bs)
        for key, value in terms.items():
            self.log(key, value, on_step=True, on_epoch=False, batch_size=bs)
        if self._trainer is not None:
            opt = self.optimizers(use_pl_optimizer=False)
            self.log("lr", max(g["lr"] for g in opt.param_groups), on_step=True, on_epoch=False, prog_bar=True,
                     batch_size=bs)
        return total

    # ------------------------------------------------------------------ evaluation
    def fuse(self, out: dict[str, Any]) -> list[FusedSample]:
        g = self.model.geometry
        return fuse_batch(out, grid_dims=g.grid_dims, truncation=g.truncation, stuff_ids=self.stuff_ids,
                          object_mask_threshold=self.model.object_mask_threshold)

    def score_batch(self, batch: dict[str, Any], fused: list[FusedSample], metric: PRQAccumulator) -> list:
        """Add every frame of the batch to ``metric``; returns the per-frame statistics."""
        ds = self.spec.dataset
        out = []
        for i, f in enumerate(fused):
            stats, details = sample_stats(batch["eval_masks"][i], batch["eval_labels"][i], f.panoptic, f.mapping,
                                          f.tdf, batch["frustum_mask"][i], num_classes=metric.num_classes,
                                          iso_value=self.spec.model.frustum3d.iso_recon_value,
                                          truncation=self.model.geometry.truncation,
                                          downsample_factor=int(ds.downsample_factor))
            metric.add(stats, thing_outcomes(details, self.stuff_ids))
            out.append(stats)
        return out

    def _eval_step(self, batch: dict[str, Any], mode: str) -> None:
        if "eval_masks" not in batch:
            raise ValueError("evaluation batches need the PRQ segments (datasets3d eval_targets)")
        out = self(batch, with_gt=False)
        fused = self.fuse(out)
        stats = self.score_batch(batch, fused, self.metrics[mode])
        if "semantic_256" in out and "semantic_3d" in batch:
            self.semantic.update(out["semantic_256"], batch["semantic_3d"])
        if self.keep_predictions:
            for i, (f, s) in enumerate(zip(fused, stats, strict=True)):
                self.predictions.append({"key": batch["meta"][i]["key"], "fused": f, "stats": s})

    def _start_eval(self, mode: str) -> None:
        super()._start_eval(mode)
        self.predictions = []
        self.semantic.reset()

    def _semantic_summary(self) -> dict[str, Any] | None:
        """The semantic head's scores over all processes; None for a model without the head (no exchange then:
        every process builds the same model)."""
        if self.model.completion.semantic_256 is None:
            return None
        return self.semantic.summary(self._summed(self.semantic.counts), self.classes)

    def _summed(self, local: torch.Tensor) -> torch.Tensor:
        """``local`` summed over all processes (``all_gather`` then sum over the new leading axis)."""
        t = local.to(self.device)
        if self.trainer is not None and self.trainer.world_size > 1:
            gathered = self.all_gather(t)
            t = gathered.sum(0) if gathered.dim() == local.dim() + 1 else gathered
        return t.double().cpu()

    def gathered_stats(self, mode: str) -> torch.Tensor:
        """Per-class statistics summed over all processes."""
        return self._summed(self.metrics[mode].stats)

    def _finish_eval(self, mode: str) -> None:
        stats = self.gathered_stats(mode)
        res = self.metrics[mode].compute(stats)
        kpi = res["kpi"]
        for key in KPI_KEYS:
            value = kpi[key]
            if math.isfinite(value):
                self.log(key, value, on_step=False, on_epoch=True, prog_bar=key in ("PRQ", "RSQ", "RRQ"),
                         sync_dist=False, rank_zero_only=True)
        self.last_metrics = {"mode": mode, "kpi": {k: kpi[k] for k in KPI_KEYS}, "per_class": res["per_class"],
                             "summary": res["summary"], "stats": stats,
                             "things": outcomes_dict(self._summed(self.metrics[mode].outcomes)),
                             "semantic": self._semantic_summary()}
        if self.status_callback is not None:
            self.status_callback.set_kpi({k: kpi[k] for k in ("PRQ", "RSQ", "RRQ")})

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        return optimization_from_spec(self.model, self.spec.train.optim, "no trainable parameters in the 3D stage",
                                      precision=self.spec.train.precision)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tao_model"] = "panoptic_recon_3d"
        checkpoint["nvp3d_stage"] = "3d"
        checkpoint[RECORD_KEY] = spec_record(self.spec, self.classes)  # what evaluate/inference/export rebuild
