"""Issue "From template to trained model without guesswork", bullet 4: training without ``dataset.val``,
``model.mode``, and the camera of the images given to ``nvp3d inference``."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from nvp3d.runner import run_action
from nvp3d.status import read_status

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["model.preset=tiny", "model.mask_former.train_num_points=256", "train.num_gpus=0", "train.num_epochs=1",
         "dataset.target_size=[64,48]", "dataset.reduced_target_size=[32,24]", "dataset.depth_size=[24,32]",
         "dataset.min_instance_pixels=8", "dataset.name=synthetic"]


@pytest.fixture(scope="module")
def data64(tmp_path_factory) -> Path:
    from datasets3d.synth import generate

    root = tmp_path_factory.mktemp("synth64b") / "data"
    generate(root, scenes=2, frames_per_scene=1, grid=64, image_size=(64, 48), seed=6, check=False)
    return root


def _run(action: str, spec: Path, overrides: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_action(action, spec, overrides, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_training_without_a_validation_split(repo_root, data64, tmp_path, capsys):
    template = repo_root / "references" / "spec_template_train.yaml"
    code, _, err = _run("train", template, [*SMALL, f"results_dir={tmp_path}", f"dataset.train.base_dir={data64}",
                                            "dataset.train.json_path=meta/train.json"])
    assert code == 0, err
    assert (tmp_path / "train" / "panoptic_recon_3d_model_latest.pth").is_file()
    said = capsys.readouterr().out
    assert said.count("training without validation") == 1
    records = read_status(tmp_path / "train" / "status.json")
    assert sum("training without validation" in r["message"] for r in records) == 1
    assert records[-1]["status"] == "SUCCESS"
    assert not any("PQ" in r.get("kpi", {}) for r in records)  # no validation ran


def _record_spec(spec, results_dir, status):
    _record_spec.seen.append(spec)  # type: ignore[attr-defined]


@pytest.fixture
def seen_specs(restore_actions) -> list:
    """Replace every action by one that records the spec it is given (after the runner resolved it)."""
    _record_spec.seen = []  # type: ignore[attr-defined]
    for action in list(restore_actions):
        restore_actions[action] = f"{__name__}:_record_spec"
    return _record_spec.seen  # type: ignore[attr-defined]


def test_model_mode_is_the_default_of_inference_mode(repo_root, tmp_path, seen_specs):
    template = repo_root / "references" / "spec_template_inference.yaml"
    code, _, err = _run("inference", template, [f"results_dir={tmp_path}", "model.mode=instance"])
    assert code == 0, err
    assert seen_specs[-1].inference.mode == "instance"
    code, _, err = _run("inference", template, [f"results_dir={tmp_path}", "model.mode=instance",
                                                "inference.mode=semantic"])
    assert code == 0, err
    assert seen_specs[-1].inference.mode == "semantic"  # the inference key, when set, wins


@pytest.mark.parametrize("action", ["train", "evaluate"])
def test_non_panoptic_model_mode_is_refused_where_it_cannot_act(repo_root, tmp_path, seen_specs, action):
    template = repo_root / "references" / f"spec_template_{action}.yaml"
    code, _, err = _run(action, template, [f"results_dir={tmp_path}", "model.mode=semantic"])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"model.mode=semantic: {action} implements the panoptic post-processing only" in lines[0]
    assert seen_specs == []
