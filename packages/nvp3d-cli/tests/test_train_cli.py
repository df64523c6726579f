"""``nvp3d train`` / ``nvp3d evaluate`` through the action runner (spec file -> results dir -> status.json)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml
from nvp3d.demo.run import generate_demo_data
from nvp3d.demo.specs import demo_spec_dict
from nvp3d.runner import run_action
from nvp3d.status import read_status

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_then_evaluate_via_runner(tmp_path_factory, tmp_path: Path) -> None:
    data = tmp_path_factory.getbasetemp() / "nvp3d_synth_64x48"
    generate_demo_data(data, scenes=2, frames_per_scene=2, grid=32, image_size=(64, 48), seed=3)
    spec = demo_spec_dict(data, tmp_path / "results", image_size=(64, 48), voxel_size=0.24, epochs=2, num_gpus=0,
                          min_instance_pixels=8, checkpoint_interval=1)
    spec["model"]["mask_former"] = {"train_num_points": 256}
    spec["evaluate"] = {"num_gpus": 0}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out, err = io.StringIO(), io.StringIO()
    code = run_action("train", path, [], out=out, err=err)
    assert code == 0, err.getvalue()
    train_dir = tmp_path / "results" / "train"
    records = read_status(train_dir / "status.json")
    assert records[0]["status"] == "STARTED" and records[-1]["status"] == "SUCCESS"
    assert [r["epoch"] for r in records if "epoch" in r] == [0, 1]
    latest = train_dir / "panoptic_recon_3d_model_latest.pth"
    assert latest.resolve().name == "model_epoch_001_step_00004.pth"
    code = run_action("evaluate", path, [f"evaluate.checkpoint={latest}"], out=out, err=err)
    assert code == 0, err.getvalue()
    ev = read_status(tmp_path / "results" / "evaluate" / "status.json")
    assert ev[-1]["status"] == "SUCCESS" and "PQ" in ev[-1]["kpi"]
    assert (tmp_path / "results" / "evaluate" / "metrics_2d.json").is_file()
    # a second call resumes from the latest (end-of-epoch) checkpoint and trains exactly the one new epoch
    code = run_action("train", path, ["train.num_epochs=3"], out=out, err=err)
    assert code == 0, err.getvalue()
    assert (train_dir / "model_epoch_002_step_00006.pth").is_file()
    assert any("Resuming from" in r["message"] for r in read_status(train_dir / "status.json"))


def test_missing_data_is_a_data_error(tmp_path: Path) -> None:
    spec = demo_spec_dict(tmp_path / "absent", tmp_path / "results", num_gpus=0)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    err = io.StringIO()
    assert run_action("train", path, [], out=io.StringIO(), err=err) == 4
    assert "dataset.train.base_dir=" in err.getvalue() and "does not exist" in err.getvalue()
    assert read_status(tmp_path / "results" / "train" / "status.json")[-1]["status"] == "FAILURE"
