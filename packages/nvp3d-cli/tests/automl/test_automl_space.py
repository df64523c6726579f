"""AutoML metadata and search space: it matches the pydantic spec, the generated schema and skill_info carry
it, sampling honours the conditions, and bad automl settings are one-line spec errors."""

from __future__ import annotations

import io
import json
from collections import Counter

import optuna
import pytest
import yaml
from nvp3d.automl.command import automl_requested, run_automl
from nvp3d.automl.space import (
    DEFAULT_PARAMETERS,
    DISABLED_PARAMETERS,
    PARAMS,
    SEARCH_SPACE,
    apply_ranges,
    sample,
    select_parameters,
)
from nvp3d.automl.study import rung_budgets, storage_url
from nvp3d.automl.trial_run import read_metric
from nvp3d.config import ExperimentSpec, iter_spec_keys, load_spec, spec_to_dict
from nvp3d.config.automl_spec import AutoMLSpec
from nvp3d.errors import SpecError

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _ovr(key, value) -> str:
    return f"{key}={json.dumps(value)}"


@pytest.mark.parametrize("param", SEARCH_SPACE, ids=lambda p: p.key)
def test_search_space_matches_the_spec(param) -> None:
    keys = {key for key, is_section in iter_spec_keys() if not is_section}
    assert param.key in keys
    if param.kind == "categorical":
        for option in param.options:
            assert load_spec(None, [_ovr(param.key, option)])  # every option is a valid value
        assert len(param.weights) == len(param.options) and all(w > 0 for w in param.weights)
    elif param.kind == "int_list":
        assert load_spec(None, [_ovr(param.key, [1, 2])])
    else:
        for bound in (param.low, param.high):
            value = int(bound) if param.kind == "int" else bound
            assert load_spec(None, [_ovr(param.key, value)])  # both bounds pass the spec's own validation


def test_disabled_keys_exist_and_are_not_searchable() -> None:
    keys = {key for key, _ in iter_spec_keys()}
    assert set(DISABLED_PARAMETERS) <= keys
    assert not set(DISABLED_PARAMETERS) & set(PARAMS)
    assert "train.num_epochs" in DISABLED_PARAMETERS  # the budget is set per rung


def test_train_schema_carries_automl_metadata(repo_root) -> None:
    schema = json.loads((repo_root / "schemas" / "train.schema.json").read_text())
    assert schema["automl_default_parameters"] == list(DEFAULT_PARAMETERS)
    assert "train.optim.lr" in schema["automl_default_parameters"]
    assert schema["automl_disabled_parameters"] == list(DISABLED_PARAMETERS)
    assert "train.optim.lr" in schema["automl_popular_parameters"]
    assert (schema["automl_metric"], schema["automl_direction"]) == ("train_loss", "minimize")
    lr = schema["$defs"]["OptimSpec"]["properties"]["lr"]
    assert (lr["valid_min"], lr["valid_max"], lr["automl_enabled"], lr["log_scale"]) == (1e-6, 1e-2, True, True)
    sched = schema["automl_parameters"]["train.optim.lr_scheduler"]
    assert sched["valid_options"] == ["MultiStep", "WarmupPoly"] and sched["option_weights"] == [0.6, 0.4]
    warmup = schema["$defs"]["OptimSpec"]["properties"]["warmup_iters"]
    assert warmup["math_cond"] == "train.optim.warmup_iters < train.optim.max_steps"
    assert warmup["depends_on"] == ["train.optim.lr_scheduler in [WarmupPoly]"]
    assert "train.num_epochs" in schema["automl_parameters"]["train.optim.milestones"]["math_cond"]
    assert schema["$defs"]["TrainSpec"]["properties"]["num_epochs"]["automl_enabled"] is False
    # SplitSpec is shared by train/val/test: the batch size is annotated only in the top-level map
    assert "automl_enabled" not in schema["$defs"]["SplitSpec"]["properties"]["batch_size"]
    assert schema["automl_parameters"]["dataset.train.batch_size"]["valid_options"] == [1, 2, 4, 8]
    evaluate = json.loads((repo_root / "schemas" / "evaluate.schema.json").read_text())
    assert "automl_default_parameters" not in evaluate


def test_skill_info_declares_automl(repo_root) -> None:
    info = yaml.safe_load((repo_root / "references" / "skill_info.yaml").read_text())
    assert info["automl_enabled"] is True and info["dataset_type"] == "nvpanoptix3d"
    assert info["dataset_formats"] == ["front3d", "matterport"]
    assert (info["automl"]["monitoring_metric"], info["automl"]["direction"]) == ("train_loss", "minimize")


def test_sampling_respects_conditions_and_weights() -> None:
    params = select_parameters(None, add=["train.optim.lr_scheduler", "train.optim.warmup_iters"])
    base = spec_to_dict(load_spec(None, ["train.optim.max_steps=50"]))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    schedulers = Counter()
    for _ in range(300):
        trial = study.ask()
        values = sample(trial, params, base, budget=5)
        study.tell(trial, 0.0)
        schedulers[values["train.optim.lr_scheduler"]] += 1
        assert 1e-6 <= values["train.optim.lr"] <= 1e-2
        if values["train.optim.lr_scheduler"] == "MultiStep":
            milestones = values["train.optim.milestones"]
            assert all(0 < m < 5 for m in milestones) and milestones == sorted(set(milestones))
            assert "train.optim.warmup_iters" not in values
        else:
            assert 0 <= values["train.optim.warmup_iters"] < 50  # warmup < max_steps
            assert "train.optim.milestones" not in values
    assert 0.5 < schedulers["MultiStep"] / 300 < 0.7  # weight 0.6


