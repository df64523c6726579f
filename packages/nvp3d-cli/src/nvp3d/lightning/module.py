"""``PanopticModule2D``: the LightningModule of the 2D stage (training, validation, test).

Training minimises the toolkit's weighted sum: class 2, mask 5, dice 5 (each also on every intermediate
decoder prediction when ``deep_supervision``), depth 5 and multi-plane occupancy 5. Validation and test
post-process the queries into panoptic maps and accumulate PQ and depth-aware PQ at the thresholds
-1 (plain PQ), 0.5, 0.25 and 0.1, summed over DDP ranks at epoch end.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from maskformer_head import DepthAwarePanopticQuality, HungarianMatcher, PostProcessor, SetCriterion
from maskformer_head.metrics import pq_from_stats

from nvp3d.lightning.nonfinite import guard_loss, guard_outputs
from nvp3d.lightning.optim import optimization_from_spec
from nvp3d.lightning.targets import criterion_targets
from nvp3d.model.builder import build_model, head_settings
from nvp3d.model.nvpanoptix3d import NVPanoptix3D

DPQ_THRESHOLDS = (-1.0, 0.5, 0.25, 0.1)


def apply_freeze(model: torch.nn.Module, paths: list[str]) -> list[str]:
    """``requires_grad_(False)`` on each dotted submodule path (``train.freeze``); returns the paths."""
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError as exc:
            top = sorted(n for n, _ in model.named_children())
            raise ValueError(f"train.freeze entry {path!r} is not a submodule of the model; "
                             f"top-level modules are {top}") from exc
        module.requires_grad_(False)
    return list(paths)


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
                        importance_sample_ratio=v["importance_sample_ratio"])


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


class EvalHooksModule(pl.LightningModule):
    """The validation/test hooks of both stages' LightningModules.

    A subclass keeps one metric per mode in ``self.metrics`` (``"val"``, ``"test"``; each with ``reset()``)
    and implements ``_eval_step(batch, mode)`` and ``_finish_eval(mode)``; ``_start_eval(mode)`` runs at the
    start of each evaluation epoch (here: reset the mode's metric). Validation ends without ``_finish_eval``
    during Lightning's sanity check.
    """

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _start_eval(self, mode: str) -> None:
        self.metrics[mode].reset()

    def on_validation_epoch_start(self) -> None:
        self._start_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval("test")

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")


class PanopticModule2D(EvalHooksModule):
    """2D stage of NVPanoptix3D driven by an :class:`nvp3d.config.ExperimentSpec`.

    ``thing_ids``/``stuff_ids`` are the dataset's label space (for post-processing and PQ); ``model`` may be
    given (tests), else it is built from the spec.
    """

    def __init__(self, spec: Any, thing_ids: tuple[int, ...], stuff_ids: tuple[int, ...],
                 model: NVPanoptix3D | None = None, status_callback: Any = None) -> None:
        super().__init__()
        self.spec = spec
        self.model = model if model is not None else build_model(spec)
        self.frozen = apply_freeze(self.model, list(spec.train.freeze))
        self.use_occupancy = bool(spec.dataset.enable_mp_occ)
        self.model.use_occupancy = self.use_occupancy
        self.deep_supervision = bool(head_settings(spec)["deep_supervision"])
        self.criterion = build_criterion(spec, self.model.head_config.dec_layers, self.use_occupancy)
        self.thing_ids = tuple(int(t) for t in thing_ids)
        self.stuff_ids = tuple(int(s) for s in stuff_ids)
        num_classes = self.model.num_classes
        self.postprocessor = PostProcessor(num_classes, self.thing_ids, mode="panoptic",
                                           object_mask_threshold=spec.model.object_mask_threshold,
                                           overlap_threshold=spec.model.overlap_threshold)
        self.metrics = {mode: self._new_metric() for mode in ("val", "test")}
        self.status_callback = status_callback
        self.last_metrics: dict[str, Any] = {}
        self._loss_sums: dict[str, list[float]] = {}

    def _new_metric(self) -> DepthAwarePanopticQuality:
        return DepthAwarePanopticQuality(self.model.num_classes, self.thing_ids, self.stuff_ids, DPQ_THRESHOLDS)

    # ------------------------------------------------------------------ forward / loss
    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        return self.model(images)

    def compute_losses(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
        out = self.model(batch["image"])
        guard_outputs(self, out)
        targets = criterion_targets(batch, out["padded_size"], self.device, with_occupancy=self.use_occupancy)
        crit_out = dict(out)
        if not self.deep_supervision:
            crit_out.pop("aux_outputs", None)
        with torch.autocast(device_type=self.device.type, enabled=False):
            crit_out = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
                        for k, v in crit_out.items()}
            losses = self.criterion(crit_out, targets, distributed=self.training)
            total = self.criterion.weighted_total(losses)
        return total, losses, out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        total, losses, _ = self.compute_losses(batch)
        if guard_loss(self, total, losses) is None:
            return None  # a skipped non-finite step (train.skip_nonfinite_steps)
        bs = batch["image"].shape[0]
        self.log("train_loss", total, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True)
        for key in ("loss_ce", "loss_mask", "loss_dice", "loss_depth", "loss_mp_occ"):
            if key in losses:
                self.log(key, losses[key], on_step=True, on_epoch=False, batch_size=bs)
        opt = self.optimizers(use_pl_optimizer=False) if self._trainer is not None else None
        if opt is not None:
            self.log("lr", max(g["lr"] for g in opt.param_groups), on_step=True, on_epoch=False, prog_bar=True,
                     batch_size=bs)
        return total

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict[str, Any], mode: str) -> None:
        total, _, out = self.compute_losses(batch)
        bs = batch["image"].shape[0]
        self.log(f"{mode}_loss", total, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        self.update_metric(self.metrics[mode], out, batch)

    @torch.no_grad()
    def predict_panoptic(self, out: dict[str, Any], image_hw: tuple[int, int]) -> list[dict[str, Any]]:
        """Post-processed panoptic maps and depth (cropped to the unpadded image) for one batch."""
        padded = tuple(out["padded_size"])
        n = out["pred_logits"].shape[0]
        results = self.postprocessor({"pred_logits": out["pred_logits"].float(),
                                      "pred_masks": out["pred_masks"].float()}, padded, [image_hw] * n)
        depth = F.interpolate(out["pred_depths"].float(), size=padded, mode="bilinear", align_corners=False)
        depth = depth[:, 0, : image_hw[0], : image_hw[1]].clamp(0.0, self.spec.dataset.depth_scale)
        for r, d in zip(results, depth):
            r["depth"] = d
        return results

    def update_metric(self, metric: DepthAwarePanopticQuality, out: dict[str, Any], batch: dict[str, Any]) -> None:
        h, w = batch["image"].shape[-2:]
        results = self.predict_panoptic(out, (h, w))
        for i, r in enumerate(results):
            pan, segments = r["panoptic_seg"]
            sem, inst = panoptic_to_maps(pan.cpu(), segments)
            gt_sem = batch["sem_seg"][i].cpu()
            gt_inst = batch["inst_seg"][i].cpu().clamp_min(0)
            metric.update(sem, inst, gt_sem, gt_inst, r["depth"].cpu(), batch["depth"][i].cpu())

    def _finish_eval(self, mode: str) -> None:
        metric = self.metrics[mode]
        metric.sync()
        kpi = kpis_from_metric(metric, mode)
        loss = self.trainer.callback_metrics.get(f"{mode}_loss")
        if loss is not None:
            kpi[f"{mode}_loss"] = float(loss)
        for key, value in kpi.items():
            if key != f"{mode}_loss" and isinstance(value, float) and math.isfinite(value):
                self.log(key, value, on_step=False, on_epoch=True, sync_dist=False, rank_zero_only=True)
        self.last_metrics = {"mode": mode, "kpi": kpi, "stats": metric.stats.clone()}
        if self.status_callback is not None:
            self.status_callback.set_kpi(kpi)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record what the weights belong to (stage, preset, effective head sizes) next to them."""
        checkpoint["nvp3d"] = {"stage": "2d", "preset": self.spec.model.preset, "head": head_settings(self.spec),
                               "num_classes": self.model.num_classes}
        checkpoint["tao_model"] = "panoptic_recon_3d"

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        return optimization_from_spec(self.model, self.spec.train.optim,
                                      "no trainable parameters: train.freeze froze the whole model")


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
