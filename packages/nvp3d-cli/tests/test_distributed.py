"""Launch plans and ranks from the spec and a launcher's environment (Lightning spawn, torchrun, SLURM, and
the NUM_GPU_PER_NODE / WORLD_SIZE / NODE_RANK variables), and rank-0-only writes in the action runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nvp3d.distributed import global_rank, is_rank_zero, launch_plan, launcher
from nvp3d.runner import run_action
from nvp3d.training.trainer import device_setup

TORCHRUN = {"TORCHELASTIC_RUN_ID": "x", "RANK": "5", "LOCAL_RANK": "1", "GROUP_RANK": "1", "WORLD_SIZE": "8",
            "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
SLURM = {"SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_PROCID": "0",
         "SLURM_JOB_NAME": "train"}


def test_spec_alone_decides_without_launcher_variables() -> None:
    plan = launch_plan(2, 1, {})
    assert (plan.devices_per_node, plan.num_nodes, plan.launcher, plan.notes) == (2, 1, "lightning", ())
    assert launch_plan(0, 1, {}).world_size == 1  # CPU: one process


def test_manual_multi_node_variables() -> None:
    env = {"NUM_GPU_PER_NODE": "4", "WORLD_SIZE": "8", "NODE_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"}
    plan = launch_plan(1, 1, env)
    assert (plan.devices_per_node, plan.num_nodes, plan.world_size) == (4, 2, 8)
    assert any("train.num_gpus=1 overridden" in n for n in plan.notes)
    assert any("train.num_nodes=1 overridden" in n for n in plan.notes)
    assert global_rank(env) != 0 and not is_rank_zero(env)
    # the spec's num_nodes with NODE_RANK alone (no WORLD_SIZE) is also a valid two-node launch
    assert launch_plan(2, 2, {"NODE_RANK": "1"}).world_size == 4


@pytest.mark.parametrize(("env", "words"), [
    ({"NUM_GPU_PER_NODE": "3", "WORLD_SIZE": "8"}, ["WORLD_SIZE=8", "NUM_GPU_PER_NODE"]),
    ({"NODE_RANK": "2"}, ["NODE_RANK=2", "train.num_nodes"]),
    ({"WORLD_SIZE": "four"}, ["WORLD_SIZE", "not an integer"]),
])
def test_inconsistent_environment_is_a_clear_error(env: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        launch_plan(2, 1, env)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_torchrun_environment() -> None:
    assert launcher(TORCHRUN) == "torchrun"
    plan = launch_plan(1, 1, TORCHRUN)
    assert (plan.devices_per_node, plan.num_nodes) == (4, 2)
    assert global_rank(TORCHRUN) == 5
    assert is_rank_zero({**TORCHRUN, "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"})
    kwargs = device_setup(1, [0], 1, cuda=True, env=TORCHRUN)
    assert (kwargs["devices"], kwargs["num_nodes"], kwargs["accelerator"]) == (4, 2, "gpu")
    assert type(kwargs["strategy"]).__name__ == "DDPStrategy"


def test_slurm_environment_and_interactive_jobs() -> None:
    assert launcher(SLURM) == "slurm"
    plan = launch_plan(1, 1, SLURM)
    assert (plan.devices_per_node, plan.num_nodes) == (4, 2)
    assert is_rank_zero(SLURM) and not is_rank_zero({**SLURM, "SLURM_PROCID": "3"})
    no_per_node = {k: v for k, v in SLURM.items() if k != "SLURM_NTASKS_PER_NODE"}
    assert launch_plan(1, 1, no_per_node).devices_per_node == 4
    # an interactive allocation (job name "bash") launches nothing itself: the spec decides
    assert launch_plan(2, 1, {**SLURM, "SLURM_JOB_NAME": "bash"}).world_size == 2


def test_lightning_spawned_child_is_not_rank_zero() -> None:
    assert is_rank_zero({"LOCAL_RANK": "0", "NODE_RANK": "0"})
    assert not is_rank_zero({"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2"})
    assert not is_rank_zero({"LOCAL_RANK": "0", "NODE_RANK": "1"})


def test_runner_writes_only_on_rank_zero(tmp_path: Path, monkeypatch, restore_actions, capsys) -> None:
    calls: list[str] = []
    restore_actions["train"] = lambda spec, results_dir, status: calls.append(str(results_dir)) or {"x": 1.0}
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"results_dir: {tmp_path / 'out'}\n")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert run_action("train", spec) == 0
    out_dir = tmp_path / "out" / "train"
    assert calls == [str(out_dir)]  # the action ran on that rank too
    assert not (out_dir / "status.json").exists() and not (out_dir / "experiment.yaml").exists()
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert run_action("train", spec) == 0
    records = [json.loads(line) for line in (out_dir / "status.json").read_text().splitlines()]
    assert [r["status"] for r in records] == ["STARTED", "SUCCESS"]
    assert (out_dir / "experiment.yaml").is_file()