def test_selection_and_range_errors_name_the_key() -> None:
    with pytest.raises(SpecError, match="'train.num_epochs' cannot be searched"):
        select_parameters(["train.num_epochs"])
    with pytest.raises(SpecError, match="'train.optim.lrr' is not a searchable key"):
        select_parameters(None, add=["train.optim.lrr"])
    spec = AutoMLSpec.model_validate({"ranges": {"train.optim.lr": {"min": 1e-7}}})
    with pytest.raises(SpecError, match=r"automl.ranges.train.optim.lr: .* inside the valid range"):
        apply_ranges(select_parameters(None), spec.ranges)
    spec = AutoMLSpec.model_validate({"ranges": {"train.optim.lr": {"min": 1e-4, "max": 1e-3}}})
    narrowed = {p.key: p for p in apply_ranges(select_parameters(None), spec.ranges)}
    assert (narrowed["train.optim.lr"].low, narrowed["train.optim.lr"].high) == (1e-4, 1e-3)


@pytest.mark.parametrize("override, message", [
    ("automl.algorithm=grid", "automl.algorithm: Input should be"),
    ("automl.parameters=[train.seed]", "'train.seed' cannot be searched"),
    ("automl.max_epochs=0", "automl.max_epochs"),
    ("automl.ranges={train.optim.gamma: {min: 0.9, max: 0.1}}", "min 0.9 is above max 0.1"),
])
def test_bad_automl_settings_exit_2_with_one_line(tmp_path, override, message) -> None:
    err = io.StringIO()
    code = run_automl(None, [f"results_dir={tmp_path}", override], out=io.StringIO(), err=err)
    assert code == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("nvp3d automl: error:")
    assert not (tmp_path / "automl").exists()  # nothing written for a bad spec


def test_policy_and_defaults(tmp_path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("automl_policy: on\n")  # YAML 1.1 reads a bare on as true
    assert load_spec(spec_file).automl_policy == "on"
    assert automl_requested(str(spec_file), []) is True
    assert automl_requested(str(spec_file), ["automl_policy=off"]) is False
    assert automl_requested(None, ["automl_policy=on"]) is True
    assert ExperimentSpec().automl_policy == "off"
    assert rung_budgets(AutoMLSpec(algorithm="asha", min_epochs=1, max_epochs=9)) == [1, 3, 9]
    assert rung_budgets(AutoMLSpec(algorithm="hyperband", min_epochs=2, max_epochs=10)) == [2, 6, 10]
    assert rung_budgets(AutoMLSpec(algorithm="bayesian", max_epochs=4)) == [4]
    assert storage_url(AutoMLSpec(storage="postgresql://u@h/db"), tmp_path) == "postgresql+psycopg://u@h/db"
    assert storage_url(AutoMLSpec(), tmp_path).endswith("/study.db")


def test_metric_is_fresh_only_after_the_last_start(tmp_path) -> None:
    status = tmp_path / "status.json"
    first = [{"status": "STARTED"}, {"status": "RUNNING", "kpi": {"train_loss": 3.0}, "epoch": 0}]
    status.write_text("".join(json.dumps(r) + "\n" for r in first))
    assert read_metric(status, "train_loss") == (3.0, True)
    status.write_text(status.read_text() + json.dumps({"status": "STARTED"}) + "\n"
                      + json.dumps({"status": "SUCCESS"}) + "\n")
    assert read_metric(status, "train_loss") == (None, False)  # a resume that trained nothing


def test_failure_reason_is_the_error_line() -> None:
    from nvp3d.automl.trial_run import failure_reason

    log = "Epoch 1:  50%|#  | 1/2 [00:00, train_loss_step=inf]nvp3d train: error: data error: bad matrix\n"
    assert failure_reason(log, 4) == "nvp3d train: error: data error: bad matrix"
    assert failure_reason("RuntimeError: CUDA out of memory. Tried", 1).startswith("out of memory (OOM)")
    assert failure_reason("", -9) == "killed by signal SIGKILL"


def test_default_params_reproduce_the_base_spec() -> None:
    from nvp3d.automl.space import default_params

    params = select_parameters(None, add=["train.optim.lr_scheduler"])
    base = spec_to_dict(load_spec(None, ["train.optim.lr=2e-3", "train.optim.milestones=[7]",
                                         "train.optim.backbone_multiplier=1.0"]))
    study = optuna.create_study()
    study.enqueue_trial(default_params(params, base, budget=9))
    values = sample(study.ask(), params, base, budget=9)
    assert values["train.optim.lr"] == pytest.approx(2e-3)
    assert values["train.optim.backbone_multiplier"] == pytest.approx(1.0)
    assert values["train.optim.weight_decay"] == pytest.approx(base["train"]["optim"]["weight_decay"])
    assert values["train.optim.gamma"] == pytest.approx(base["train"]["optim"]["gamma"])
    assert values["train.optim.lr_scheduler"] == "MultiStep" and values["train.optim.milestones"] == [7]
