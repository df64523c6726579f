"""The search loop with a stand-in train rung (seconds): pruning, promotion through the rungs, failed trials
recorded with their reason, carried-forward metrics, recovery of an interrupted trial, and the result files."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter

import optuna
import pytest
import yaml
from nvp3d.automl.command import run_automl
from nvp3d.automl.trial_run import RungResult
from nvp3d.status import read_status

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _run(spec, *overrides) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_automl(spec, list(overrides), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_asha_prunes_promotes_and_records_failures(tmp_path, spec_writer, fake_rung) -> None:
    spec = spec_writer(tmp_path / "spec.yaml", tmp_path / "res", max_trials=10, seed=3)
    code, out, err = _run(spec)
    assert code == 0, err
    automl = tmp_path / "res" / "automl"
    results = json.loads((automl / "automl_results.json").read_text())
    states = Counter(r["state"] for r in results["trials"])
    assert sum(states.values()) == 10 and states["PRUNED"] >= 1 and states["COMPLETE"] >= 1
    assert results["rungs"] == [1, 3, 9]
    promoted = [r for r in results["trials"] if r["state"] == "COMPLETE"]
    for row in promoted:  # climbed every rung, step growing, each value fresh
        assert [r["epochs"] for r in row["rungs"]] == [1, 3, 9]
        steps = [r["step"] for r in row["rungs"]]
        assert steps == sorted(steps) and steps[0] < steps[-1]
        assert all(r["fresh"] and not r["carried_forward"] for r in row["rungs"])
    for row in (r for r in results["trials"] if r["state"] == "PRUNED"):
        assert row["reason"].startswith("pruned after") and row["epochs"] < 9
    failed = [r for r in results["trials"] if r["state"] == "FAIL"]
    for row in failed:  # the stand-in fails high learning rates: the reason is kept, the search went on
        assert row["params"]["train.optim.lr"] > 3e-3 and "loss is NaN" in row["reason"]
    assert results["default_trial"]["trial"] == 0  # the spec's own values run first: the baseline
    default = next(r for r in results["trials"] if r["trial"] == 0)
    assert default["params"]["train.optim.lr"] == pytest.approx(2e-4) and default["default_spec"]
    best = results["best"]
    assert best["value"] == min(r["value"] for r in promoted)
    assert best["checkpoint"].endswith("model_epoch_008_step_00018.pth")
    best_spec = yaml.safe_load((automl / "best_spec.yaml").read_text())
    assert best_spec["train"]["optim"]["lr"] == pytest.approx(best["params"]["train.optim.lr"])
    assert best_spec["train"]["num_epochs"] == 9 and best_spec["automl_policy"] == "off"
    assert best_spec["results_dir"] == str(automl / "best") and best_spec["train"]["results_dir"] is None
    rows = list(csv.DictReader((automl / "leaderboard.csv").open()))
    assert len(rows) == 10 and rows[0]["trial"] == str(best["trial"]) and rows[0]["state"] == "COMPLETE"
    for png in ("optimization_history.png", "rungs.png"):
        assert (automl / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = read_status(automl / "status.json")
    assert records[0]["status"] == "STARTED" and records[-1]["status"] == "SUCCESS"
    assert sum(1 for r in records if "trial_state" in r) == 10  # one record per finished trial
    assert records[-1]["kpi"]["best_train_loss"] == best["value"]
    assert out.count("automl: trial ") == 10  # one progress line per finished trial
    assert len([c for c in fake_rung if c[1] == 1]) == 10  # every trial ran its first rung once


def test_rerun_continues_the_study(tmp_path, spec_writer, fake_rung) -> None:
    spec = spec_writer(tmp_path / "spec.yaml", tmp_path / "res", max_trials=3)
    assert _run(spec)[0] == 0
    first = list(fake_rung)
    code, out, _ = _run(spec, "automl.max_trials=5")
    assert code == 0
    new = fake_rung[len(first):]
    assert {name for name, _ in new} == {"trial_003", "trial_004"}  # finished trials are not re-run
    results = json.loads((tmp_path / "res" / "automl" / "automl_results.json").read_text())
    assert len(results["trials"]) == 5
    params = [json.dumps(r["params"], sort_keys=True) for r in results["trials"]]
    assert len(set(params)) == 5  # the resumed sampler does not repeat earlier proposals
    assert "nothing to run" in _run(spec, "automl.max_trials=5")[1]


def test_interrupted_trial_is_retried_in_its_folder(tmp_path, spec_writer, fake_rung) -> None:
    spec = spec_writer(tmp_path / "spec.yaml", tmp_path / "res", max_trials=3, algorithm="random", max_epochs=2)
    automl = tmp_path / "res" / "automl"
    automl.mkdir(parents=True)
    study = optuna.create_study(storage=f"sqlite:///{automl / 'study.db'}", study_name="nvp3d_automl")
    ghost = study.ask({"train.optim.lr": optuna.distributions.FloatDistribution(1e-6, 1e-2, log=True)})
    ghost.set_user_attr("trial_dir", str(automl / "trial_000"))
    (automl / "trial_000" / "train").mkdir(parents=True)
    (automl / "trial_000" / "train" / "marker").write_text("checkpoint of the killed run")
    code, out, err = _run(spec)  # the process that ran trial 0 died (kill -9): trial 0 is still RUNNING
    assert code == 0, err
    assert "interrupted trial(s) [0]" in out
    results = json.loads((automl / "automl_results.json").read_text())
    by_number = {r["trial"]: r for r in results["trials"]}
    assert by_number[0]["state"] == "INTERRUPTED"
    retry = next(r for r in results["trials"] if r["continues_trial"] == 0)
    assert retry["params"]["train.optim.lr"] == pytest.approx(ghost.params["train.optim.lr"])
    assert (automl / f"trial_{retry['trial']:03d}" / "train" / "marker").is_file()  # took over the folder
    assert results["counts"]["interrupted"] == 1 and sum(
        results["counts"][k] for k in ("complete", "pruned", "failed")) == 3


def test_resume_without_fresh_metric_carries_the_previous_rung(tmp_path, spec_writer, monkeypatch) -> None:
    import nvp3d.automl.search as search

    def stale_top_rung(trial_dir, spec_path, epochs, metric, **kwargs):
        if epochs == 1:
            return RungResult(epochs=1, returncode=0, seconds=0.0, value=2.5, fresh=True, step=2)
        return RungResult(epochs=epochs, returncode=0, seconds=0.0, value=None, fresh=False, step=2)

    monkeypatch.setattr(search, "run_rung", stale_top_rung)
    spec = spec_writer(tmp_path / "spec.yaml", tmp_path / "res", max_trials=1, max_epochs=3)
    assert _run(spec)[0] == 0
    row = json.loads((tmp_path / "res" / "automl" / "automl_results.json").read_text())["trials"][0]
    assert row["state"] == "COMPLETE" and row["value"] == 2.5
    assert row["carried_forward_rungs"] == [3] and row["rungs"][1]["carried_forward"] is True


def test_gpu_slots_split_the_gpus() -> None:
    from nvp3d.automl.search import gpu_slots
    from nvp3d.config import load_spec
    from nvp3d.errors import SpecError

    spec = load_spec(None, ["train.gpu_ids=[0,1,2,3]", "automl.parallel_trials=4", "automl.gpus_per_trial=2"])
    assert gpu_slots(spec) == ["0,1", "2,3"]
    assert gpu_slots(load_spec(None, ["train.num_gpus=0", "automl.parallel_trials=2"])) == ["", ""]
    with pytest.raises(SpecError, match="automl.gpus_per_trial"):
        gpu_slots(load_spec(None, ["automl.gpus_per_trial=2"]))



def test_train_with_policy_on_runs_the_search(tmp_path, spec_writer, fake_rung) -> None:
    from nvp3d.cli import app
    from typer.testing import CliRunner

    spec = spec_writer(tmp_path / "spec.yaml", tmp_path / "res", max_trials=2, max_epochs=1, algorithm="random")
    result = CliRunner().invoke(app, ["train", "-e", str(spec), "automl_policy=on"])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "res" / "automl" / "automl_results.json").read_text())
    assert results["counts"]["complete"] + results["counts"]["failed"] == 2
    assert not (tmp_path / "res" / "train").exists()  # the trials trained, not a plain train run
    trial_spec = yaml.safe_load((tmp_path / "res" / "automl" / "trial_000" / "spec.yaml").read_text())
    assert trial_spec["automl_policy"] == "off" and trial_spec["train"]["optim"]["monitor_name"] == "train_loss"


@pytest.mark.parametrize("algorithm", ["hyperband", "bohb", "bayesian", "random"])
def test_every_algorithm_finishes(tmp_path, spec_writer, fake_rung, algorithm) -> None:
    spec = spec_writer(tmp_path / "spec.yaml", tmp_path / "res", max_trials=8, algorithm=algorithm, seed=5)
    code, _, err = _run(spec)
    assert code == 0, err
    results = json.loads((tmp_path / "res" / "automl" / "automl_results.json").read_text())
    states = Counter(r["state"] for r in results["trials"])
    assert sum(states.values()) == 8 and states["COMPLETE"] >= 1
    budgets = {c[1] for c in fake_rung}
    if algorithm in ("hyperband", "bohb"):
        assert budgets == {1, 3, 9} and states["PRUNED"] >= 1  # rungs climbed, some trials stopped early
    else:
        assert budgets == {9} and states["PRUNED"] == 0  # no multi-fidelity: straight to the full budget
