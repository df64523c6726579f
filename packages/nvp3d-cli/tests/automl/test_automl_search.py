"""A real AutoML search on CPU (tiny preset, 2 training steps per epoch): 4 ASHA trials, each rung a real
``nvp3d train`` subprocess. The search is killed with SIGKILL in the middle, resumed by running the same
command again, prunes, promotes a trial by resuming its checkpoint, and its best spec retrains to the
recorded loss; the best checkpoint evaluates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from nvp3d.demo.run import generate_demo_data
from nvp3d.demo.specs import demo_spec_dict
from nvp3d.status import read_status

IMAGE = (64, 48)


def _spec_file(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    generate_demo_data(data, scenes=2, frames_per_scene=2, grid=32, image_size=IMAGE, seed=3)
    spec = demo_spec_dict(data, tmp_path / "res", image_size=IMAGE, voxel_size=0.24, epochs=3, batch_size=2,
                          lr=2e-3, num_gpus=0, min_instance_pixels=8, checkpoint_interval=1)
    spec["train"]["validation_interval"] = 100  # train_loss only: no validation in 3 epochs
    spec["model"]["mask_former"] = {"train_num_points": 256}
    spec["automl"] = {"algorithm": "asha", "max_trials": 4, "min_epochs": 1, "max_epochs": 3,
                      "reduction_factor": 3, "seed": 0}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return env


def _finished_trials(status: Path) -> list[int]:
    if not status.is_file():
        return []
    return [r["trial"] for r in read_status(status) if "trial_state" in r]


def _starts(train_dir: Path) -> int:
    return sum(1 for r in read_status(train_dir / "status.json") if r["status"] == "STARTED")


@pytest.mark.slow
def test_asha_search_kill_resume_promote_retrain(tmp_path: Path, run_cli) -> None:
    spec = _spec_file(tmp_path)
    automl = tmp_path / "res" / "automl"
    cmd = [sys.executable, "-m", "nvp3d.cli", "automl", "-e", str(spec)]
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 400
        # kill -9 once two trials have finished and the third has started training
        while time.monotonic() < deadline and proc.poll() is None:
            if len(_finished_trials(automl / "status.json")) >= 2 and list(automl.glob("trial_002/rung_*.log")):
                time.sleep(4)
                break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = _finished_trials(automl / "status.json")
    starts_before = {n: _starts(automl / f"trial_{n:03d}" / "train") for n in done_before}

    started = time.monotonic()
    result = run_cli("automl", "-e", str(spec))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "interrupted trial(s) [2]" in result.stdout or 2 in done_before
    results = json.loads((automl / "automl_results.json").read_text())
    rows = {r["trial"]: r for r in results["trials"]}
    counts = results["counts"]
    assert counts["complete"] + counts["pruned"] + counts["failed"] == 4
    assert counts["pruned"] >= 1 and counts["complete"] >= 1
    for n in done_before:  # finished trials were not trained again
        assert _starts(automl / f"trial_{n:03d}" / "train") == starts_before[n]
        assert rows[n]["state"] in ("COMPLETE", "PRUNED")

    promoted = [r for r in rows.values() if r["state"] == "COMPLETE"]
    for row in promoted:  # promotion = the same folder resumed with the larger budget
        low, high = row["rungs"]
        assert (low["epochs"], high["epochs"]) == (1, 3)
        assert high["fresh"] and not high["carried_forward"] and high["value"] != low["value"]
        assert low["step"] == 2 and high["step"] == 6 and high["last_epoch"] == 2
        assert Path(high["checkpoint"]).name == "model_epoch_002_step_00006.pth"
        assert _starts(Path(row["trial_dir"]) / "train") >= 2
        assert any("Resuming from" in r["message"] for r in read_status(Path(row["trial_dir"]) / "train" / "status.json"))
    best = results["best"]
    print(f"automl CPU search: {len(rows)} trials, {counts}, resumed part {time.monotonic() - started:.0f} s, "
          f"best trial {best['trial']} train_loss {best['value']:.4f}")

    retrain = run_cli("train", "-e", str(automl / "best_spec.yaml"))
    assert retrain.returncode == 0, retrain.stderr[-2000:]
    final = read_status(automl / "best" / "train" / "status.json")[-1]
    assert final["kpi"]["train_loss"] == pytest.approx(best["value"], rel=1e-3)

    evaluate = run_cli("evaluate", "-e", str(automl / "best_spec.yaml"), f"evaluate.checkpoint={best['checkpoint']}",
                       "evaluate.num_gpus=0")
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    assert "PQ" in read_status(automl / "best" / "evaluate" / "status.json")[-1]["kpi"]
