"""``nvp3d evaluate`` (2D stage): ``evaluate(spec, results_dir, status)``.

Runs ``dataset.test`` through the model loaded from ``evaluate.checkpoint`` and writes PQ and depth-aware
PQ (thresholds -1/0.5/0.25/0.1, with thing/stuff splits) to ``status.json`` as KPIs and, with per-class
tables, to ``<results_dir>/metrics_2d.json`` (atomic write).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from nvp3d.distributed import is_rank_zero
from nvp3d.errors import NotBuiltYetError
from nvp3d.fileio import atomic_write_text
from nvp3d.lightning.datamodule import NVP3DDataModule
from nvp3d.lightning.module import PanopticModule2D, per_class_table
from nvp3d.lightning.trainer import device_setup, lightning_precision
from nvp3d.model.builder import build_model
from nvp3d.model.checkpoint import load_stage_weights
from nvp3d.model.presets import get_preset
from nvp3d.run_train import stage3d_entry
from nvp3d.status import StatusLogger

METRICS_FILENAME = "metrics_2d.json"


def with_test_batch_size(spec: Any, batch_size: int) -> Any:
    """``spec`` with ``dataset.test.batch_size`` replaced by ``batch_size`` (``evaluate.batch_size``) when it
    is positive, else ``spec`` unchanged."""
    if batch_size <= 0:
        return spec
    test = spec.dataset.test.model_copy(update={"batch_size": batch_size})
    return spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"test": test})})


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text per-class table (PQ SQ RQ TP FP FN)."""
    lines = [f"{'class':<12} {'PQ':>6} {'SQ':>6} {'RQ':>6} {'TP':>4} {'FP':>4} {'FN':>4}"]
    for r in rows:
        lines.append(f"{r['name'][:12]:<12} {r['PQ']:6.1f} {r['SQ']:6.1f} {r['RQ']:6.1f} {r['TP']:4d} {r['FP']:4d} "
                     f"{r['FN']:4d}")
    return "\n".join(lines)


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
    trainer.test(module, datamodule=datamodule, verbose=False)
    return module.last_metrics


def evaluate(spec: Any, results_dir: str | Path, status: StatusLogger | None, *, say=print,
             enable_progress_bar: bool = False) -> dict[str, Any]:
    """Evaluate ``evaluate.checkpoint`` on ``dataset.test``; returns the KPIs."""
    if spec.dataset.enable_3d:
        raise NotBuiltYetError("evaluating the 3D stage (PRQ; dataset.enable_3d: true)")
    ckpt = spec.evaluate.checkpoint
    if not ckpt:
        raise ValueError("evaluate.checkpoint is empty: set it to a .pth written by nvp3d train")
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    spec = with_test_batch_size(spec, spec.evaluate.batch_size)
    datamodule = NVP3DDataModule(spec, occupancy_bins=get_preset(spec.model.preset).occupancy_bins, splits=("test",))
    datamodule.setup("test")
    model = build_model(spec)
    report = load_stage_weights(model, ckpt, "2d", "evaluate.checkpoint")
    say(str(report))
    module = PanopticModule2D(spec, datamodule.thing_ids, datamodule.stuff_ids, model=model)
    metrics = evaluate_module(spec, module, datamodule, enable_progress_bar)
    kpi = dict(metrics["kpi"])
    names = datamodule.datasets["test"].base.labels.names
    classes = sorted(set(module.thing_ids) | set(module.stuff_ids))
    tables = {str(t): per_class_table(metrics["stats"][i], classes, names)
              for i, t in enumerate(module.metrics["test"].thresholds)}
    payload = {"checkpoint": str(ckpt), "split": "test", "frames": len(datamodule.datasets["test"]),
               "kpi": kpi, "per_class": tables}
    if not is_rank_zero():  # every rank holds the gathered statistics; one writes and reports them
        return kpi
    atomic_write_text(results / METRICS_FILENAME, json.dumps(finite_or_none(payload), indent=1) + "\n")
    say(format_table(tables["-1.0"]))
    say("PQ {:.1f} (things {:.1f}, stuff {:.1f}); depth-aware PQ@0.1 {:.1f}".format(
        kpi["PQ"], kpi["PQ_th"], kpi["PQ_st"], kpi.get("test_dpq_0.1", math.nan)))
    if status is not None:
        status.running("Evaluation metrics generated.", kpi=kpi)
    return kpi


def finite_or_none(value: Any) -> Any:
    """NaN/inf -> None so the metrics file is strict JSON."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run(spec: Any, results_dir: Path, status: StatusLogger) -> dict[str, Any]:
    """Action-registry entry point: the 2D stage here, the 3D stage (``dataset.enable_3d: true``) in
    ``nvp3d.stage3d.evaluate_3d`` when that module is installed."""
    if spec.dataset.enable_3d:
        return stage3d_entry("evaluate_3d", "evaluating the 3D stage")(spec, results_dir, status)
    return evaluate(spec, results_dir, status)

