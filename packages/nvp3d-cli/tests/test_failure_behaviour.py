"""Failure behaviour of ``nvp3d``: unsafe or corrupt checkpoints, numerical faults, signals, concurrent runs,
disk and data faults. Each case ends with one line naming the file or key and the fix, a documented exit code,
and a status.json that says what happened (see "Failure behaviour" in the package README)."""

from __future__ import annotations

import io
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from nvp3d.demo.run import generate_demo_data
from nvp3d.demo.specs import demo_spec_dict
from nvp3d.runner import run_action
from nvp3d.status import read_status

IMAGE = (64, 48)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny model, busy 2-core machine: intra-op threads only slow the steps down (see test_train_e2e)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp() / "nvp3d_synth_64x48"
    generate_demo_data(root, scenes=2, frames_per_scene=2, grid=32, image_size=IMAGE, seed=3)
    return root


def spec_file(data: Path, folder: Path, epochs: int = 1, **train) -> Path:
    """A spec YAML for the tiny 2D model on ``data`` (progress bar off), written into ``folder``."""
    d = demo_spec_dict(data, folder / "out", image_size=IMAGE, voxel_size=0.24, epochs=epochs, batch_size=2,
                       lr=2e-3, num_gpus=0, min_instance_pixels=8, checkpoint_interval=1)
    d["train"]["validation_interval"] = 100
    d["model"]["mask_former"] = {"train_num_points": 256}
    d["train"].update(train)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def run(action: str, spec: Path, *overrides: str) -> tuple[int, str, str]:
    """``nvp3d <action> -e spec overrides...`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = run_action(action, spec, list(overrides), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def error_lines(err: str, action: str = "train") -> list[str]:
    """The ``nvp3d <action>: error:`` lines of stderr."""
    return [line for line in err.splitlines() if line.startswith(f"nvp3d {action}: error:")]


@pytest.fixture(scope="module")
def trained(data_dir: Path, tmp_path_factory) -> Path:
    """Results folder of a finished 1-epoch 2D run (2 steps, 1 checkpoint)."""
    folder = tmp_path_factory.mktemp("trained")
    code, _, err = run("train", spec_file(data_dir, folder), "train.results_dir=" + str(folder / "train"))
    assert code == 0, err
    return folder / "train"


# ---------------------------------------------------------------------------------------------------- security
class _Evil:
    """Unpickling this calls ``open(marker, "w")``: what a crafted checkpoint could do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil(marker)}, path)
    return path


def test_crafted_pickle_is_refused_without_running(data_dir: Path, tmp_path: Path) -> None:
    from nvp3d.model.checkpoint import load_stage_weights
    from nvp3d.model.safe_load import CheckpointReadError

    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tmp_path / "evil.pth", marker)
    spec = spec_file(data_dir, tmp_path)
    code, _, err = run("train", spec, f"train.resume_training_checkpoint_path={evil}")
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert str(evil) in lines[0] and "refused" in lines[0] and "io.open" in lines[0]
    assert not marker.exists()
    with pytest.raises(CheckpointReadError, match=r"evaluate.checkpoint=.*evil.pth was refused"):
        load_stage_weights(torch.nn.Linear(1, 1), str(evil), "2d", "evaluate.checkpoint")
    assert not marker.exists()
    # a latest pointer that resolves to such a file is refused too (Lightning never reads it)
    train_dir = tmp_path / "train2"
    train_dir.mkdir()
    os.symlink(evil, train_dir / "panoptic_recon_3d_model_latest.pth")
    code, _, err = run("train", spec, f"train.results_dir={train_dir}")
    assert code == 2 and "refused" in err and not marker.exists(), err


