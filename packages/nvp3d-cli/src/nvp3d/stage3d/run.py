"""Actions of the 3D stage: ``train_3d`` (``nvp3d train`` with ``dataset.enable_3d: true``) and ``evaluate_3d``
(``nvp3d evaluate`` with ``dataset.enable_3d: true``).

``train_3d`` builds the 3D data module, the network (2D weights from ``train.checkpoint_2d``, frozen; optional
3D weights from ``train.checkpoint_3d``), the 2D stage's Trainer machinery (periodic atomic checkpoints with
the toolkit names and the ``nvpanoptix3d_model_latest.pth`` pointer, exact resume, CSV/TensorBoard logs, DDP,
bf16) and trains; validation writes PRQ/RSQ/RRQ KPIs to ``status.json``.

``evaluate_3d`` loads ``evaluate.checkpoint`` (a 3D-stage checkpoint: both stages' weights), runs the test
split and writes KPIs to ``status.json`` and per-class rows, the thing/stuff split and the evaluation settings
to ``<results_dir>/metrics_3d.json``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from nvp3d.distributed import is_rank_zero
from nvp3d.inference.writers import write_json
from nvp3d.lightning.status_callback import StatusCallback
from nvp3d.lightning.trainer import LATEST_NAME_3D, build_trainer, lightning_precision
from nvp3d.model.checkpoint import load_stage_weights
from nvp3d.run_evaluate import evaluate_module, finite_or_none, with_test_batch_size
from nvp3d.run_train import fit_and_report, report_ignored_augmentation, resume_checkpoint
from nvp3d.stage3d.builder import build_model_3d, load_weights_3d
from nvp3d.stage3d.data import NVP3DDataModule3D
from nvp3d.stage3d.module import PanopticModule3D

__all__ = ["METRICS_FILENAME_3D", "build_module_3d", "evaluate_3d", "evaluate_module_3d", "format_table_3d",
           "train_3d"]

METRICS_FILENAME_3D = "metrics_3d.json"


def _require_3d(spec: Any, action: str) -> None:
    if not spec.dataset.enable_3d:
        raise ValueError(f"{action} of the 3D stage needs dataset.enable_3d: true")


def build_module_3d(spec: Any, datamodule: NVP3DDataModule3D, status_cb: StatusCallback | None = None, *,
                    load_weights: bool = True, say=print) -> PanopticModule3D:
    """Seeded 3D network + LightningModule; loads ``checkpoint_2d`` / ``checkpoint_3d`` when asked."""
    pl.seed_everything(spec.train.seed, workers=True, verbose=False)
    model = build_model_3d(spec, datamodule.thing_ids, datamodule.stuff_ids)
    if load_weights:
        for report in load_weights_3d(model, spec):
            say(str(report))
    return PanopticModule3D(spec, model, datamodule.classes(), datamodule.stuff_ids, status_callback=status_cb)


def train_3d(spec: Any, results_dir: str | Path, status: Any, *, say=print, enable_progress_bar: bool = True,
             callbacks: list[pl.Callback] | None = None, cache_data: bool = False) -> dict[str, Any]:
    """Train the 3D stage; returns the last validation KPIs (also written to ``status.json``)."""
    _require_3d(spec, "training")
    lightning_precision(spec.train.precision)
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    if status is not None and not is_rank_zero():
        status.enabled = False
    ckpt = resume_checkpoint(spec, results, LATEST_NAME_3D)
    if ckpt is None and not spec.train.checkpoint_2d:
        raise ValueError("train.checkpoint_2d is empty: the 3D stage (dataset.enable_3d: true) trains on top of a "
                         "trained 2D stage; set it to the 2D run's panoptic_recon_3d_model_latest.pth")
    report_ignored_augmentation(spec, status, say)
    datamodule = NVP3DDataModule3D(spec, splits=("train", "val"), cache=cache_data)
    datamodule.setup("fit")
    status_cb = StatusCallback(status)
    module = build_module_3d(spec, datamodule, status_cb, load_weights=ckpt is None, say=say)
    trainer = build_trainer(spec, results, extra_callbacks=[status_cb, *(callbacks or [])],
                            latest_name=LATEST_NAME_3D, enable_progress_bar=enable_progress_bar)
    return fit_and_report(trainer, module, datamodule, ckpt, status, say=say, finite_only=True)


def evaluate_module_3d(spec: Any, module: PanopticModule3D, datamodule: NVP3DDataModule3D,
                       enable_progress_bar: bool = False) -> dict[str, Any]:
    """``trainer.test`` of ``module`` on the test split; returns its ``last_metrics``."""
    return evaluate_module(spec, module, datamodule, enable_progress_bar)


def format_table_3d(rows: list[dict[str, Any]]) -> str:
    """Plain-text per-class PRQ table (counted classes)."""
    lines = [f"{'class':<12} {'PRQ':>6} {'RSQ':>6} {'RRQ':>6} {'TP':>4} {'FP':>4} {'FN':>4} {'N':>4}"]
    for r in rows:
        if r["counted"]:
            lines.append(f"{r['name'][:12]:<12} {r['PRQ']:6.1f} {r['RSQ']:6.1f} {r['RRQ']:6.1f} {r['TP']:4d} "
                         f"{r['FP']:4d} {r['FN']:4d} {r['N']:4d}")
    return "\n".join(lines)


def evaluate_3d(spec: Any, results_dir: str | Path, status: Any, *, say=print, enable_progress_bar: bool = False,
                module_hook: Any = None) -> dict[str, Any]:
    """Evaluate the 3D checkpoint ``evaluate.checkpoint`` on ``dataset.test``; returns the KPIs.

    ``module_hook(module)`` is called before testing (tests use it to keep the fused volumes).
    """
    _require_3d(spec, "evaluation")
    ckpt = spec.evaluate.checkpoint
    if not ckpt:
        raise ValueError("evaluate.checkpoint is empty: set it to a .pth written by nvp3d train with "
                         "dataset.enable_3d: true (e.g. nvpanoptix3d_model_latest.pth)")
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    spec = with_test_batch_size(spec, spec.evaluate.batch_size)
    datamodule = NVP3DDataModule3D(spec, splits=("test",))
    datamodule.setup("test")
    model = build_model_3d(spec, datamodule.thing_ids, datamodule.stuff_ids)
    for stage in ("2d", "3d"):
        say(str(load_stage_weights(model, ckpt, stage, "evaluate.checkpoint")))
    module = PanopticModule3D(spec, model, datamodule.classes(), datamodule.stuff_ids)
    if module_hook is not None:
        module_hook(module)
    metrics = evaluate_module_3d(spec, module, datamodule, enable_progress_bar)
    kpi = dict(metrics["kpi"])
    ds = spec.dataset
    grid = spec.model.frustum3d.grid_dimensions
    payload = {
        "checkpoint": str(ckpt), "split": "test", "frames": len(datamodule.datasets["test"]), "kpi": kpi,
        "per_class": metrics["per_class"], "summary": metrics["summary"],
        "stats": {"columns": ["iou", "tp", "fp", "fn", "n"], "rows": metrics["stats"].tolist()},
        "settings": {"grid": grid, "downsample_factor": ds.downsample_factor, "eval_grid": grid // ds.downsample_factor,
                     "iso_value_gt": ds.iso_value, "iso_value_pred": spec.model.frustum3d.iso_recon_value,
                     "matching_threshold": 0.25},
    }
    if not is_rank_zero():  # every rank holds the gathered statistics; one writes and reports them
        return {k: v for k, v in kpi.items() if math.isfinite(v)}
    write_json(results / METRICS_FILENAME_3D, finite_or_none(payload))
    say(format_table_3d(metrics["per_class"]))
    say("PRQ {:.1f} RSQ {:.1f} RRQ {:.1f} (things PRQ {:.1f}, stuff PRQ {:.1f})".format(
        kpi["PRQ"], kpi["RSQ"], kpi["RRQ"], kpi["PRQ_th"], kpi["PRQ_st"]))
    if status is not None:
        status.running("Evaluation metrics generated.", kpi={k: kpi[k] for k in ("PRQ", "RSQ", "RRQ")})
    return {k: v for k, v in kpi.items() if math.isfinite(v)}
