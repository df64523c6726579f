"""Results of a search, written atomically into the AutoML folder:

- ``automl_results.json``: settings, counts, the best trial, and every trial (params, metric per rung, state,
  checkpoint, failure reason);
- ``leaderboard.csv``: one row per trial, best first;
- ``best_spec.yaml``: the best trial's spec, runnable with ``nvp3d train -e best_spec.yaml`` (retrains it
  into ``<automl_dir>/best/train``);
- ``optimization_history.png`` and ``rungs.png``: metric per trial (with the best so far) and per rung.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from nvp3d.automl.study import ATTR_CONTINUES, ATTR_FAIL_REASON, counts, redact
from nvp3d.config import dump_spec, load_spec
from nvp3d.fileio import atomic_write_text

RESULTS_JSON = "automl_results.json"
LEADERBOARD_CSV = "leaderboard.csv"
BEST_SPEC = "best_spec.yaml"
HISTORY_PNG = "optimization_history.png"
RUNGS_PNG = "rungs.png"


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def trial_row(trial: FrozenTrial) -> dict[str, Any]:
    """One trial as recorded in the results (the state, its rungs, params, checkpoint and reason)."""
    rungs = trial.user_attrs.get("rungs", [])
    state = trial.state.name
    if state == "FAIL" and ATTR_FAIL_REASON not in trial.user_attrs:
        state = "INTERRUPTED"
    last = next((r for r in reversed(rungs) if r.get("value") is not None and not r.get("error")), None)
    return {
        "trial": trial.number,
        "state": state,
        "value": _finite(last["value"]) if last else None,
        "epochs": last["epochs"] if last else None,
        "step": last.get("step") if last else None,
        "checkpoint": last.get("checkpoint") if last else None,
        "metric_per_rung": {str(r["epochs"]): _finite(r.get("value")) for r in rungs},
        "carried_forward_rungs": [r["epochs"] for r in rungs if r.get("carried_forward")],
        "params": trial.user_attrs.get("spec_params", {}),
        "reason": trial.user_attrs.get(ATTR_FAIL_REASON) or (
            f"pruned after {trial.user_attrs['pruned_at_epochs']} epoch(s)" if "pruned_at_epochs" in trial.user_attrs
            else None),
        "continues_trial": trial.user_attrs.get(ATTR_CONTINUES),
        "default_spec": bool(trial.user_attrs.get("default_spec")),
        "trial_dir": trial.user_attrs.get("trial_dir"),
        "spec": trial.user_attrs.get("spec"),
        "rungs": rungs,
        "seconds": round(trial.duration.total_seconds(), 2) if trial.duration else None,
    }


def _sort_key(row: dict[str, Any], minimize: bool) -> tuple:
    order = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "FAIL": 3, "INTERRUPTED": 4, "WAITING": 5}
    value = row["value"]
    return (order.get(row["state"], 9), value is None, (value if minimize else -value) if value is not None else 0,
            row["trial"])


def write_best_spec(automl_dir: Path, best: dict[str, Any]) -> Path:
    """``best_spec.yaml``: the best trial's spec with its budget, retraining into ``<automl_dir>/best``."""
    spec = load_spec(best["spec"], [f"train.num_epochs={best['epochs']}", "train.results_dir=null",
                                    f"results_dir={json.dumps(str(automl_dir / 'best'))}", "automl_policy=off"])
    header = (f"# Best AutoML trial {best['trial']}: {best['value']} after {best['epochs']} epoch(s).\n"
              f"# Retrain: nvp3d train -e {automl_dir / BEST_SPEC}\n")
    return atomic_write_text(automl_dir / BEST_SPEC, header + dump_spec(spec))


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_plots(automl_dir: Path, rows: list[dict[str, Any]], metric: str, minimize: bool) -> list[Path]:
    """The optimisation history (metric per trial, best so far) and the rungs (metric vs epochs per trial)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"COMPLETE": "tab:blue", "PRUNED": "tab:orange", "FAIL": "tab:red", "INTERRUPTED": "tab:gray"}
    ordered = sorted(rows, key=lambda r: r["trial"])
    fig, ax = plt.subplots(figsize=(7, 4))
    best, best_x, best_y = None, [], []
    for row in ordered:
        if row["value"] is None:
            continue
        ax.scatter(row["trial"], row["value"], color=colors.get(row["state"], "black"), label=row["state"])
        if row["state"] == "COMPLETE":
            best = row["value"] if best is None else (min if minimize else max)(best, row["value"])
        if best is not None:
            best_x.append(row["trial"])
            best_y.append(best)
    if best_x:
        ax.step(best_x, best_y, where="post", color="tab:green", label="best complete so far")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        ax.legend(unique.values(), unique.keys())
    ax.set(xlabel="trial", ylabel=metric, title="AutoML optimisation history")
    history = automl_dir / HISTORY_PNG
    _atomic_write_bytes(history, _png(fig))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in ordered:
        points = [(int(e), v) for e, v in row["metric_per_rung"].items() if v is not None]
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", color=colors.get(row["state"], "black"), alpha=0.8)
            ax.annotate(str(row["trial"]), (xs[-1], ys[-1]), fontsize=7)
    ax.set(xlabel="epochs (rung budget)", ylabel=metric, title="AutoML rungs (blue: complete, orange: pruned, red: failed)")
    rungs = automl_dir / RUNGS_PNG
    _atomic_write_bytes(rungs, _png(fig))
    plt.close(fig)
    return [history, rungs]


def write_results(automl_dir: Path, study: optuna.Study, settings: dict[str, Any], storage: str,
                  wall_s: float) -> dict[str, Any]:
    """Write every result file; return the summary (also the final KPI source)."""
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    rows = sorted((trial_row(t) for t in study.get_trials(deepcopy=False)), key=lambda r: _sort_key(r, minimize))
    complete = [r for r in rows if r["state"] == TrialState.COMPLETE.name and r["value"] is not None]
    best = complete[0] if complete else None
    summary = {
        "study": study.study_name, "storage": redact(storage), "direction": "minimize" if minimize else "maximize",
        **settings, "counts": counts(study), "wall_time_s": round(wall_s, 1), "best": None, "trials": rows,
    }
    default = next((r for r in rows if r["default_spec"]), None)
    summary["default_trial"] = {k: default[k] for k in ("trial", "state", "value", "epochs")} if default else None
    if best is not None:
        summary["best"] = {k: best[k] for k in ("trial", "value", "epochs", "step", "checkpoint", "params", "spec")}
        summary["best"]["spec_yaml"] = str(write_best_spec(automl_dir, best))
    atomic_write_text(automl_dir / RESULTS_JSON, json.dumps(summary, indent=1) + "\n")
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["rank", "trial", "state", settings["metric"], "epochs", "step", "metric_per_rung", "params",
                     "checkpoint", "reason"])
    for rank, row in enumerate(rows, 1):
        writer.writerow([rank, row["trial"], row["state"], row["value"], row["epochs"], row["step"],
                         json.dumps(row["metric_per_rung"]), json.dumps(row["params"]), row["checkpoint"],
                         row["reason"] or ""])
    atomic_write_text(automl_dir / LEADERBOARD_CSV, out.getvalue())
    summary["plots"] = [str(p) for p in write_plots(automl_dir, rows, settings["metric"], minimize)]
    return summary