def test_lightning_resume_loads_weights_only(trained: Path, monkeypatch) -> None:
    """Our own checkpoints pass the weights-only loader, and Lightning is told to load that way as well."""
    import pytorch_lightning as pl
    from nvp3d.model.safe_load import load_checkpoint_file
    from nvp3d.training.fit import fit_and_report

    data = load_checkpoint_file(trained / "panoptic_recon_3d_model_latest.pth")
    assert "state_dict" in data and "optimizer_states" in data
    seen = {}

    def fake_fit(self, *args, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(pl.Trainer, "fit", fake_fit)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module = pl.LightningModule()
    module.last_metrics = {}
    fit_and_report(trainer, module, None, trained / "panoptic_recon_3d_model_latest.pth", None, say=lambda *a: None)
    assert seen["weights_only"] is True


# ---------------------------------------------------------------------------------------------- bad checkpoints
@pytest.mark.parametrize("kind", ["empty", "random", "truncated", "empty_latest"])
def test_corrupt_checkpoints_are_one_line_exit_2(kind: str, trained: Path, data_dir: Path, tmp_path: Path) -> None:
    good = (trained / "panoptic_recon_3d_model_latest.pth").resolve()
    bad = tmp_path / "bad.pth"
    if kind in ("empty", "empty_latest"):
        bad.write_bytes(b"")
    elif kind == "random":
        bad.write_bytes(b"\xa8" + random.Random(0).randbytes(4095))  # fixed bytes: no pickle opcode first
    else:
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    spec = spec_file(data_dir, tmp_path)
    if kind == "empty_latest":
        train_dir = tmp_path / "train"
        train_dir.mkdir()
        bad = train_dir / "panoptic_recon_3d_model_latest.pth"  # a copy-style pointer of zero bytes
        bad.write_bytes(b"")
        code, _, err = run("train", spec, f"train.results_dir={train_dir}")
    else:
        code, _, err = run("train", spec, f"train.resume_training_checkpoint_path={bad}")
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert str(bad) in lines[0] and "internal error" not in lines[0]
    what = {"empty": "empty (0 bytes", "empty_latest": "empty (0 bytes", "random": "not a readable PyTorch checkpoint",
            "truncated": "truncated or corrupt"}[kind]
    assert what in lines[0], lines[0]


def test_3d_checkpoint_given_to_the_2d_stage(data_dir: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "stage3d.pth"
    state = {f"model.completion.block{i}.weight": torch.zeros(2) for i in range(300)}
    torch.save({"state_dict": state, "nvp3d_stage": "3d", "tao_model": "panoptic_recon_3d", "epoch": 0,
                "global_step": 1}, ckpt)
    code, _, err = run("train", spec_file(data_dir, tmp_path), f"train.resume_training_checkpoint_path={ckpt}")
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and len(err) < 2000, err
    assert "is a 3D-stage checkpoint" in lines[0] and "dataset.enable_3d=true" in lines[0]


# ------------------------------------------------------------------------------------------- numerical faults
def _all_finite(path: Path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("lr", ["1e6", "10"])
def test_diverging_2d_run_stops_with_exit_5(lr: str, data_dir: Path, tmp_path: Path) -> None:
    spec = spec_file(data_dir, tmp_path, epochs=3, checkpoint_interval_unit="step")
    code, _, err = run("train", spec, f"train.optim.lr={lr}")
    lines = error_lines(err)
    assert code == 5 and len(lines) == 1, err
    assert "non-finite values at training step" in lines[0] and "lower train.optim.lr" in lines[0]
    train_dir = tmp_path / "out" / "train"
    last = read_status(train_dir / "status.json")[-1]
    assert last["status"] == "FAILURE" and "training step" in last["message"]
    assert last["step"] == int(lines[0].split("training step ")[1].split()[0]) and "nonfinite" in last
    for ckpt in train_dir.glob("*.pth"):  # whatever was written (and made latest) is finite
        assert _all_finite(ckpt), ckpt


def test_nan_3d_stage_stops_with_exit_5(trained: Path, data_dir: Path, tmp_path: Path) -> None:
    spec = spec_file(data_dir, tmp_path, epochs=2)
    d = yaml.safe_load(spec.read_text())
    d["dataset"]["enable_3d"] = True
    d["dataset"]["train"]["batch_size"] = 1
    d["model"]["frustum3d"] = {"grid_dimensions": 32, "frustum_dims": 32, "unet_features": 8,
                               "unet_output_channels": 8}
    d["train"].update(checkpoint_2d=str(trained / "panoptic_recon_3d_model_latest.pth"),
                      iters_per_epoch=2, checkpoint_interval_unit="step")
    d["train"]["optim"]["lr"] = 1e12
    spec.write_text(yaml.safe_dump(d))
    code, _, err = run("train", spec)
    lines = error_lines(err)
    assert code == 5 and len(lines) == 1, err
    assert "non-finite" in lines[0] and "lower train.optim.lr (now 1e+12)" in lines[0]
    train_dir = tmp_path / "out" / "train"
    assert read_status(train_dir / "status.json")[-1]["status"] == "FAILURE"
    for ckpt in train_dir.glob("*.pth"):
        assert _all_finite(ckpt), ckpt


def test_skip_nonfinite_steps_skips_then_stops() -> None:
    from types import SimpleNamespace

    from nvp3d.training.nonfinite import NonFiniteGuard, NonFiniteLossError

    guard = NonFiniteGuard(lr=0.1, skip_allowed=2)
    trainer = SimpleNamespace(global_step=4, current_epoch=1)
    layer = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.ones(1, 2)).sum().backward()
    layer.weight.grad[0, 0] = float("nan")
    before = layer.weight.detach().clone()
    guard.on_before_optimizer_step(trainer, layer, opt)  # skipped: the gradients are dropped
    opt.step()
    assert torch.equal(layer.weight, before) and guard.skipped == [5]
    guard.bad_step(trainer, "loss loss_ce=nan")
    with pytest.raises(NonFiniteLossError, match=r"step 5 .*loss loss_ce=nan; 2 step\(s\) skipped"):
        guard.bad_step(trainer, "loss loss_ce=nan")
    assert NonFiniteGuard(lr=0.1).skip_allowed == 0  # off by default: the first bad step stops the run


def test_batched_finite_checks_name_the_same_faults_as_per_tensor_checks() -> None:
    """The guard checks many tensors with one sync; it must still find every fault and nothing else: a huge but
    finite gradient (its fused norm overflows to inf) passes, a NaN or inf anywhere is named."""
    from types import SimpleNamespace

    from nvp3d.training.nonfinite import NonFiniteGuard, nonfinite_terms

    terms = {"a": torch.tensor(1.0), "b": torch.tensor([1.0, float("inf")]), "c": torch.tensor(float("nan")),
             "n": 3, "i": torch.tensor([1, 2])}
    assert nonfinite_terms(terms) == ["b(non-finite)", "c=nan"]
    assert nonfinite_terms({"a": torch.tensor(1.0), "n": 3}) == []
    guard = NonFiniteGuard(lr=0.1, skip_allowed=5)
    trainer = SimpleNamespace(global_step=0, current_epoch=0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.ones(1, 2)).sum().backward()
    net[1].weight.grad.fill_(1e30)  # finite; the squared norm overflows float32
    guard.on_before_optimizer_step(trainer, net, opt)
    assert guard.skipped == [] and net[1].weight.grad is not None
    net[0].bias.grad[1] = float("-inf")
    guard.on_before_optimizer_step(trainer, net, opt)
    assert guard.skipped == [1] and net[0].bias.grad is None


# --------------------------------------------------------------------------------------------- process faults
def _cli(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "nvp3d.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_epoch_record(status: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if status.is_file() and any("epoch" in r for r in read_status(status)):
            return
        time.sleep(0.2)
    raise AssertionError(f"no epoch record in {status} (exit {proc.poll()})")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_the_rerun_resumes(signum: int, data_dir: Path, tmp_path: Path) -> None:
    spec = spec_file(data_dir, tmp_path, epochs=60, checkpoint_interval=1000)  # no periodic checkpoint
    train_dir = tmp_path / "out" / "train"
    proc = _cli("train", "-e", str(spec))
    _wait_for_epoch_record(train_dir / "status.json", proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=240)
    lines = error_lines(err)
    assert proc.returncode == (143 if signum == signal.SIGTERM else 130), err
    assert len(lines) == 1 and f"interrupted by {signal.Signals(signum).name} at step" in lines[0], err
    last = read_status(train_dir / "status.json")[-1]
    assert last["status"] == "FAILURE" and "at step" in last["message"]
    assert last["interrupted"] == signal.Signals(signum).name and last["step"] >= 1 and last["checkpoint"]
    latest = train_dir / "panoptic_recon_3d_model_latest.pth"
    assert latest.resolve().name in lines[0] and not list(train_dir.glob(".*.tmp*"))
    saved = torch.load(latest, map_location="cpu", weights_only=True)
    if signum == signal.SIGINT:
        return
    resumed_from = latest.resolve()
    code, _, err = run("train", spec, f"train.num_epochs={saved['epoch'] + 2}")  # the rerun resumes
    assert code == 0, err
    records = read_status(train_dir / "status.json")
    assert f"Resuming from {resumed_from}." in [r["message"] for r in records]
    assert records[-1]["status"] == "SUCCESS"
    assert torch.load(latest, weights_only=True)["global_step"] > saved["global_step"]


def _lock(folder: Path, pid: int, host: str | None = None) -> Path:
    import json
    import socket

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".nvp3d.lock"
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "action": "train",
                                "started": "2026-01-01T00:00:00"}))
    return path


