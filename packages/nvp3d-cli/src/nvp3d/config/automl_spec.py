"""``automl`` section and the ``automl_policy`` switch: hyper-parameter search over ``nvp3d train`` runs.

``nvp3d automl -e spec.yaml`` (or ``nvp3d train -e spec.yaml automl_policy=on``) reads this section. The
search itself lives in :mod:`nvp3d.automl`; this module only declares and validates the keys, so that the
spec, the JSON schema and the templates stay generated from one place.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from nvp3d.config.base import StrictModel

#: Search algorithms: sampler + pruner pairs (see nvp3d.automl.study).
AUTOML_ALGORITHMS = ("bayesian", "random", "hyperband", "asha", "bohb")



def _on_off(value: Any) -> Any:
    """YAML 1.1 reads a bare ``on``/``off`` as a boolean: map it back to the policy word."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value.strip().lower() if isinstance(value, str) else value


AutoMLPolicy = Annotated[Literal["on", "off"], BeforeValidator(_on_off)]


class RangeOverride(StrictModel):
    """Narrower (or different) search range of one searched key; unset fields keep the schema's values."""

    min: float | None = Field(None, description="Lower bound (inside the key's valid range).")
    max: float | None = Field(None, description="Upper bound (inside the key's valid range).")
    log: bool | None = Field(None, description="Sample on a log scale (needs min > 0).")
    options: list[str | int | float | bool] | None = Field(
        None, description="Allowed values of an enum key (a subset of its valid options)."
    )

    @model_validator(mode="after")
    def _ordered(self) -> RangeOverride:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}; swap them")
        return self


class AutoMLSpec(StrictModel):
    """Hyper-parameter search: each trial is a real ``nvp3d train`` run in its own folder and process."""

    algorithm: Literal["bayesian", "random", "hyperband", "asha", "bohb"] = Field(
        "bohb",
        description="bayesian (TPE), random, hyperband (random + Hyperband), asha (random + async successive "
        "halving) or bohb (TPE + Hyperband).",
    )
    metric: str = Field("train_loss", description="KPI of the trial's status.json to optimise (e.g. train_loss, "
                        "val_loss, PQ, PRQ; validation KPIs need validation to run).")
    direction: Literal["minimize", "maximize", "auto"] = Field(
        "auto", description="auto: minimize for *loss* metrics, maximize otherwise (PQ, PRQ)."
    )
    max_trials: int = Field(12, ge=1, description="Trials of the study in total (over restarts and workers).")
    max_epochs: int = Field(9, ge=1, description="Largest training budget of a trial in epochs (the top rung).")
    min_epochs: int = Field(1, ge=1, description="Smallest budget (the first rung) of the multi-fidelity algorithms.")
    reduction_factor: int = Field(3, ge=2, description="Rung growth factor and kept fraction 1/eta (hyperband, "
                                  "asha, bohb).")
    parallel_trials: int = Field(1, ge=1, description="Trials run at the same time by this process.")
    gpus_per_trial: int = Field(1, ge=0, description="GPUs per trial (CUDA_VISIBLE_DEVICES slice; 0 = CPU).")
    gpu_ids: list[int] | None = Field(None, description="GPUs the workers share (default: train.gpu_ids).")
    parameters: list[str] | None = Field(
        None, description="Dotted keys to search (default: the schema's automl_default_parameters)."
    )
    add_parameters: list[str] = Field(default_factory=list, description="Keys searched on top of the default set.")
    remove_parameters: list[str] = Field(default_factory=list, description="Keys dropped from the default set.")
    ranges: dict[str, RangeOverride] = Field(default_factory=dict, description="Per-key overrides of the range.")
    include_default: bool = Field(True, description="Run the spec's own values of the searched keys as the first "
                                  "trial (the baseline the search must beat).")
    seed: int = Field(0, ge=0, description="Sampler seed.")
    storage: str = Field("", description="Optuna storage URL; empty = sqlite:///<automl results dir>/study.db. "
                         "A postgresql://... URL lets workers on several nodes share one study.")
    study_name: str = Field("nvp3d_automl", min_length=1, description="Study name inside the storage.")
    trial_timeout_s: int = Field(0, ge=0, description="Kill a trial's train run after this many seconds (0 = no "
                                 "limit); the trial is recorded as failed.")
    heartbeat_s: int = Field(60, ge=1, description="Trial heartbeat interval of a shared (RDB) study; a trial "
                             "silent for 2x this long is failed and retried by another worker.")
    results_dir: str | None = Field(None, description="Output folder (default: <results_dir>/automl).")

    @model_validator(mode="after")
    def _rungs(self) -> AutoMLSpec:
        if self.min_epochs > self.max_epochs:
            raise ValueError(f"min_epochs {self.min_epochs} is above max_epochs {self.max_epochs}; lower min_epochs")
        return self


def default_direction(metric: str) -> str:
    """``minimize`` for loss-like metrics, ``maximize`` for quality metrics (PQ, PRQ, ...)."""
    return "minimize" if "loss" in metric.lower() else "maximize"
