"""2D training end to end on tiny synthetic data: the loss drops, checkpoints get the toolkit names, a
crashed run resumes exactly (same loss at every later step as an uninterrupted run), status.json has the
epoch records and KPIs, and ``nvp3d evaluate`` writes KPIs and per-class tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from nvp3d.demo.specs import demo_spec
from nvp3d.evaluation.evaluate import METRICS_FILENAME, evaluate
from nvp3d.status import StatusLogger, read_status
from nvp3d.training.fit import train

IMAGE = (64, 48)


pytestmark = pytest.mark.usefixtures("one_thread")


class LossRecorder(pl.Callback):
    """Loss of every optimizer step, keyed by the step number after the update (1-based)."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])



def _quiet(*args) -> None:
    pass


@pytest.fixture(scope="module")
def data_dir(synthetic_data) -> Path:
    return synthetic_data("nvp3d_synth_64x48", seed=3, image_size=IMAGE)


def _spec(data: Path, out: Path, **train):
    spec = demo_spec(data, out, image_size=IMAGE, voxel_size=0.24, epochs=3, batch_size=2, lr=2e-3, num_gpus=0,
                     min_instance_pixels=8, checkpoint_interval=1)
    spec.train.validation_interval = 3
    spec.model.mask_former.train_num_points = 256
    for key, value in train.items():
        setattr(spec.train, key, value)
    return spec


@pytest.fixture(scope="module")
def reference_run(data_dir: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    spec = _spec(data_dir, out, checkpoint_interval_unit="step", keep_checkpoints=0)  # every step checkpoint kept
    rec = LossRecorder()
    status = StatusLogger(out / "train" / "status.json")
    kpi = train(spec, out / "train", status, say=_quiet, enable_progress_bar=False, callbacks=[rec])
    return {"out": out, "spec": spec, "losses": rec.losses, "kpi": kpi}


def test_training_lowers_loss_and_names_checkpoints(reference_run) -> None:
    losses = reference_run["losses"]
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]  # 4 frames, batch 2 -> 2 steps x 3 epochs
    assert (losses[5] + losses[6]) / 2 < 0.8 * (losses[1] + losses[2]) / 2, losses
    train_dir = reference_run["out"] / "train"
    names = sorted(p.name for p in train_dir.glob("model_epoch_*.pth"))
    assert names == [f"model_epoch_{(s - 1) // 2:03d}_step_{s:05d}.pth" for s in range(1, 7)]
    latest = train_dir / "panoptic_recon_3d_model_latest.pth"
    assert latest.is_symlink() and latest.resolve().name == "model_epoch_002_step_00006.pth"
    assert list((train_dir / "lightning_logs").glob("version_*/metrics.csv"))
    assert list((train_dir / "lightning_logs").glob("version_*/events.out.tfevents.*"))
    meta = torch.load(latest, weights_only=True)["nvp3d"]
    assert meta["stage"] == "2d" and meta["preset"] == "tiny" and meta["head"]["hidden_dim"] == 32
    effective = json.loads((train_dir / "model_effective.json").read_text())
    assert effective["preset"] == "tiny" and effective["hidden_dim"] == 32  # the tiny preset's value


def test_status_has_epoch_records_and_kpis(reference_run) -> None:
    records = read_status(reference_run["out"] / "train" / "status.json")
    epochs = [r for r in records if "epoch" in r]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert all(r["max_epoch"] == 3 and r["status"] == "RUNNING" and "eta" in r for r in epochs)
    assert [r["step"] for r in epochs] == [2, 4, 6]
    last = records[-1]
    for key in ("PQ", "PQ_st", "val_dpq_-1.0", "val_dpq_0.5", "val_dpq_0.25", "val_dpq_0.1", "val_loss",
                "train_loss"):
        assert key in last["kpi"], key