def test_second_run_into_a_busy_results_dir_exits_2(data_dir: Path, tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        train_dir = tmp_path / "out" / "train"
        lock = _lock(train_dir, holder.pid)
        code, _, err = run("train", spec_file(data_dir, tmp_path), "train.num_epochs=1")
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1, err
        assert f"pid {holder.pid}" in lines[0] and "in use by nvp3d train" in lines[0]
        assert not (train_dir / "experiment.yaml").exists() and not (train_dir / "status.json").exists()
        assert lock.exists()  # the holder's lock is left alone
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over_with_a_warning(data_dir: Path, tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    train_dir = tmp_path / "out" / "train"
    lock = _lock(train_dir, gone.pid)
    code, _, err = run("train", spec_file(data_dir, tmp_path))
    assert code == 0, err
    assert f"warning: taking over the stale lock {lock} of pid {gone.pid}" in err
    assert not lock.exists()  # released at the end of the run


def test_only_rank_zero_takes_the_lock(tmp_path: Path, monkeypatch, restore_actions) -> None:
    """DDP ranks other than 0 (and Lightning-spawned children) run without touching the lock."""
    seen = []
    restore_actions["train"] = lambda spec, results_dir, status: seen.append((results_dir / ".nvp3d.lock").exists())
    spec = tmp_path / "s.yaml"
    spec.write_text(f"results_dir: {tmp_path / 'r'}\n")
    assert run("train", spec)[0] == 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run("train", spec)[0] == 0
    assert seen == [True, False]


def _copy_run(trained: Path, dest: Path) -> Path:
    shutil.copytree(trained, dest, symlinks=True)
    return dest


def test_resume_with_nothing_left_to_train_says_so(trained: Path, data_dir: Path, tmp_path: Path) -> None:
    train_dir = _copy_run(trained, tmp_path / "train")
    before = sorted(p.name for p in train_dir.glob("model_epoch_*.pth"))
    code, _, err = run("train", spec_file(data_dir, tmp_path), f"train.results_dir={train_dir}")  # num_epochs=1 again
    assert code == 0, err
    records = read_status(train_dir / "status.json")
    notes = [r for r in records if r["message"].startswith("nothing to train:")]
    assert len(notes) == 1 and notes[0]["nothing_to_train"] is True and "raise train.num_epochs" in notes[0]["message"]
    assert sorted(p.name for p in train_dir.glob("model_epoch_*.pth")) == before


def test_changed_optimizer_keys_on_resume_are_reported(trained: Path, data_dir: Path, tmp_path: Path) -> None:
    train_dir = _copy_run(trained, tmp_path / "train")
    code, _, err = run("train", spec_file(data_dir, tmp_path), f"train.results_dir={train_dir}",
                       "train.num_epochs=2", "train.optim.lr=0.5", "train.optim.gamma=0.5")
    assert code == 0, err
    notes = [r["message"] for r in read_status(train_dir / "status.json") if "optimizer and scheduler" in r["message"]]
    assert len(notes) == 1
    assert "train.optim.lr=0.5 (using 0.002)" in notes[0] and "train.optim.gamma=0.5 (using 0.1)" in notes[0]
    used = yaml.safe_load((train_dir / "experiment.yaml").read_text())["train"]["optim"]
    assert used["lr"] == 0.002 and used["gamma"] == 0.1  # experiment.yaml records what the run really used


def test_max_steps_is_honoured_under_multistep(data_dir: Path, tmp_path: Path) -> None:
    spec = spec_file(data_dir, tmp_path, epochs=3, checkpoint_interval_unit="step")
    code, _, err = run("train", spec, "train.optim.max_steps=3")
    assert code == 0, err
    latest = tmp_path / "out" / "train" / "panoptic_recon_3d_model_latest.pth"
    assert torch.load(latest, weights_only=True)["global_step"] == 3  # not 6 (3 epochs x 2 steps)


def test_rerun_with_other_model_sizes_is_one_line_and_writes_nothing(trained: Path, data_dir: Path,
                                                                    tmp_path: Path) -> None:
    train_dir = _copy_run(trained, tmp_path / "train")
    before = {p.name: p.read_bytes() for p in train_dir.iterdir() if p.is_file() and not p.is_symlink()}
    code, _, err = run("train", spec_file(data_dir, tmp_path), f"train.results_dir={train_dir}",
                       "model.sem_seg_head.num_classes=20")
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and len(err.splitlines()) < 5, err
    assert "has shape" in lines[0] and "use a new results_dir or the original sizes" in lines[0]
    after = {p.name: p.read_bytes() for p in train_dir.iterdir() if p.is_file() and not p.is_symlink()}
    assert after == before  # experiment.yaml, status.json and the checkpoints are untouched


# ---------------------------------------------------------------------------------------------- disk faults
def test_disk_full_during_a_save_leaves_no_tmp(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import errno

    from pytorch_lightning.plugins.io import TorchCheckpointIO

    def full_disk(self, checkpoint, path, storage_options=None) -> None:
        Path(path).write_bytes(b"\0" * (1 << 20))  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", full_disk)
    code, _, err = run("train", spec_file(data_dir, tmp_path))
    lines = error_lines(err)
    assert code == 1 and len(lines) == 1, err
    train_dir = tmp_path / "out" / "train"
    assert f"cannot write checkpoint {train_dir}/model_epoch_000_step_00002.pth: No space left" in lines[0]
    assert " free on " in lines[0] and "internal error" not in lines[0]
    assert not [p for p in train_dir.iterdir() if ".tmp" in p.name]
    assert read_status(train_dir / "status.json")[-1]["status"] == "FAILURE"


def test_step_checkpoints_are_pruned_to_keep_checkpoints(data_dir: Path, tmp_path: Path) -> None:
    spec = spec_file(data_dir, tmp_path, epochs=3, checkpoint_interval_unit="step")
    code, _, err = run("train", spec, "train.keep_checkpoints=2")
    assert code == 0, err
    train_dir = tmp_path / "out" / "train"
    assert sorted(p.name for p in train_dir.glob("model_epoch_*.pth")) == [
        "model_epoch_002_step_00005.pth", "model_epoch_002_step_00006.pth"]
    assert (train_dir / "panoptic_recon_3d_model_latest.pth").resolve().name == "model_epoch_002_step_00006.pth"


# ------------------------------------------------------------------------------------------ dataset synth --out
def test_dataset_synth_refuses_existing_data_and_files(tmp_path: Path, fake_synth) -> None:
    from nvp3d.cli import app
    from typer.testing import CliRunner

    cli = CliRunner()
    data = tmp_path / "data"
    (data / "meta").mkdir(parents=True)
    (data / "meta" / "train.json").write_text('{"keep": true}')
    result = cli.invoke(app, ["dataset", "synth", "--out", str(data)])
    assert result.exit_code == 2 and "is not empty" in result.output and "--overwrite" in result.output
    assert (data / "meta" / "train.json").read_text() == '{"keep": true}' and fake_synth == []
    result = cli.invoke(app, ["dataset", "synth", "--out", str(data), "--overwrite"])
    assert result.exit_code == 0 and len(fake_synth) == 1
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        result = cli.invoke(app, ["dataset", "synth", "--out", str(out)])
        errors = [line for line in result.output.splitlines() if "error:" in line]
        assert result.exit_code == 2 and len(errors) == 1 and str(a_file) in errors[0], result.output


# ---------------------------------------------------------------------------------------------- spec errors
def test_fp16_is_a_spec_error_and_not_offered(data_dir: Path, tmp_path: Path) -> None:
    import json

    from nvp3d.config import ExperimentSpec

    code, _, err = run("train", spec_file(data_dir, tmp_path), "train.precision=fp16")
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "train.precision" in lines[0], err
    assert "data error" not in lines[0]
    assert "fp16" not in str(ExperimentSpec.model_fields["train"].annotation.model_fields["precision"].annotation)
    schema = json.loads((Path(__file__).resolve().parents[3] / "schemas" / "train.schema.json").read_text())
    assert '"fp16"' not in json.dumps(schema["$defs"]["TrainSpec"]["properties"]["precision"])


def test_missing_evaluate_checkpoint_hint_is_honest(data_dir: Path, tmp_path: Path) -> None:
    code, _, err = run("evaluate", spec_file(data_dir, tmp_path), f"evaluate.checkpoint={tmp_path / 'gone.pth'}",
                       "evaluate.num_gpus=0")
    lines = error_lines(err, "evaluate")
    assert code == 4 and len(lines) == 1, err
    assert "set it to ''" not in lines[0] and "point it at a .pth written by nvp3d train" in lines[0]


# ------------------------------------------------------------------------------------------------- bad data
@pytest.fixture
def bad_image_data(data_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny dataset whose second training image is truncated."""
    data = tmp_path / "bad_data"
    shutil.copytree(data_dir, data)
    first = next(iter(yaml.safe_load((data / "meta" / "train.json").read_text())))
    png = data / "data" / first["scene_id"] / f"rgb_{first['image_id']}.png"
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    return data


@pytest.mark.parametrize("workers", [0, 1])
def test_worker_errors_read_like_main_process_errors(workers: int, bad_image_data: Path, tmp_path: Path) -> None:
    code, _, err = run("train", spec_file(bad_image_data, tmp_path), f"dataset.train.num_workers={workers}",
                       f"dataset.val.num_workers={workers}")
    lines = error_lines(err)
    assert code == 4 and len(lines) == 1 and len(err.splitlines()) == 1, err
    assert "rgb_" in lines[0] and "cannot be decoded as an image" in lines[0] and "Traceback" not in err
    message = read_status(tmp_path / "out" / "train" / "status.json")[-1]["message"]
    assert "DataLoader worker" not in message and "Traceback" not in message


@pytest.fixture(scope="module")
def inference_setup(data_dir: Path, tmp_path_factory) -> dict:
    """A random-weight 3D checkpoint and an inference spec for it (as in test_inference.py)."""
    from nvp3d.config import load_spec
    from nvp3d.data.datamodule import NVP3DDataModule
    from nvp3d.model.build import build_net3d

    folder = tmp_path_factory.mktemp("inference")
    spec_path = spec_file(data_dir, folder)
    d = yaml.safe_load(spec_path.read_text())
    d["dataset"]["enable_3d"] = True
    d["model"]["frustum3d"] = {"grid_dimensions": 32, "frustum_dims": 32, "unet_features": 4,
                               "unet_output_channels": 4, "iso_recon_value": 1.0}
    d["model"]["object_mask_threshold"] = 0.0
    d["inference"] = {"num_gpus": 0, "checkpoint": str(folder / "model3d.pth"), "images_dir": str(folder / "images")}
    spec_path.write_text(yaml.safe_dump(d))
    spec = load_spec(spec_path, [])
    dm = NVP3DDataModule(spec, splits=("test",))
    dm.setup()
    torch.manual_seed(0)
    model = build_net3d(spec, dm.thing_ids, dm.stuff_ids)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, folder / "model3d.pth")
    first = json_first_rgb(data_dir)
    return {"folder": folder, "spec": spec_path, "rgb": first}


def json_first_rgb(data: Path) -> Path:
    entry = next(iter(yaml.safe_load((data / "meta" / "test.json").read_text())))
    return data / "data" / entry["scene_id"] / f"rgb_{entry['image_id']}.png"


@pytest.mark.parametrize("skip_bad", [True, False])
def test_inference_skips_or_stops_cleanly_on_an_unreadable_image(skip_bad: bool, inference_setup: dict,
                                                                  tmp_path: Path) -> None:
    import json

    images = tmp_path / "images"
    images.mkdir()
    good = inference_setup["rgb"]
    shutil.copy(good, images / "a_good.png")
    (images / "b_bad.png").write_bytes(good.read_bytes()[:100])
    shutil.copy(good, images / "c_good.png")
    out = tmp_path / "inf"
    code, _, err = run("inference", inference_setup["spec"], f"inference.images_dir={images}",
                       f"inference.results_dir={out}", f"dataset.skip_bad={str(skip_bad).lower()}")
    index = json.loads((out / "index.json").read_text())
    if skip_bad:
        assert code == 0, err
        assert [e["name"] for e in index["images"]] == ["a_good", "c_good"]
        assert [s["image"] for s in index["skipped"]] == [str(images / "b_bad.png")]
        assert read_status(out / "status.json")[-1]["kpi"]["skipped"] == 1
    else:
        lines = error_lines(err, "inference")
        assert code == 4 and len(lines) == 1 and "b_bad.png" in lines[0], err
        assert index["complete"] is False and [e["name"] for e in index["images"]] == ["a_good"]
        assert index["failed"]["image"] == str(images / "b_bad.png")


def test_image_modes_are_scaled_or_refused(inference_setup: dict, tmp_path: Path) -> None:
    import numpy as np
    from datasets3d.errors import DatasetFormatError
    from datasets3d.io import read_rgb
    from nvp3d.inference.predictor import PredictInputError, load_image
    from PIL import Image

    grey8 = (np.arange(48 * 64).reshape(48, 64) % 256).astype(np.uint8)
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # 16-bit PNG, same picture
    for loader in (load_image, read_rgb):
        rgb = loader(tmp_path / "g16.png")
        assert rgb.dtype == np.uint8 and rgb.shape == (48, 64, 3)
        assert np.abs(rgb[..., 0].astype(int) - grey8).max() <= 1  # scaled, not clipped to white
    colour = np.asarray(Image.open(inference_setup["rgb"]).convert("RGB"))
    Image.fromarray(colour).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    Image.fromarray(colour).convert("RGBA").save(tmp_path / "a.png")
    Image.fromarray(grey8).save(tmp_path / "l.png")
    assert np.array_equal(load_image(tmp_path / "a.png"), colour)
    assert np.array_equal(load_image(tmp_path / "l.png")[..., 1], grey8)
    assert np.abs(load_image(tmp_path / "c.jpg").astype(int) - colour).mean() < 8
    Image.fromarray(grey8.astype(np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(PredictInputError, match=r"f.tiff is a floating-point image"):
        load_image(tmp_path / "f.tiff")
    with pytest.raises(DatasetFormatError, match=r"f.tiff is a floating-point image"):
        read_rgb(tmp_path / "f.tiff")


def test_rgb_of_another_size_than_its_labels_is_refused(data_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    entry = next(iter(yaml.safe_load((data / "meta" / "train.json").read_text())))
    png = data / "data" / entry["scene_id"] / f"rgb_{entry['image_id']}.png"
    Image.open(png).resize((80, 48)).save(png)
    code, _, err = run("train", spec_file(data, tmp_path))
    lines = error_lines(err)
    assert code == 4 and len(lines) == 1, err
    assert "is 80x48 (WxH) but its labels" in lines[0] and "pixel aligned" in lines[0]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to "
                    "run as an unprivileged user (root writes into read-only folders)")
def test_read_only_results_dir_is_one_line_exit_2(tmp_path: Path) -> None:
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="nvp3d_ro_"))
    try:
        base.chmod(0o755)
        ro = base / "ro"
        ro.mkdir(mode=0o555)
        ro.chmod(0o555)
        spec = base / "spec.yaml"
        spec.write_text(f"inference:\n  results_dir: {ro}\n  images_dir: {base}\n  num_gpus: 0\n")
        spec.chmod(0o644)
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK")}
        env.update(HOME=str(base), CUDA_VISIBLE_DEVICES="")
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                               "nvp3d.cli", "inference", "-e", str(spec)], cwd=base, env=env, capture_output=True,
                              text=True, timeout=300)
        lines = error_lines(proc.stderr, "inference")
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"cannot write in results dir {ro}" in lines[0] and "writable folder" in lines[0]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_resume_refuses_a_non_finite_latest_checkpoint(trained: Path, data_dir: Path, tmp_path: Path) -> None:
    """A NaN checkpoint made latest by an older version is not resumed into on every rerun."""
    train_dir = _copy_run(trained, tmp_path / "train")
    latest = (train_dir / "panoptic_recon_3d_model_latest.pth").resolve()
    data = torch.load(latest, weights_only=True)
    name = next(k for k, v in data["state_dict"].items() if v.is_floating_point())
    data["state_dict"][name] = torch.full_like(data["state_dict"][name], float("nan"))
    torch.save(data, latest)
    code, _, err = run("train", spec_file(data_dir, tmp_path), f"train.results_dir={train_dir}", "train.num_epochs=2")
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert f"holds non-finite weights (first: {name})" in lines[0] and "lower train.optim.lr" in lines[0]


def _spec_3d(trained: Path, data_dir: Path, folder: Path, **frustum) -> Path:
    spec = spec_file(data_dir, folder, epochs=1)
    d = yaml.safe_load(spec.read_text())
    d["dataset"]["enable_3d"] = True
    d["dataset"]["train"]["batch_size"] = 1
    d["model"]["frustum3d"] = {"grid_dimensions": 32, "frustum_dims": 32, "unet_features": 8,
                               "unet_output_channels": 8, **frustum}
    d["train"].update(checkpoint_2d=str(trained / "panoptic_recon_3d_model_latest.pth"), iters_per_epoch=1)
    spec.write_text(yaml.safe_dump(d))
    return spec


def test_3d_resume_with_other_model_sizes_is_one_line(trained: Path, data_dir: Path, tmp_path: Path) -> None:
    code, _, err = run("train", _spec_3d(trained, data_dir, tmp_path / "a"), f"train.results_dir={tmp_path / 't3'}")
    assert code == 0, err
    code, _, err = run("train", _spec_3d(trained, data_dir, tmp_path / "b", unet_features=4, unet_output_channels=4),
                       f"train.results_dir={tmp_path / 't3'}", "train.num_epochs=2")
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and len(err) < 1000, err
    assert "has shape" in lines[0] and "use a new results_dir or the original sizes" in lines[0]


def test_ctrl_c_outside_the_training_loop_is_130(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Lightning's own Ctrl-C handling (before the loop, e.g. during setup) exits 1; the runner reports 130."""
    import pytorch_lightning as pl
    from nvp3d.data.sampler import LoaderPosition

    def ctrl_c(self, trainer, pl_module, stage=None) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(LoaderPosition, "setup", ctrl_c, raising=False)
    assert issubclass(LoaderPosition, pl.Callback)
    code, _, err = run("train", spec_file(data_dir, tmp_path))
    assert code == 130, err
    assert error_lines(err) == ["nvp3d train: error: interrupted"]
    assert read_status(tmp_path / "out" / "train" / "status.json")[-1]["status"] == "FAILURE"


@pytest.mark.parametrize("scheduler", ["WarmupPoly", "MultiStep"])
def test_resume_from_an_epoch_end_checkpoint_trains_the_next_epoch(scheduler: str, data_dir: Path,
                                                                   tmp_path: Path) -> None:
    """Under WarmupPoly (Lightning's max_steps set) such a resume trained one step of the next epoch and stopped."""
    spec = spec_file(data_dir, tmp_path, epochs=1)
    opts = (f"train.optim.lr_scheduler={scheduler}", "train.optim.max_steps=100")
    assert run("train", spec, *opts)[0] == 0
    code, _, err = run("train", spec, *opts, "train.num_epochs=2")
    assert code == 0, err
    latest = tmp_path / "out" / "train" / "panoptic_recon_3d_model_latest.pth"
    assert latest.resolve().name == "model_epoch_001_step_00004.pth"  # 2 epochs x 2 steps


@pytest.mark.slow
def test_ddp_run_stops_together_on_nan_and_releases_its_one_lock(data_dir: Path, tmp_path: Path, run_cli) -> None:
    """Two CPU processes (gloo): both ranks stop at the same step with exit 5; the launcher's lock is released."""
    spec = spec_file(data_dir, tmp_path)
    proc = run_cli("train", "-e", str(spec), "train.num_gpus=2", "train.optim.lr=1e6", "dataset.train.batch_size=1")
    assert proc.returncode == 5, proc.stderr[-3000:]
    # substring, not line start: the two ranks share stderr, and once (1 run in many) the launcher's error line
    # followed another process's output on the same line
    errors = [line for line in proc.stderr.splitlines() if "nvp3d train: error:" in line]
    assert len(errors) == 1 and "non-finite values at training step" in errors[0], proc.stderr[-3000:]
    train_dir = tmp_path / "out" / "train"
    assert not (train_dir / ".nvp3d.lock").exists() and not list(train_dir.glob("*.pth"))
    assert read_status(train_dir / "status.json")[-1]["status"] == "FAILURE"
