"""``nvp3d automl -e spec.yaml [automl.key=value ...]`` and ``nvp3d train ... automl_policy=on``.

Order of events: load and check the spec (exit 2 on a bad key, before anything is written) -> create
``<results_dir>/automl`` and take its lock (SQLite studies) -> write ``experiment.yaml`` and ``base_spec.yaml``
-> open or resume the study -> run trials -> write the results -> final SUCCESS record with the best KPI.
Running the same command again continues the same study: finished trials are kept, interrupted ones resume.
"""

from __future__ import annotations

import fcntl
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import yaml

from nvp3d.automl.report import write_results
from nvp3d.automl.search import Search, gpu_slots
from nvp3d.automl.space import apply_ranges, default_params, select_parameters
from nvp3d.automl.study import (
    direction_of,
    is_local,
    open_study,
    recover_interrupted,
    rung_budgets,
    storage_url,
)
from nvp3d.config import dump_spec, load_spec, read_spec_file, resolve_results_dir, spec_to_dict
from nvp3d.errors import ExitCode, SpecError
from nvp3d.runner import EXPERIMENT_FILENAME, report_error
from nvp3d.status import STATUS_FILENAME, status_run

BASE_SPEC = "base_spec.yaml"
LOCK_FILE = ".automl.lock"


def automl_requested(spec_path: str | None, overrides: Sequence[str]) -> bool:
    """True when ``automl_policy`` is ``on`` in the overrides (last one wins) or else in the spec file.

    A cheap peek for ``nvp3d train``; any problem reading the spec returns False, and ``nvp3d train`` then
    reports it the usual way."""
    for text in reversed(list(overrides)):
        key, _, value = text.partition("=")
        if key.strip() == "automl_policy":
            return str(yaml.safe_load(value or "off")).lower() in ("on", "true")
    if spec_path is None:
        return False
    try:
        value = read_spec_file(spec_path).get("automl_policy", "off")
    except (OSError, ValueError):
        return False
    return str(value).lower() in ("on", "true")


@contextmanager
def folder_lock(automl_dir: Path) -> Iterator[None]:
    """Exclusive lock on the AutoML folder (released by the kernel even on kill -9)."""
    handle = (automl_dir / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SpecError(f"another nvp3d automl is running in {automl_dir}; wait for it, or share one study across "
                        "processes with automl.storage=postgresql://...") from None
    try:
        yield
    finally:
        handle.close()


def run_automl(spec_path: str | Path | None, overrides: Sequence[str] = (), *, verbose: bool = False,
               out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run (or continue) the search described by the spec's ``automl`` section; return the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    prefix = "nvp3d automl"

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    import optuna

    # our progress line per trial replaces Optuna's own (which repeats every parameter and traceback)
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.ERROR)
    try:
        spec = load_spec(spec_path, overrides)
        automl = spec.automl
        params = apply_ranges(select_parameters(automl.parameters, automl.add_parameters, automl.remove_parameters),
                              automl.ranges)
        gpu_slots(spec)  # GPU layout errors before anything is written
        automl_dir = resolve_results_dir(spec, "automl")
        automl_dir.mkdir(parents=True, exist_ok=True)
    except SpecError as exc:
        return int(report_error(prefix, exc, verbose=verbose, err=err))
    except OSError as exc:
        return int(report_error(prefix, SpecError(f"cannot create the AutoML folder ({exc}); set results_dir or "
                                                  "automl.results_dir to a writable folder"), verbose=verbose, err=err))
    url = storage_url(automl, automl_dir)
    try:
        with folder_lock(automl_dir) if is_local(url) else _nothing():
            dump_spec(spec, automl_dir / EXPERIMENT_FILENAME)
            trial_base = spec.model_copy(deep=True)
            trial_base.automl_policy = "off"
            base_spec = automl_dir / BASE_SPEC
            dump_spec(trial_base, base_spec)
            say(f"{prefix}: results dir {automl_dir}; {automl.algorithm}, {automl.metric} "
                f"({direction_of(automl)}), {automl.max_trials} trials, keys: {', '.join(p.key for p in params)}")
            with status_run(automl_dir / STATUS_FILENAME, "Starting automl.", "automl finished successfully.") as status:
                started = time.monotonic()
                study = open_study(automl, automl_dir, parallel=len(gpu_slots(spec)))
                if is_local(url):
                    recovered = recover_interrupted(study)
                    if recovered:
                        say(f"{prefix}: resuming; interrupted trial(s) {recovered} will continue from their "
                            "checkpoints")
                if automl.include_default and not study.trials:
                    study.enqueue_trial(default_params(params, spec_to_dict(spec), rung_budgets(automl)[-1]),
                                        user_attrs={"default_spec": True}, skip_if_exists=True)
                search = Search(spec, base_spec, automl_dir, study, params, status, say)
                search.run()
                settings = {"algorithm": automl.algorithm, "metric": automl.metric, "max_trials": automl.max_trials,
                            "rungs": rung_budgets(automl), "parameters": [p.key for p in params],
                            "command": " ".join(["nvp3d", "automl", "-e", str(spec_path), *overrides])}
                summary = write_results(automl_dir, study, settings, url, time.monotonic() - started)
                best = summary["best"]
                kpi = {**{f"trials_{k}": v for k, v in summary["counts"].items()}, "wall_time_s": summary["wall_time_s"]}
                if best:
                    kpi.update({f"best_{automl.metric}": best["value"], "best_trial": best["trial"],
                                "best_epochs": best["epochs"], "best_checkpoint": best["checkpoint"]})
                    say(f"{prefix}: best trial {best['trial']}: {automl.metric}={best['value']:.6g} after "
                        f"{best['epochs']} epoch(s); spec {best['spec_yaml']}; checkpoint {best['checkpoint']}")
                else:
                    say(f"{prefix}: no trial completed its full budget; see {automl_dir / 'leaderboard.csv'}")
                status.success("automl finished successfully.", kpi=kpi)
    except BaseException as exc:  # noqa: BLE001 - every outcome maps to an exit code
        if isinstance(exc, SystemExit):
            raise
        return int(report_error(prefix, exc, verbose=verbose, err=err))
    say(f"{prefix}: finished; results in {automl_dir}")
    return int(ExitCode.OK)


@contextmanager
def _nothing() -> Iterator[None]:
    yield

