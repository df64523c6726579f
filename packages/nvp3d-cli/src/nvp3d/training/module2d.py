"""``PanopticModule2D``: the LightningModule of the 2D stage (training, validation, test).

Training minimises :func:`nvp3d.training.losses.build_criterion`'s weighted sum. Validation and test
post-process the queries into panoptic maps and accumulate PQ and depth-aware PQ at the thresholds
-1 (plain PQ), 0.5, 0.25 and 0.1, summed over DDP ranks at epoch end.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from maskformer_head import DepthAwarePanopticQuality, PostProcessor
from maskformer_head.metrics import sum_over_ranks

from nvp3d.data.targets import criterion_targets
from nvp3d.evaluation.depth2d import DepthErrors
from nvp3d.evaluation.pq2d import DPQ_THRESHOLDS, kpis_from_metric, panoptic_to_maps
from nvp3d.evaluation.thing_outcomes import OUTCOME_KEYS, details_2d, outcomes_dict, thing_outcomes
from nvp3d.model.build import build_net2d, head_settings
from nvp3d.model.graphed_train2d import TrainingGraphs
from nvp3d.model.net2d import Panoptic2DNet
from nvp3d.model.provenance import RECORD_KEY, spec_record
from nvp3d.training.eval_hooks import EvalHooksModule
from nvp3d.training.losses import build_criterion
from nvp3d.training.nonfinite import guard_loss, guard_outputs
from nvp3d.training.optim import optimization_from_spec

__all__ = ["PanopticModule2D", "apply_freeze"]


def apply_freeze(model: torch.nn.Module, paths: list[str]) -> list[str]:
    """``requires_grad_(False)`` on each dotted submodule path (``train.freeze``); returns the paths.

    :meth:`PanopticModule2D.train` also keeps these modules in eval mode: frozen means that their batch-norm
    running statistics stay as loaded and their dropout is off, not only that the optimizer skips them.
    """
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError as exc:
            top = sorted(n for n, _ in model.named_children())
            raise ValueError(f"train.freeze entry {path!r} is not a submodule of the model; "
                             f"top-level modules are {top}") from exc
        module.requires_grad_(False)
    return list(paths)


class PanopticModule2D(EvalHooksModule):
    """2D stage of NVPanoptix3D driven by an :class:`nvp3d.config.ExperimentSpec`.

    ``thing_ids``/``stuff_ids`` are the dataset's label space (for post-processing and PQ); ``model`` may be
    given (tests), else it is built from the spec.
    """

    def __init__(self, spec: Any, thing_ids: tuple[int, ...], stuff_ids: tuple[int, ...],
                 model: Panoptic2DNet | None = None, status_callback: Any = None) -> None:
        super().__init__()
        self.spec = spec
        self.model = model if model is not None else build_net2d(spec)
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
        self.depth_errors = {mode: DepthErrors() for mode in ("val", "test")}
        # where the GT things of each evaluation went (nvp3d.evaluation.thing_outcomes), summed over frames
        self.thing_counts = {mode: torch.zeros(len(OUTCOME_KEYS), dtype=torch.float64) for mode in ("val", "test")}
        self.status_callback = status_callback
        self.last_metrics: dict[str, Any] = {}
        self._loss_sums: dict[str, list[float]] = {}
        # train.cuda_graphs_train_2d: training forward + backward replayed from CUDA graphs where they apply
        self.train_graphs = TrainingGraphs(self.model) if spec.train.cuda_graphs_train_2d else None

    def train(self, mode: bool = True) -> PanopticModule2D:
        """Training mode, except for the ``train.freeze`` modules, which stay in eval mode (see
        :func:`apply_freeze`; fitting calls this at its start and after each validation,
        :mod:`nvp3d.training.eval_hooks`)."""
        super().train(mode)
        if mode:
            for path in getattr(self, "frozen", ()):
                self.model.get_submodule(path).eval()
        return self

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.train_graphs is not None:
            world = self.trainer.world_size if self._trainer is not None else 1
            why = self.train_graphs.blocking_reasons(self.device, self.spec.train.precision != "fp32", world)
            print("train.cuda_graphs_train_2d: " + (f"off, {'; '.join(why)}: the 2D network trains eagerly" if why
                  else "on: the training forward and backward replay from CUDA graphs (one capture per batch "
                  "shape)"), flush=True)

    def _new_metric(self) -> DepthAwarePanopticQuality:
        return DepthAwarePanopticQuality(self.model.num_classes, self.thing_ids, self.stuff_ids, DPQ_THRESHOLDS)

    # ------------------------------------------------------------------ forward / loss
    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        return self.model(images)

    def forward_for_loss(self, images: torch.Tensor) -> dict[str, Any]:
        """The network's outputs for the loss: replayed from the training graphs where they apply
        (:mod:`nvp3d.model.graphed_train2d`), else the plain forward."""
        graphs = self.train_graphs
        if graphs is not None and self.training and graphs.applies(images):
            return graphs(images)
        return self.model(images)

    def compute_losses(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
        out = self.forward_for_loss(batch["image"])
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
        # the loss is the plain pass's; the metrics see the flip-averaged predictions (model.test_time_flip)
        flipped = self.model(batch["image"].flip(-1)) if self.spec.model.test_time_flip else None
        self.update_metric(self.metrics[mode], out, batch, self.depth_errors[mode], self.thing_counts[mode],
                           flipped=flipped)

    def _start_eval(self, mode: str) -> None:
        super()._start_eval(mode)
        self.depth_errors[mode].reset()
        self.thing_counts[mode].zero_()

    @torch.no_grad()
    def predict_panoptic(self, out: dict[str, Any], image_hw: tuple[int, int],
                         flipped: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Post-processed panoptic maps and depth (cropped to the unpadded image) for one batch; ``flipped``: the
        network's outputs on the horizontally flipped batch, averaged in (:func:`maskformer_head.merge_flipped`)."""
        padded = tuple(out["padded_size"])
        n = out["pred_logits"].shape[0]
        second = None
        if flipped is not None:
            second = {"pred_logits": flipped["pred_logits"].float(), "pred_masks": flipped["pred_masks"].float()}
        results = self.postprocessor({"pred_logits": out["pred_logits"].float(),
                                      "pred_masks": out["pred_masks"].float()}, padded, [image_hw] * n,
                                     flipped=second)
        depth = self._depth_at(out, padded, image_hw)
        if flipped is not None:
            depth = (depth + self._depth_at(flipped, padded, image_hw).flip(-1)) * 0.5
        for r, d in zip(results, depth):
            r["depth"] = d
        return results

    def _depth_at(self, out: dict[str, Any], padded: tuple[int, int], image_hw: tuple[int, int]) -> torch.Tensor:
        """``[B, h, w]`` depth of the unpadded images, clamped to ``dataset.depth_scale``."""
        depth = F.interpolate(out["pred_depths"].float(), size=padded, mode="bilinear", align_corners=False)
        return depth[:, 0, : image_hw[0], : image_hw[1]].clamp(0.0, self.spec.dataset.depth_scale)

    def update_metric(self, metric: DepthAwarePanopticQuality, out: dict[str, Any], batch: dict[str, Any],
                      depth_errors: DepthErrors, thing_counts: torch.Tensor | None = None,
                      flipped: dict[str, Any] | None = None) -> None:
        """Add one batch to the PQ metric, the depth errors and (``thing_counts``) the thing outcomes."""
        h, w = batch["image"].shape[-2:]
        results = self.predict_panoptic(out, (h, w), flipped)
        for i, r in enumerate(results):
            pan, segments = r["panoptic_seg"]
            sem, inst = panoptic_to_maps(pan.cpu(), segments)
            gt_sem = batch["sem_seg"][i].cpu()
            gt_inst = batch["inst_seg"][i].cpu().clamp_min(0)
            pred_depth, gt_depth = r["depth"].cpu(), batch["depth"][i].cpu()  # one host copy for both metrics
            plain = metric.update(sem, inst, gt_sem, gt_inst, pred_depth, gt_depth)  # plain PQ's matching
            depth_errors.update(pred_depth, gt_depth)
            if thing_counts is not None:
                for matching in plain:
                    thing_counts += thing_outcomes(details_2d(matching), self.stuff_ids)

    def _finish_eval(self, mode: str) -> None:
        metric = self.metrics[mode]
        metric.sync()
        kpi = kpis_from_metric(metric, mode)
        depth = self.depth_errors[mode]
        depth.sync()
        kpi.update(depth.kpis(mode))
        loss = self.trainer.callback_metrics.get(f"{mode}_loss")
        if loss is not None:
            kpi[f"{mode}_loss"] = float(loss)
        for key, value in kpi.items():
            if key != f"{mode}_loss" and isinstance(value, float) and math.isfinite(value):
                self.log(key, value, on_step=False, on_epoch=True, sync_dist=False, rank_zero_only=True)
        things = outcomes_dict(sum_over_ranks(self.thing_counts[mode].clone()))
        self.last_metrics = {"mode": mode, "kpi": kpi, "stats": metric.stats.clone(), "things": things}
        if self.status_callback is not None:
            self.status_callback.set_kpi(kpi)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record what the weights belong to (stage, preset, effective head sizes) next to them."""
        checkpoint["nvp3d"] = {"stage": "2d", "preset": self.spec.model.preset, "head": head_settings(self.spec),
                               "num_classes": self.model.num_classes}
        checkpoint["tao_model"] = "panoptic_recon_3d"
        # the resolved model spec and label space, so later actions need not repeat train-time model.* keys
        checkpoint[RECORD_KEY] = spec_record(self.spec, getattr(self, "label_classes", None))

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        return optimization_from_spec(self.model, self.spec.train.optim,
                                      "no trainable parameters: train.freeze froze the whole model",
                                      precision=self.spec.train.precision)
