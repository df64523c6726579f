"""``nvp3d train`` for both stages: ``train(spec, results_dir, status)``.

``dataset.enable_3d: false`` trains the 2D stage, ``true`` the 3D stage on top of ``train.checkpoint_2d``.
Both go the same way: build the data module (fails early with a clear error when data is missing), the seeded
network and its LightningModule (weights from ``model.backbone.pretrained_model_path`` / ``train.checkpoint_2d``
/ ``train.checkpoint_3d`` unless resuming), the Trainer; resume from ``train.resume_training_checkpoint_path``
or automatically from the stage's latest pointer in ``results_dir``; write epoch records and KPIs to
``status.json``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from nvp3d.data.augmentation import augmentation_notices
from nvp3d.data.datamodule import NVP3DDataModule
from nvp3d.distributed import is_rank_zero
from nvp3d.fileio import atomic_write_text
from nvp3d.model.build import build_net2d, build_net3d, head_settings, load_weights_3d
from nvp3d.model.checkpoint import load_backbone_weights, load_stage_weights
from nvp3d.precision import tf32_matmul
from nvp3d.status import StatusLogger
from nvp3d.training.checkpointing import find_latest_checkpoint, latest_name
from nvp3d.training.module2d import PanopticModule2D
from nvp3d.training.module3d import PanopticModule3D
from nvp3d.training.resume_check import explain_load_error, verify_resume_checkpoint
from nvp3d.training.resume_notes import attach_resume_notes, report_nothing_trained
from nvp3d.training.signals import lightning_exit_as_interrupt
from nvp3d.training.status_callback import StatusCallback
from nvp3d.training.trainer import build_trainer, lightning_precision

__all__ = ["build_module", "fit_and_report", "has_validation_split", "resume_checkpoint", "run", "stage_of", "train"]

log = logging.getLogger("nvp3d.train")


def stage_of(spec: Any) -> str:
    """``"3d"`` when the spec trains/evaluates the 3D stage (``dataset.enable_3d``), else ``"2d"``."""
    return "3d" if spec.dataset.enable_3d else "2d"


def report_ignored_augmentation(spec: Any, status: StatusLogger | None, say=print) -> None:
    """Say (and record in status.json) which ``dataset.augmentation`` settings this run does not apply
    (:func:`nvp3d.data.augmentation.augmentation_notices`)."""
    found = augmentation_notices(spec)
    if not found:
        return
    message = f"dataset.augmentation {'; '.join(found)}: not applied"
    say(message)
    if status is not None:
        status.running(message + ".")


def has_validation_split(spec: Any) -> bool:
    """Whether the spec names a validation split (``dataset.val.base_dir``); without one, training runs with no
    validation (the toolkit requires it; a first run on one's own data often has no held-out split yet)."""
    return bool(spec.dataset.val.base_dir)


def resume_checkpoint(spec: Any, results_dir: Path, stage: str = "2d") -> Path | None:
    """The checkpoint to resume from: the spec's path, else the stage's latest pointer, else None."""
    path = spec.train.resume_training_checkpoint_path
    if path:
        p = Path(path)
        if p.suffix not in (".pth", ".ckpt", ".tlt"):
            raise ValueError(f"train.resume_training_checkpoint_path={path} must be a .pth checkpoint")
        if not p.is_file():
            raise FileNotFoundError(f"train.resume_training_checkpoint_path={path} does not exist")
        return verify_resume_checkpoint(p, "train.resume_training_checkpoint_path", stage)
    found = find_latest_checkpoint(results_dir, latest_name(stage))
    return found if found is None else verify_resume_checkpoint(found, "latest checkpoint", stage)


def build_module(spec: Any, datamodule: NVP3DDataModule, status_cb: StatusCallback | None = None, *,
                 load_weights: bool = True, say=print) -> PanopticModule2D | PanopticModule3D:
    """The seeded network of the spec's stage in its LightningModule; loads the start weights when asked
    (2D: ``model.backbone.pretrained_model_path``, ``train.checkpoint_2d``; 3D: ``train.checkpoint_2d`` and
    ``train.checkpoint_3d``)."""
    pl.seed_everything(spec.train.seed, workers=True, verbose=False)
    if stage_of(spec) == "3d":
        net3d = build_net3d(spec, datamodule.thing_ids, datamodule.stuff_ids)
        if load_weights:
            for report in load_weights_3d(net3d, spec):
                say(str(report))
        return PanopticModule3D(spec, net3d, datamodule.classes(), datamodule.stuff_ids, status_callback=status_cb)
    net2d = build_net2d(spec)
    if load_weights and spec.model.backbone.pretrained_model_path:
        say(str(load_backbone_weights(net2d, spec.model.backbone.pretrained_model_path)))
    if load_weights and spec.train.checkpoint_2d:
        say(str(load_stage_weights(net2d, spec.train.checkpoint_2d, "2d", "train.checkpoint_2d")))
    if spec.train.checkpoint_3d:
        say("train.checkpoint_3d is ignored by the 2D stage (dataset.enable_3d: false)")
    module = PanopticModule2D(spec, datamodule.thing_ids, datamodule.stuff_ids, model=net2d, status_callback=status_cb)
    module.label_classes = datamodule.classes()  # recorded in the checkpoints (nvp3d.model.provenance)
    return module


def train(spec: Any, results_dir: str | Path, status: StatusLogger | None, *, say=print,
          enable_progress_bar: bool = True, callbacks: list[pl.Callback] | None = None,
          cache_data: bool = False) -> dict[str, Any]:
    """Train the spec's stage; returns the last validation KPIs plus ``train_loss`` (also in ``status.json``).

    ``callbacks`` are added to the trainer (tests use them to record losses or simulate a crash);
    ``cache_data`` keeps decoded samples in memory (small datasets: the demo), loading in the main process.
    """
    stage = stage_of(spec)
    lightning_precision(spec.train.precision)  # validate before any heavy work
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    if status is not None and not is_rank_zero():
        status.enabled = False
    ckpt = resume_checkpoint(spec, results, stage)
    if stage == "3d" and ckpt is None and not spec.train.checkpoint_2d:
        raise ValueError("train.checkpoint_2d is empty: the 3D stage (dataset.enable_3d: true) trains on top of a "
                         "trained 2D stage; set it to the 2D run's panoptic_recon_3d_model_latest.pth")
    if stage == "2d" and is_rank_zero():  # the sizes the preset chose, next to the checkpoints
        atomic_write_text(results / "model_effective.json", json.dumps(
            {"preset": spec.model.preset, **head_settings(spec)}, indent=1) + "\n")
    report_ignored_augmentation(spec, status, say)
    validate = has_validation_split(spec)
    if not validate:
        message = ("dataset.val.base_dir is empty: training without validation (set dataset.val.base_dir and "
                   "json_path to validate every train.validation_interval epochs)")
        say(message)
        if status is not None:
            status.running(message + ".")
    datamodule = NVP3DDataModule(spec, splits=("train", "val") if validate else ("train",), cache=cache_data)
    datamodule.setup("fit")
    status_cb = StatusCallback(status)
    module = build_module(spec, datamodule, status_cb, load_weights=ckpt is None, say=say)
    trainer = build_trainer(spec, results, extra_callbacks=[status_cb, *(callbacks or [])],
                            latest_name=latest_name(stage), enable_progress_bar=enable_progress_bar, validate=validate)
    with tf32_matmul(spec.train.allow_tf32):  # for this run only
        return fit_and_report(trainer, module, datamodule, ckpt, status, say=say, finite_only=stage == "3d")


def fit_and_report(trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule,
                   ckpt: Path | None, status: StatusLogger | None, *, say=print,
                   finite_only: bool = False) -> dict[str, Any]:
    """``trainer.fit`` (resuming from ``ckpt`` when given) and the final KPIs of either stage.

    The KPIs are the module's last validation ``kpi`` (with ``finite_only``: only its finite float values)
    plus ``train_loss`` (the last epoch mean); they are also written to ``status.json`` on rank zero.
    """
    if ckpt is not None:
        say(f"resuming from {ckpt}")
        if status is not None:
            status.running(f"Resuming from {ckpt}.")
    attach_resume_notes(trainer, module, status, say)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    except RuntimeError as exc:  # a resume into a model of other sizes: one line, exit 2
        friendly = explain_load_error(exc, ckpt)
        if friendly is None:
            raise
        raise friendly from exc
    except SystemExit as exc:  # Lightning turns Ctrl-C outside the training loop into exit 1
        raise lightning_exit_as_interrupt(trainer, exc) from None
    report_nothing_trained(trainer, ckpt, status, say)
    kpi = dict(module.last_metrics.get("kpi", {}))
    if finite_only:
        kpi = {k: v for k, v in kpi.items() if isinstance(v, float) and math.isfinite(v)}
    loss = trainer.callback_metrics.get("train_loss_epoch")
    if loss is not None:
        kpi["train_loss"] = float(loss)
    if status is not None and trainer.is_global_zero:
        status.running("Train finished successfully.", kpi=kpi or None)
    return kpi


def run(spec: Any, results_dir: Path, status: StatusLogger) -> dict[str, Any]:
    """The ``train`` action (either stage)."""
    return train(spec, results_dir, status)
