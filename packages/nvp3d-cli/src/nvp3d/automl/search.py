"""The search loop: sample a trial's keys, train it rung by rung (promotion = resume with a larger budget),
report each rung to the pruner, and keep going when a trial fails.

Trial ``N`` lives in ``<automl_dir>/trial_NNN``: ``spec.yaml`` (base spec + sampled keys), ``train/`` (the
``nvp3d train`` results: checkpoints, status.json) and one ``rung_XXX.log`` per rung. Trials run in worker
threads, each holding a GPU slot (its ``CUDA_VISIBLE_DEVICES``) for the trial's lifetime.
"""

from __future__ import annotations

import json
import math
import queue
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from nvp3d.automl.space import SearchParam, sample
from nvp3d.automl.study import ATTR_CONTINUES, ATTR_FAIL_REASON, counts, finished, rung_budgets
from nvp3d.automl.trial_run import RungResult, run_rung
from nvp3d.config import ExperimentSpec, dump_spec, load_spec, spec_to_dict
from nvp3d.errors import SpecError
from nvp3d.status import StatusLogger


class TrialFailed(Exception):
    """A trial could not produce its metric (bad hyper-parameters, crash, NaN, OOM, timeout)."""


def gpu_slots(spec: ExperimentSpec) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each worker: ``""`` (CPU) per parallel trial when training on CPU, else
    disjoint groups of ``automl.gpus_per_trial`` GPUs from ``automl.gpu_ids`` (default ``train.gpu_ids``)."""
    automl = spec.automl
    if spec.train.num_gpus == 0 or automl.gpus_per_trial == 0:
        return [""] * automl.parallel_trials
    ids = list(automl.gpu_ids or spec.train.gpu_ids)
    size = automl.gpus_per_trial
    groups = [ids[i:i + size] for i in range(0, len(ids) - size + 1, size)]
    if not groups:
        raise SpecError(f"automl.gpus_per_trial: {size} GPUs per trial but only {len(ids)} listed in "
                        "automl.gpu_ids/train.gpu_ids; lower gpus_per_trial or list more GPUs")
    return [",".join(str(i) for i in group) for group in groups[:automl.parallel_trials]]


def _value_text(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class Search:
    """Runs the trials of one study from this process (other processes may share the study)."""

    def __init__(self, spec: ExperimentSpec, base_spec: Path, automl_dir: Path, study: optuna.Study,
                 params: Sequence[SearchParam], status: StatusLogger | None, say: Callable[[str], None]) -> None:
        self.spec = spec
        self.automl = spec.automl
        self.base_spec = base_spec
        self.automl_dir = automl_dir
        self.study = study
        self.params = list(params)
        self.status = status
        self.say = say
        self.rungs = rung_budgets(self.automl)
        self.base = spec_to_dict(spec)
        self.slots: queue.Queue[str | None] = queue.Queue()
        for slot in gpu_slots(spec):
            self.slots.put(slot)
        self.workers = self.slots.qsize()
        self.started = time.monotonic()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ one trial

    def _trial_dir(self, trial: optuna.Trial) -> Path:
        """``trial_NNN``; a retry of an interrupted trial takes over that trial's folder (and checkpoints)."""
        trial_dir = self.automl_dir / f"trial_{trial.number:03d}"
        source = trial.user_attrs.get(ATTR_CONTINUES)
        if source is not None and not trial_dir.exists():
            old = self.study.get_trials(deepcopy=False)[int(source)]
            old_dir = Path(old.user_attrs.get("trial_dir", self.automl_dir / f"trial_{int(source):03d}"))
            if old_dir.is_dir():
                shutil.move(str(old_dir), str(trial_dir))
                self.say(f"automl: trial {trial.number} continues interrupted trial {source} ({old_dir.name})")
        trial_dir.mkdir(parents=True, exist_ok=True)
        return trial_dir

    def _trial_spec(self, trial_dir: Path, values: dict[str, Any], slot: str | None) -> Path:
        """Write ``trial_dir/spec.yaml``: base spec + sampled values + the trial's folder and hardware."""
        ngpu = 0 if not slot else len(slot.split(","))
        overrides = [f"{key}={json.dumps(value)}" for key, value in values.items()]
        overrides += [f"train.results_dir={json.dumps(str(trial_dir / 'train'))}", "automl_policy=off",
                      f"train.optim.monitor_name={self.automl.metric}", f"train.num_epochs={self.rungs[-1]}",
                      f"train.num_gpus={ngpu}"]
        if ngpu:
            overrides.append(f"train.gpu_ids={list(range(ngpu))}")
        try:
            spec = load_spec(self.base_spec, overrides)
        except SpecError as exc:
            raise TrialFailed(f"bad hyper-parameters: {exc}") from None
        path = trial_dir / "spec.yaml"
        dump_spec(spec, path)
        return path

    def objective(self, trial: optuna.Trial) -> float:
        """Optuna objective: a GPU slot, the sampled spec, then the rungs. Failures become TrialFailed."""
        slot = self.slots.get()
        try:
            return self._run(trial, slot)
        except (TrialFailed, optuna.TrialPruned):
            raise
        except Exception as exc:  # noqa: BLE001 - one broken trial must not end the search
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            trial.set_user_attr(ATTR_FAIL_REASON, reason)
            raise TrialFailed(reason) from exc
        finally:
            self.slots.put(slot)

    def _run(self, trial: optuna.Trial, slot: str | None) -> float:
        trial_dir = self._trial_dir(trial)
        trial.set_user_attr("trial_dir", str(trial_dir))
        trial.set_user_attr("cuda_visible_devices", slot)
        values = sample(trial, self.params, self.base, self.rungs[-1])
        trial.set_user_attr("spec_params", values)
        try:
            spec_path = self._trial_spec(trial_dir, values, slot)
        except TrialFailed as exc:
            trial.set_user_attr(ATTR_FAIL_REASON, str(exc))
            raise
        trial.set_user_attr("spec", str(spec_path))
        records: list[dict[str, Any]] = []
        previous: float | None = None
        for index, budget in enumerate(self.rungs):
            result = run_rung(trial_dir, spec_path, budget, self.automl.metric, cuda_visible=slot,
                              timeout_s=self.automl.trial_timeout_s or None)
            record = self._rung_record(result, previous)
            records.append(record)
            trial.set_user_attr("rungs", records)
            if result.error or record["value"] is None:
                reason = result.error or f"{self.automl.metric} missing from {trial_dir / 'train'}/status.json"
                trial.set_user_attr(ATTR_FAIL_REASON, f"rung {budget} epochs: {reason}")
                raise TrialFailed(reason)
            previous = record["value"]
            trial.set_user_attr("checkpoint", result.checkpoint)
            trial.set_user_attr("epochs", budget)
            trial.report(previous, step=budget)
            if index < len(self.rungs) - 1 and trial.should_prune():
                trial.set_user_attr("pruned_at_epochs", budget)
                raise optuna.TrialPruned(f"pruned after {budget} epoch(s)")
        return float(previous)

    def _rung_record(self, result: RungResult, previous: float | None) -> dict[str, Any]:
        """The rung as recorded: a resume that trained nothing carries the previous rung's value forward."""
        record = result.as_dict()
        if result.error is None and not result.fresh:
            record["value"] = previous
            record["carried_forward"] = previous is not None
        else:
            record["carried_forward"] = False
        return record

    # ------------------------------------------------------------------------------------ the loop

    def _after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Progress line + status record per finished trial; stop once max_trials have finished."""
        with self._lock:
            c = counts(study)
            done = finished(c)
            best = self.best(study)
            state = trial.state.name
            rungs = trial.user_attrs.get("rungs", [])
            value = rungs[-1]["value"] if rungs else None
            detail = (f"{self.automl.metric}={_value_text(value)} after {trial.user_attrs.get('epochs', 0)} epoch(s)"
                      if value is not None else trial.user_attrs.get(ATTR_FAIL_REASON, "interrupted"))
            best_text = f"best trial {best.number}: {_value_text(best.value)}" if best else "no best yet"
            line = (f"automl: trial {trial.number} {state} {detail}; {best_text}; "
                    f"{done}/{self.automl.max_trials} done, {time.monotonic() - self.started:.0f} s")
            self.say(line)
            if self.status is not None:
                kpi = {f"best_{self.automl.metric}": best.value, "best_trial": best.number} if best else None
                self.status.running(line, kpi=kpi, trials_done=done, trial=trial.number, trial_state=state)
            if done >= self.automl.max_trials:
                study.stop()

    @staticmethod
    def best(study: optuna.Study) -> FrozenTrial | None:
        """Best COMPLETE trial (a full-budget run), or None."""
        complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if t.value is not None and math.isfinite(t.value)]
        if not complete:
            return None
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1.0
        return min(complete, key=lambda t: (sign * t.value, t.number))

    def run(self) -> None:
        """Run trials until ``automl.max_trials`` have finished in the study (waiting retries first)."""
        remaining = self.automl.max_trials - finished(counts(self.study))
        if remaining <= 0:
            self.say(f"automl: study already has {self.automl.max_trials} finished trials; nothing to run")
            return
        self.say(f"automl: {remaining} trial(s) to run, {self.workers} at a time, rungs {self.rungs} epoch(s)")
        self.study.optimize(self.objective, n_trials=remaining, n_jobs=self.workers, catch=(TrialFailed,),
                            callbacks=[self._after_trial], gc_after_trial=False, show_progress_bar=False)
