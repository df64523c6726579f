"""The Optuna study of a search: storage, sampler and pruner per algorithm, rungs, and crash recovery.

Storage is an embedded SQLite file under the AutoML results folder unless ``automl.storage`` names another
SQLAlchemy URL (``postgresql://user:pw@host/db``), which workers on several nodes share. A trial that was
running when its search process died is failed (recorded as interrupted, without ``fail_reason``) and
re-enqueued with the same parameters; the retry takes over the trial's folder, so its training resumes from
the last checkpoint instead of starting again.
"""

from __future__ import annotations

import logging
import random
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from nvp3d.config.automl_spec import AutoMLSpec, default_direction
from nvp3d.errors import SpecError

log = logging.getLogger("nvp3d.automl")

MULTI_FIDELITY = ("hyperband", "asha", "bohb")

#: User attributes of a trial (see also nvp3d.automl.search).
ATTR_CONTINUES = "continues_trial"
ATTR_FAIL_REASON = "fail_reason"
ATTR_INTERRUPTED = "interrupted"


def direction_of(spec: AutoMLSpec) -> str:
    """``automl.direction``, with ``auto`` resolved from the metric name."""
    return default_direction(spec.metric) if spec.direction == "auto" else spec.direction


def rung_budgets(spec: AutoMLSpec) -> list[int]:
    """Epoch budgets a trial climbs: min, min*eta, ... capped by max (multi-fidelity); else just max."""
    if spec.algorithm not in MULTI_FIDELITY:
        return [spec.max_epochs]
    budgets, budget = [], spec.min_epochs
    while budget < spec.max_epochs:
        budgets.append(budget)
        budget *= spec.reduction_factor
    return [*budgets, spec.max_epochs]


def make_sampler(algorithm: str, seed: int, parallel: int) -> optuna.samplers.BaseSampler:
    """TPE for bayesian/bohb (constant liar when trials run in parallel), random for the others."""
    if algorithm in ("bayesian", "bohb"):
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=parallel > 1,
                                          n_startup_trials=5)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(spec: AutoMLSpec) -> optuna.pruners.BasePruner:
    """Async successive halving (asha), Hyperband (hyperband, bohb), or none, on epoch rungs."""
    if spec.algorithm == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.min_epochs,
                                                      reduction_factor=spec.reduction_factor)
    if spec.algorithm in ("hyperband", "bohb"):
        return optuna.pruners.HyperbandPruner(min_resource=spec.min_epochs, max_resource=spec.max_epochs,
                                              reduction_factor=spec.reduction_factor)
    return optuna.pruners.NopPruner()


def storage_url(spec: AutoMLSpec, automl_dir: Path) -> str:
    """``automl.storage`` or the default SQLite file ``<automl_dir>/study.db``; a plain ``postgresql://``
    URL is given the installed psycopg (v3) driver (SQLAlchemy would otherwise look for psycopg2)."""
    url = spec.storage or f"sqlite:///{(automl_dir / 'study.db').resolve()}"
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            url = "postgresql+psycopg://" + url[len(plain):]
    return url


def is_local(url: str) -> bool:
    """True for SQLite: one search process owns the study (shared studies need a server database)."""
    return url.startswith("sqlite")


def redact(url: str) -> str:
    """The URL without its password, for logs and result files."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - unparsable URLs are reported by open_study
        return url.split("@")[-1]


def _retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Re-enqueue an interrupted trial with its parameters; the retry continues in the same folder."""
    attrs = {ATTR_CONTINUES: trial.number, **({"default_spec": True} if trial.user_attrs.get("default_spec") else {})}
    study.enqueue_trial(trial.params, user_attrs=attrs)
    log.warning("automl: trial %d was interrupted; re-enqueued to continue from its checkpoint", trial.number)


def _storage(url: str, heartbeat_s: int) -> optuna.storages.BaseStorage:
    if is_local(url):
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    with warnings.catch_warnings():  # heartbeats are marked experimental by Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
            heartbeat_stale_trial_callback=_retry, engine_kwargs={"pool_pre_ping": True},
        )


def _create(spec: AutoMLSpec, url: str, direction: str, attempts: int = 5) -> optuna.Study:
    """Open the storage and create-or-load the study; workers starting together race to create the tables
    and the study, so an integrity error is retried. Anything else is a storage problem for the user."""
    for attempt in range(attempts):
        try:
            return optuna.create_study(storage=_storage(url, spec.heartbeat_s), study_name=spec.study_name,
                                       direction=direction, load_if_exists=True, pruner=make_pruner(spec))
        except Exception as exc:  # noqa: BLE001 - mapped to a one-line spec error below
            racing = "IntegrityError" in type(exc).__name__ or isinstance(exc, optuna.exceptions.DuplicatedStudyError)
            if racing and attempt + 1 < attempts:
                time.sleep(0.5 + random.random())
                continue
            raise SpecError(f"automl.storage: cannot open {redact(url)} ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]}); check the URL, server and driver") from exc
    raise AssertionError("unreachable")


def open_study(spec: AutoMLSpec, automl_dir: Path, parallel: int) -> optuna.Study:
    """Create or load the study; its sampler is seeded with ``seed + trials so far`` so that a resumed
    search does not propose the same parameters again."""
    url = storage_url(spec, automl_dir)
    direction = direction_of(spec)
    study = _create(spec, url, direction)
    if study.direction.name.lower() != direction:
        raise SpecError(f"automl.direction: study '{spec.study_name}' in {redact(url)} optimises "
                        f"{study.direction.name.lower()}, not {direction}; use another automl.study_name")
    recorded = study.user_attrs.get("metric")
    if recorded is not None and recorded != spec.metric:
        raise SpecError(f"automl.metric: study '{spec.study_name}' optimises {recorded}, not {spec.metric}; "
                        "use another automl.study_name or automl.results_dir")
    study.set_user_attr("metric", spec.metric)
    study.set_user_attr("algorithm", spec.algorithm)
    study.sampler = make_sampler(spec.algorithm, spec.seed + len(study.trials), parallel)
    return study


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Fail every RUNNING trial of a local study (its process is gone: we hold the folder lock) and
    re-enqueue it; returns their numbers. Shared studies do this through heartbeats instead."""
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, ATTR_INTERRUPTED, True)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        _retry(study, trial)
        recovered.append(trial.number)
    return recovered


def counts(study: optuna.Study) -> dict[str, int]:
    """Finished trials by outcome; interrupted trials (retried elsewhere) are not counted as failed."""
    out = {"complete": 0, "pruned": 0, "failed": 0, "interrupted": 0, "running": 0, "waiting": 0}
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.COMPLETE:
            out["complete"] += 1
        elif trial.state == TrialState.PRUNED:
            out["pruned"] += 1
        elif trial.state == TrialState.FAIL:
            out["failed" if ATTR_FAIL_REASON in trial.user_attrs else "interrupted"] += 1
        elif trial.state == TrialState.RUNNING:
            out["running"] += 1
        elif trial.state == TrialState.WAITING:
            out["waiting"] += 1
    return out


def finished(c: dict[str, Any]) -> int:
    """Trials that count towards ``automl.max_trials``."""
    return int(c["complete"] + c["pruned"] + c["failed"])
