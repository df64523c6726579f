"""``nvp3d demo`` pipeline on a very small configuration: data -> train -> evaluate, outputs in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nvp3d.demo.run import demo, read_loss_curve
from nvp3d.status import read_status


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    lines: list[str] = []
    result = demo(tmp_path, scenes=2, frames_per_scene=2, grid=32, image_size=(64, 48), epochs=3,
                  say=lines.append, enable_progress_bar=False, stage3d=False, extra_test_scenes=0)
    assert (tmp_path / "data" / "meta" / "train.json").is_file()
    assert Path(result["checkpoint"]).is_file() and Path(result["checkpoint"]).parent == tmp_path / "train"
    metrics = json.loads((tmp_path / "evaluate" / "metrics_2d.json").read_text())
    assert "PQ" in metrics["kpi"]
    assert read_status(tmp_path / "train" / "status.json")[-1]["status"] == "SUCCESS"
    assert read_status(tmp_path / "evaluate" / "status.json")[-1]["status"] == "SUCCESS"
    curve = read_loss_curve(tmp_path / "train")
    assert len(curve["epoch"]) == 3 and result["loss_epochs"] == curve["epoch"]
    assert curve["epoch"][-1] < curve["epoch"][0]
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert summary["pq_after"] == result["pq_after"]
    # the held-out frames are scored mirror-averaged (model.test_time_flip) and in one pass
    assert summary["test_time_flip"] is True and "pq_things_after_one_pass" in summary
    assert any("in one pass" in line for line in lines)
    assert any("metrics:" in line for line in lines) and any("checkpoints:" in line for line in lines)


@pytest.mark.slow
def test_demo_command_runs_both_stages(tmp_path: Path) -> None:
    """The README's main job through the real CLI, at the smallest settings: 2D then 3D stage, inference."""
    from nvp3d.cli import app
    from typer.testing import CliRunner

    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--scenes", "2", "--frames-per-scene", "2",
                                      "--image", "64x48", "--epochs", "2", "--epochs-3d", "1",
                                      "--extra-test-scenes", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "demo_summary.json").read_text())
    assert "stage3d" in summary and "PRQ" in summary["stage3d"]["prq_after"]
    # the demo fuses with the level-128 logits and also scores the plain (toolkit) fusion
    assert summary["stage3d"]["coarse_mask_weight"] == 0.25 and "PRQ" in summary["stage3d"]["prq_after_plain"]
    assert "with the plain fusion" in result.output
    assert read_status(out / "train3d" / "status.json")[-1]["status"] == "SUCCESS"
    assert json.loads((out / "evaluate3d" / "metrics_3d.json").read_text())
    index = json.loads((out / "inference" / "index.json").read_text())
    assert index and list((out / "inference").glob("*.ply"))
    # the held-out images are reconstructed with the data's camera (meta/camera.json), not the 3D-FRONT default
    assert all(e["intrinsic"].endswith("camera.json") for e in index["images"]), index["images"][0]["intrinsic"]
    assert "finished; results in" in result.output
    # 2 scenes (every split holds both) + 1 unseen room in the test split; only the first room is reconstructed
    assert summary["test_frames"] == 6 and "held-out PQ (6 frames)" in result.output
    assert len(index["images"]) == 2, [e["image"] for e in index["images"]]


def test_demo_command_defaults_are_the_functions_defaults() -> None:
    """``nvp3d demo``'s options default to ``demo()``'s own defaults (the README's main job runs the recipe that
    the docs measure), so the two cannot drift apart."""
    import inspect

    from nvp3d.cli import demo_command

    command = inspect.signature(demo_command).parameters
    function = inspect.signature(demo).parameters
    shared = [name for name in command if name in function and name != "out"]
    assert {"scenes", "frames_per_scene", "grid", "epochs", "epochs_3d", "seed", "extra_test_scenes"} <= set(shared)
    for name in shared:
        assert command[name].default == function[name].default, name
    assert function["epochs"].default == 48