def test_resume_after_crash_is_exact(reference_run, data_dir: Path, tmp_path: Path, crash_at) -> None:
    spec = _spec(data_dir, tmp_path, checkpoint_interval_unit="step")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(spec, tmp_path / "train", None, say=_quiet, enable_progress_bar=False, callbacks=[crash_at(3)])
    rec = LossRecorder()
    train(spec, tmp_path / "train", None, say=_quiet, enable_progress_bar=False, callbacks=[rec])  # auto-resume
    ref = reference_run["losses"]
    assert sorted(rec.losses) == [4, 5, 6]
    for step, loss in rec.losses.items():
        assert loss == pytest.approx(ref[step], rel=1e-4), (step, loss, ref[step])
    a = torch.load(tmp_path / "train" / "model_epoch_002_step_00006.pth", weights_only=True)["state_dict"]
    b = torch.load(reference_run["out"] / "train" / "model_epoch_002_step_00006.pth", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def _augmented(spec):
    spec.dataset.augmentation.random_flip = "horizontal"
    spec.dataset.augmentation.color_aug_ssd = True
    return spec


def test_augmented_training_resumes_exactly(reference_run, data_dir: Path, tmp_path: Path, crash_at) -> None:
    # flips and colour draws are keyed by (seed, epoch, index): the resumed run rebuilds the same samples
    ref_rec = LossRecorder()
    spec = _augmented(_spec(data_dir, tmp_path / "ref", checkpoint_interval_unit="step"))
    train(spec, tmp_path / "ref" / "train", None, say=_quiet, enable_progress_bar=False, callbacks=[ref_rec])
    plain = reference_run["losses"]
    assert any(abs(ref_rec.losses[s] - plain[s]) > 1e-3 * abs(plain[s]) for s in plain)  # augmentation acts
    spec = _augmented(_spec(data_dir, tmp_path / "crash", checkpoint_interval_unit="step"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(spec, tmp_path / "crash" / "train", None, say=_quiet, enable_progress_bar=False,
              callbacks=[crash_at(3)])
    rec = LossRecorder()
    train(spec, tmp_path / "crash" / "train", None, say=_quiet, enable_progress_bar=False, callbacks=[rec])
    assert sorted(rec.losses) == [4, 5, 6]
    for step, loss in rec.losses.items():
        assert loss == pytest.approx(ref_rec.losses[step], rel=1e-4), (step, loss, ref_rec.losses[step])


def test_sampler_yields_epoch_keys_for_augmented_splits() -> None:
    from datasets3d.augment import AugmentKey
    from nvp3d.data.sampler import ResumableSampler

    sampler = ResumableSampler(6, seed=5, batch_size=2, epoch_keys=True)
    sampler.set_epoch(3)
    keys = list(sampler)
    assert all(isinstance(k, AugmentKey) and k.epoch == 3 for k in keys)
    assert [k.index for k in keys] == sampler.epoch_indices(3)
    sampler.resume(3, 2)
    assert [k.index for k in sampler] == sampler.epoch_indices(3)[2:]


def test_evaluate_writes_kpis_and_tables(reference_run, tmp_path: Path) -> None:
    spec = reference_run["spec"]
    spec.evaluate.checkpoint = str(reference_run["out"] / "train" / "panoptic_recon_3d_model_latest.pth")
    spec.evaluate.num_gpus = 0
    status = StatusLogger(tmp_path / "status.json")
    kpi = evaluate(spec, tmp_path, status, say=_quiet)
    metrics = json.loads((tmp_path / METRICS_FILENAME).read_text())
    assert set(metrics["per_class"]) == {"-1.0", "0.5", "0.25", "0.1"}
    assert [r["class_id"] for r in metrics["per_class"]["-1.0"]] == list(range(1, 13))
    assert metrics["frames"] == 4
    rows = metrics["per_class"]["-1.0"]
    present = [r for r in rows if r["TP"] + r["FP"] + r["FN"] > 0]
    if present:  # the KPI is the mean of the per-class PQ over classes that occur
        assert kpi["PQ"] == pytest.approx(sum(r["PQ"] for r in present) / len(present), abs=1e-6)
    else:
        assert kpi["PQ"] != kpi["PQ"]  # NaN: nothing predicted or present outside void
    records = read_status(tmp_path / "status.json")
    assert records[-1]["message"] == "Evaluation metrics generated."
    for key in ("PQ", "PQ_th", "PQ_st", "test_dpq_0.1", "test_dpq_averages", "test_loss"):
        assert key in records[-1]["kpi"], key
    assert kpi.keys() == records[-1]["kpi"].keys()
    # depth accuracy of the same frames (nvp3d.evaluation.depth2d): RMSE >= MAE, delta-1 a percentage
    assert 0.0 <= kpi["test_depth_mae"] <= kpi["test_depth_rmse"]
    assert kpi["test_depth_abs_rel"] >= 0.0 and 0.0 <= kpi["test_depth_delta1"] <= 100.0
    assert kpi["test_depth_abs_rel_scaled"] >= 0.0 and kpi["test_depth_log_scale"] >= 0.0
    assert metrics["kpi"]["test_depth_rmse"] == kpi["test_depth_rmse"]
    # where the GT things went, under plain PQ's matching: its matches are PQ's thing TPs, and every GT thing
    # PQ counts (TP or FN) is one outcome (symmetric void can spare a mostly-unpredicted GT thing its FN)
    things, thing_rows = metrics["things"], [r for r in rows if r["class_id"] <= 9]
    assert things["matched"] == sum(r["TP"] for r in thing_rows)
    assert things["gt_things"] >= sum(r["TP"] + r["FN"] for r in thing_rows) and things["gt_things"] > 0
    assert things["gt_things"] == sum(things[k] for k in ("matched", "same_class_low_iou", "other_class_by_stuff",
                                                            "other_class_by_thing", "missed"))
    assert things["pred_things"] - things["matched"] == sum(things[k] for k in ("duplicate", "low_iou", "spurious"))


@pytest.mark.slow  # bf16 convolutions are slow on CPUs without native bf16 support
def test_dry_run_in_bf16_trains_one_batch(data_dir: Path, tmp_path: Path) -> None:
    spec = _spec(data_dir, tmp_path, precision="bf16", is_dry_run=True)
    rec = LossRecorder()
    train(spec, tmp_path / "train", None, say=_quiet, enable_progress_bar=False, callbacks=[rec])
    assert list(rec.losses) == [1] and torch.isfinite(torch.tensor(rec.losses[1]))
    assert not list((tmp_path / "train").glob("*.pth"))  # a dry run writes no checkpoint
