"""The nvp3d command line: bad input -> exit 2 and one line, results dir bookkeeping, action dispatch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from nvp3d.cli import IMPORTANT_KEYS, app
from nvp3d.config import SPEC_ACTIONS, load_spec
from nvp3d.status import read_status
from typer.testing import CliRunner

runner = CliRunner()



def _spec(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(f"results_dir: {tmp_path / 'out'}\n" + text)
    return path


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


BAD_INPUTS = [
    # (spec text or None for a missing file, overrides, text the one line must contain)
    (None, [], "spec file not found"),
    ("train: [1,\n", [], "YAML syntax error"),
    ("train:\n  num_epochs: many\n", [], "train.num_epochs"),
    ("train:\n  num_epochs: -1\n", [], "train.num_epochs"),
    ("model:\n  object_mask_threshold: 2\n", [], "model.object_mask_threshold"),
    ("model:\n  mode: depth\n", [], "model.mode"),
    ("tran:\n  num_epochs: 1\n", [], "did you mean 'train'"),
    ("train:\n  optim:\n    momentun: 0.5\n", [], "did you mean 'train.optim.momentum'"),
    ("", ["train.num_epoch=3"], "did you mean 'train.num_epochs'"),
    ("", ["datset.name=front3d"], "did you mean 'dataset'"),
    ("", ["train.num_epochs=0"], "train.num_epochs"),
    ("", ["train.precision=int8"], "train.precision"),
    ("", ["train.num_epochs"], "malformed override"),
    ("", ["=5"], "malformed override"),
]


@pytest.mark.parametrize(("text", "overrides", "needle"), BAD_INPUTS)
def test_bad_input_exit_2_one_line(tmp_path, text, overrides, needle, invoke_cli):
    spec = tmp_path / "missing.yaml" if text is None else _spec(tmp_path, text)
    result = invoke_cli(["train", "-e", str(spec), *overrides], tmp_path)
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert line.startswith("nvp3d train: error: ")
    assert needle in line
    assert not (tmp_path / "out").exists()  # nothing is written for a bad spec


def test_missing_spec_option(tmp_path, invoke_cli):
    result = invoke_cli(["evaluate"], tmp_path)
    assert result.exit_code == 2
    assert "no spec file given" in _one_error_line(result)


def test_verbose_shows_traceback_and_all_errors(tmp_path, invoke_cli):
    spec = _spec(tmp_path, "model:\n  mode: x\ntrain:\n  num_epoch: 1\n")
    result = invoke_cli(["train", "-e", str(spec), "--verbose"], tmp_path)
    assert result.exit_code == 2
    assert "Traceback" in result.stderr
    assert "also: model.mode" in result.stderr


def test_template_run_writes_experiment_and_status(repo_root, tmp_path, invoke_cli):
    """The issue's acceptance command: template + override resolves, writes both files, then ends with a
    data error (4: the template names no data)."""
    template = repo_root / "references" / "spec_template_train.yaml"
    result = invoke_cli(["train", "-e", str(template), "train.num_epochs=3"], tmp_path)
    assert result.exit_code == 4, result.output
    results = tmp_path / "results" / "train"
    resolved = yaml.safe_load((results / "experiment.yaml").read_text())
    assert resolved["train"]["num_epochs"] == 3
    assert load_spec(results / "experiment.yaml").train.num_epochs == 3
    records = read_status(results / "status.json")
    assert [r["status"] for r in records][0] == "STARTED"
    assert records[-1]["status"] == "FAILURE"
    assert "data error" in _one_error_line(result)


@pytest.mark.parametrize("action", SPEC_ACTIONS)
def test_every_action_resolves_its_results_dir(tmp_path, action, restore_actions, invoke_cli):
    seen = {}

    def fake(spec, results_dir, status):
        seen["dir"] = results_dir
        seen["spec"] = spec
        status.running("working", kpi={"score": 1.0})

    restore_actions[action] = fake
    spec = _spec(tmp_path)
    result = invoke_cli([action, "-e", str(spec), f"{action}.results_dir={tmp_path / 'own'}"], tmp_path)
    assert result.exit_code == 0, result.output
    assert seen["dir"] == tmp_path / "own"
    assert (tmp_path / "own" / "experiment.yaml").is_file()
    records = read_status(tmp_path / "own" / "status.json")
    assert [r["status"] for r in records] == ["STARTED", "RUNNING", "SUCCESS"]
    assert records[-1]["kpi"] == {"score": 1.0}


def test_returned_kpi_goes_into_success(tmp_path, restore_actions, invoke_cli):
    restore_actions["evaluate"] = lambda spec, results_dir, status: {"PRQ": 42.0}
    result = invoke_cli(["evaluate", "-e", str(_spec(tmp_path))], tmp_path)
    assert result.exit_code == 0
    last = read_status(tmp_path / "out" / "evaluate" / "status.json")[-1]
    assert (last["status"], last["kpi"]) == ("SUCCESS", {"PRQ": 42.0})


@pytest.mark.parametrize(
    ("exc", "code", "needle"),
    [
        (FileNotFoundError("data/meta/train.json not found"), 4, "data error: data/meta/train.json"),
        (ValueError("frame 3 has no depth"), 4, "data error: frame 3"),
        (RuntimeError("kaboom"), 1, "internal error: RuntimeError: kaboom"),
    ],
)
def test_action_failures_map_to_exit_codes(tmp_path, restore_actions, exc, code, needle, invoke_cli):
    def failing(spec, results_dir, status):
        raise exc

    restore_actions["inference"] = failing
    result = invoke_cli(["inference", "-e", str(_spec(tmp_path))], tmp_path)
    assert result.exit_code == code
    assert needle in _one_error_line(result)
    last = read_status(tmp_path / "out" / "inference" / "status.json")[-1]
    assert last["status"] == "FAILURE"
    assert str(exc) in last["message"]


@pytest.mark.parametrize("action", SPEC_ACTIONS)
def test_help_lists_important_keys(action):
    result = runner.invoke(app, [action, "--help"])
    assert result.exit_code == 0
    for key in IMPORTANT_KEYS[action]:
        assert key in result.output
    assert "-e, --spec" in result.output


def test_top_level_help_and_version():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in (*SPEC_ACTIONS, "demo", "schema", "dataset"):
        assert command in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("nvp3d ")


def test_dataset_synth_delegates(tmp_path, fake_synth):
    out = tmp_path / "data"
    result = runner.invoke(app, ["dataset", "synth", "--out", str(out), "--scenes", "3", "--frames-per-scene", "2",
                                 "--grid", "64", "--image", "160x120", "--seed", "7", "--extra-test-scenes", "2"])
    assert result.exit_code == 0, result.output
    assert fake_synth == [dict(out_dir=out, scenes=3, frames_per_scene=2, grid=64, image_size=(160, 120), seed=7,
                               extra_test_scenes=2)]
    assert "wrote 5 scenes x 2 frames" in result.output


def test_dataset_synth_bad_image_and_broken_install(tmp_path, monkeypatch):
    result = runner.invoke(app, ["dataset", "synth", "--out", str(tmp_path), "--image", "320by240"])
    assert result.exit_code == 2
    assert "--image" in _one_error_line(result)
    monkeypatch.setitem(sys.modules, "datasets3d.synth", None)  # a broken install: the import fails
    result = runner.invoke(app, ["dataset", "synth", "--out", str(tmp_path)])
    assert result.exit_code == 1  # an internal error, not a user mistake
    assert "internal error" in _one_error_line(result) and "datasets3d.synth" in _one_error_line(result)


def test_console_script_subprocess(tmp_path):
    """The installed entry point (nvp3d.cli:main) behaves like the Typer app, in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", "from nvp3d.cli import main; main()", "train", "-e", str(tmp_path / "none.yaml")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"nvp3d train: error: spec file not found: {tmp_path / 'none.yaml'} (pass an existing YAML file with -e/--spec)"
    ]


def _real_synth_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("datasets3d.synth") is not None
    except ModuleNotFoundError:
        return False

