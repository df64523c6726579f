"""``nvp3d evaluate`` for both stages: ``evaluate(spec, results_dir, status)``.

Runs ``dataset.test`` through the network loaded from ``evaluate.checkpoint``:

* 2D stage (``dataset.enable_3d: false``): PQ and depth-aware PQ (thresholds -1/0.5/0.25/0.1, thing/stuff
  splits) as KPIs in ``status.json`` and, with per-class tables and ``things`` (where the GT things ended up
  under plain PQ's matching), in ``<results_dir>/metrics_2d.json``.
* 3D stage (``dataset.enable_3d: true``; the checkpoint holds both stages' weights): PRQ/RSQ/RRQ as KPIs and,
  with per-class rows, the thing/stuff split, the raw statistics and the evaluation settings, in
  ``<results_dir>/metrics_3d.json`` (with ``things``: where the GT things ended up,
  :mod:`nvp3d.evaluation.thing_outcomes`).

Both files are written atomically, by rank 0 only in a multi-process run (every rank holds the gathered
statistics).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from nvp3d.data.datamodule import NVP3DDataModule
from nvp3d.distributed import is_rank_zero
from nvp3d.evaluation.pq2d import format_table, per_class_table
from nvp3d.evaluation.prq3d import format_table_3d
from nvp3d.evaluation.semantic_voxels import format_semantic_summary
from nvp3d.evaluation.thing_outcomes import format_outcomes
from nvp3d.fileio import write_json
from nvp3d.model.build import build_net2d, build_net3d
from nvp3d.model.checkpoint import load_stage_weights
from nvp3d.status import StatusLogger
from nvp3d.training.module2d import PanopticModule2D
from nvp3d.training.module3d import PanopticModule3D
from nvp3d.training.trainer import device_setup, lightning_precision

__all__ = ["METRICS_FILENAME", "METRICS_FILENAME_3D", "evaluate", "evaluate_module", "run", "with_test_batch_size"]

METRICS_FILENAME = "metrics_2d.json"
METRICS_FILENAME_3D = "metrics_3d.json"


def with_test_batch_size(spec: Any, batch_size: int) -> Any:
    """``spec`` with ``dataset.test.batch_size`` replaced by ``batch_size`` (``evaluate.batch_size``) when it
    is positive, else ``spec`` unchanged."""
    if batch_size <= 0:
        return spec
    test = spec.dataset.test.model_copy(update={"batch_size": batch_size})
    return spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"test": test})})


def evaluate_module(spec: Any, module: pl.LightningModule, datamodule: pl.LightningDataModule,
                    enable_progress_bar: bool = False) -> dict[str, Any]:
    """Run ``trainer.test`` on the test split (devices from ``evaluate``) and return ``module.last_metrics``
    (either stage's module: ``{"kpi": ..., "stats": ...}`` and, for the 3D stage, its PRQ tables)."""
    ev = spec.evaluate
    # use_distributed_sampler=False: the data module already shards frames over ranks (each frame once);
    # Lightning's wrapper would shard the shards again and pad with repeated frames.
    trainer = pl.Trainer(**device_setup(ev.num_gpus, list(ev.gpu_ids), 1), logger=False, enable_checkpointing=False,
                         enable_progress_bar=enable_progress_bar, enable_model_summary=False,
                         precision=lightning_precision(spec.train.precision), use_distributed_sampler=False)
    trainer.test(module, datamodule=datamodule, verbose=False, weights_only=True)  # nothing unpickles code
    return module.last_metrics


def _checkpoint(spec: Any) -> str:
    ckpt = spec.evaluate.checkpoint
    if not ckpt:
        which = ("a .pth written by nvp3d train with dataset.enable_3d: true (e.g. nvpanoptix3d_model_latest.pth)"
                 if spec.dataset.enable_3d else "a .pth written by nvp3d train")
        raise ValueError(f"evaluate.checkpoint is empty: set it to {which}")
    return ckpt


def evaluate(spec: Any, results_dir: str | Path, status: StatusLogger | None, *, say=print,
             enable_progress_bar: bool = False, module_hook: Any = None) -> dict[str, Any]:
    """Evaluate ``evaluate.checkpoint`` on ``dataset.test`` (the spec's stage); returns the KPIs.

    ``module_hook(module)`` is called before testing (tests use it to keep the 3D stage's fused volumes).
    """
    ckpt = _checkpoint(spec)
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    spec = with_test_batch_size(spec, spec.evaluate.batch_size)
    datamodule = NVP3DDataModule(spec, splits=("test",))
    datamodule.setup("test")
    if spec.dataset.enable_3d:
        net3d = build_net3d(spec, datamodule.thing_ids, datamodule.stuff_ids)
        for stage in ("2d", "3d"):
            say(str(load_stage_weights(net3d, ckpt, stage, "evaluate.checkpoint")))
        module: pl.LightningModule = PanopticModule3D(spec, net3d, datamodule.classes(), datamodule.stuff_ids)
    else:
        net2d = build_net2d(spec)
        say(str(load_stage_weights(net2d, ckpt, "2d", "evaluate.checkpoint")))
        module = PanopticModule2D(spec, datamodule.thing_ids, datamodule.stuff_ids, model=net2d)
    if module_hook is not None:
        module_hook(module)
    metrics = evaluate_module(spec, module, datamodule, enable_progress_bar)
    report = _report_3d if spec.dataset.enable_3d else _report_2d
    return report(spec, ckpt, module, datamodule, metrics, results, status, say)


def _report_2d(spec: Any, ckpt: str, module: PanopticModule2D, datamodule: NVP3DDataModule,
               metrics: dict[str, Any], results: Path, status: StatusLogger | None, say) -> dict[str, Any]:
    kpi = dict(metrics["kpi"])
    names = datamodule.datasets["test"].base.labels.names
    classes = sorted(set(module.thing_ids) | set(module.stuff_ids))
    tables = {str(t): per_class_table(metrics["stats"][i], classes, names)
              for i, t in enumerate(module.metrics["test"].thresholds)}
    payload = {"checkpoint": str(ckpt), "split": "test", "frames": len(datamodule.datasets["test"]),
               "kpi": kpi, "per_class": tables, "things": metrics.get("things")}
    if not is_rank_zero():  # every rank holds the gathered statistics; one writes and reports them
        return kpi
    write_json(results / METRICS_FILENAME, payload)
    say(format_table(tables["-1.0"]))
    say("PQ {:.1f} (things {:.1f}, stuff {:.1f}); depth-aware PQ@0.1 {:.1f}".format(
        kpi["PQ"], kpi["PQ_th"], kpi["PQ_st"], kpi.get("test_dpq_0.1", math.nan)))
    say("depth: MAE {:.3f} m, RMSE {:.3f} m, AbsRel {:.3f}, delta<1.25 {:.1f} %".format(
        *(kpi.get(f"test_depth_{k}", math.nan) for k in ("mae", "rmse", "abs_rel", "delta1"))))
    if metrics.get("things"):
        say(format_outcomes(metrics["things"], match_iou=0.5))
    if status is not None:
        status.running("Evaluation metrics generated.", kpi=kpi)
    return kpi


def _report_3d(spec: Any, ckpt: str, module: PanopticModule3D, datamodule: NVP3DDataModule,
               metrics: dict[str, Any], results: Path, status: StatusLogger | None, say) -> dict[str, Any]:
    kpi = dict(metrics["kpi"])
    finite = {k: v for k, v in kpi.items() if math.isfinite(v)}
    if not is_rank_zero():
        return finite
    ds = spec.dataset
    grid = spec.model.frustum3d.grid_dimensions
    payload = {
        "checkpoint": str(ckpt), "split": "test", "frames": len(datamodule.datasets["test"]), "kpi": kpi,
        "per_class": metrics["per_class"], "summary": metrics["summary"], "things": metrics.get("things"),
        "semantic": metrics.get("semantic"),
        "stats": {"columns": ["iou", "tp", "fp", "fn", "n"], "rows": metrics["stats"].tolist()},
        "settings": {"grid": grid, "downsample_factor": ds.downsample_factor, "eval_grid": grid // ds.downsample_factor,
                     "iso_value_gt": ds.iso_value, "iso_value_pred": spec.model.frustum3d.iso_recon_value,
                     "matching_threshold": 0.25},
    }
    write_json(results / METRICS_FILENAME_3D, payload)
    say(format_table_3d(metrics["per_class"]))
    say("PRQ {:.1f} RSQ {:.1f} RRQ {:.1f} (things PRQ {:.1f}, stuff PRQ {:.1f})".format(
        kpi["PRQ"], kpi["RSQ"], kpi["RRQ"], kpi["PRQ_th"], kpi["PRQ_st"]))
    if metrics.get("things"):
        say(format_outcomes(metrics["things"]))
    if metrics.get("semantic"):
        say(format_semantic_summary(metrics["semantic"]))
    if status is not None:
        status.running("Evaluation metrics generated.", kpi={k: kpi[k] for k in ("PRQ", "RSQ", "RRQ")})
    return finite


def run(spec: Any, results_dir: Path, status: StatusLogger) -> dict[str, Any]:
    """The ``evaluate`` action (either stage)."""
    return evaluate(spec, results_dir, status)
