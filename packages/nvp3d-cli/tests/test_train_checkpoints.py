"""Checkpoint names, atomic pointer, and exact resume (mid-epoch and end-of-epoch) on a toy module.

The reference is an uninterrupted run: a run that crashes and resumes from its latest checkpoint must
produce the same loss at every later step and the same final weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from nvp3d.data.sampler import LoaderPosition, ResumableSampler, apply_loader_position
from nvp3d.training.checkpointing import PeriodicCheckpoint, checkpoint_name, find_latest_checkpoint
from nvp3d.training.optim import build_scheduler
from nvp3d.training.seeding import StepSeed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_SAMPLES, BATCH = 20, 4  # 5 batches per epoch


class _ToyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
        self.losses: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses[self.global_step + 1] = float(loss.detach())
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return {"optimizer": opt, "lr_scheduler": build_scheduler(opt, "WarmupPoly", max_steps=10, warmup_iters=2,
                                                                  warmup_factor=0.5)}


class _ToyData(pl.LightningDataModule):
    def __init__(self, num_workers: int = 0, passes: int = 1) -> None:
        super().__init__()
        self.passes = passes
        g = torch.Generator().manual_seed(1)
        x = torch.randn(N_SAMPLES, 3, generator=g)
        self.data = TensorDataset(x, x.sum(1, keepdim=True) ** 2)
        self.num_workers = num_workers

    def train_dataloader(self):
        sampler = ResumableSampler(N_SAMPLES, shuffle=True, seed=7, batch_size=BATCH, passes=self.passes)
        apply_loader_position(self.trainer, sampler)
        return DataLoader(self.data, batch_size=BATCH, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, generator=sampler.generator)



def _fit(tmp: Path, *, epochs: int, interval: int, unit: str, extra=(), ckpt=None, num_workers: int = 0,
         passes: int = 1):
    module = _ToyModule()
    ckpt_cb = PeriodicCheckpoint(tmp, interval=interval, unit=unit, latest_name="toy")
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[StepSeed(3), LoaderPosition(), ckpt_cb, *extra], use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=_ToyData(num_workers, passes), ckpt_path=ckpt)
    return module, ckpt_cb


def test_checkpoint_names_and_latest_pointer(tmp_path: Path) -> None:
    assert checkpoint_name(3, 1200) == "model_epoch_003_step_01200.pth"
    _, cb = _fit(tmp_path, epochs=2, interval=1, unit="epoch")
    files = sorted(p.name for p in tmp_path.glob("model_epoch_*.pth"))
    assert files == ["model_epoch_000_step_00005.pth", "model_epoch_001_step_00010.pth"]
    pointer = tmp_path / "toy_latest.pth"
    assert pointer.is_symlink() and os.readlink(pointer) == "model_epoch_001_step_00010.pth"
    assert find_latest_checkpoint(tmp_path, "toy") == (tmp_path / files[-1]).resolve()
    assert not list(tmp_path.glob(".*tmp*")), "temporary files must be renamed away"
    state = torch.load(tmp_path / files[0], weights_only=True)
    assert state["global_step"] == 5 and state["epoch"] == 0


def test_step_interval_names(tmp_path: Path) -> None:
    _fit(tmp_path, epochs=2, interval=3, unit="step")
    files = sorted(p.name for p in tmp_path.glob("model_epoch_*.pth"))
    # steps 3, 6, 9 plus the final checkpoint at the end of training (step 10)
    assert files == ["model_epoch_000_step_00003.pth", "model_epoch_001_step_00006.pth",
                     "model_epoch_001_step_00009.pth", "model_epoch_001_step_00010.pth"]


def _assert_same_tail(ref: _ToyModule, resumed: _ToyModule, first_step: int) -> None:
    steps = sorted(k for k in resumed.losses if k >= first_step)
    assert steps == list(range(first_step, 11))
    for s in steps:
        assert resumed.losses[s] == pytest.approx(ref.losses[s], rel=1e-6, abs=1e-7), s
    for a, b in zip(ref.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_resume_mid_epoch_is_exact(tmp_path: Path, crash_at) -> None:
    ref, _ = _fit(tmp_path / "ref", epochs=2, interval=3, unit="step")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path / "run", epochs=2, interval=3, unit="step", extra=[crash_at(4)])
    latest = find_latest_checkpoint(tmp_path / "run", "toy")
    assert latest is not None and latest.name == "model_epoch_000_step_00003.pth"
    resumed, _ = _fit(tmp_path / "run", epochs=2, interval=3, unit="step", ckpt=str(latest))
    _assert_same_tail(ref, resumed, first_step=4)


def test_resume_from_end_of_epoch_trains_exactly_one_more_epoch(tmp_path: Path) -> None:
    ref, _ = _fit(tmp_path / "ref", epochs=2, interval=1, unit="epoch")
    _fit(tmp_path / "run", epochs=1, interval=1, unit="epoch")
    latest = find_latest_checkpoint(tmp_path / "run", "toy")
    assert latest is not None and latest.name == "model_epoch_000_step_00005.pth"
    resumed, _ = _fit(tmp_path / "run", epochs=2, interval=1, unit="epoch", ckpt=str(latest))
    _assert_same_tail(ref, resumed, first_step=6)
    assert (tmp_path / "run" / "model_epoch_001_step_00010.pth").is_file()


def test_sampler_shards_and_skips() -> None:
    a = ResumableSampler(10, seed=1, rank=0, world_size=2, batch_size=2)
    b = ResumableSampler(10, seed=1, rank=1, world_size=2, batch_size=2)
    ia, ib = list(a), list(b)
    assert len(ia) == len(ib) == 4 and not set(ia) & set(ib)
    a.resume(0, 2)
    assert list(a) == ia[2:]
    assert list(a) == ia  # the skip applies once
    a.set_epoch(1)
    assert list(a) != ia
    with pytest.raises(ValueError, match="batch_size"):
        ResumableSampler(3, batch_size=4)


def test_sampler_passes_fill_a_long_epoch() -> None:
    one = ResumableSampler(10, seed=3, batch_size=4)  # one pass: 8 indices (2 batches)
    three = ResumableSampler(10, seed=3, batch_size=4, passes=3)
    idx = list(three)
    assert len(idx) == len(three) == 24
    assert idx[:8] == list(one), "the first pass is the one-pass order"
    passes = [idx[k:k + 8] for k in (0, 8, 16)]
    assert all(len(set(p)) == 8 for p in passes), "a pass never repeats a frame"
    assert passes[0] != passes[1] != passes[2], "each pass has its own order"
    three.set_epoch(1)
    assert list(three)[:8] != passes[0]
    # an epoch of 5 batches of 4 over 10 frames (2 full batches per pass) needs 3 passes
    assert ResumableSampler.passes_for(10, 4, 1, 5) == 3
    assert ResumableSampler.passes_for(10, 4, 1, 2) == ResumableSampler.passes_for(10, 4, 1, None) == 1
    assert ResumableSampler.passes_for(40, 4, 2, 10) == 2  # per rank: 20 frames = 5 batches


def test_sampler_passes_draw_new_augmentations() -> None:
    from datasets3d.augment import AugmentKey

    s = ResumableSampler(6, seed=5, batch_size=2, epoch_keys=True, passes=2)
    s.set_epoch(4)
    keys = list(s)
    assert all(isinstance(k, AugmentKey) for k in keys)
    assert [k.epoch for k in keys] == [8] * 6 + [9] * 6, "draw = epoch * passes + pass"
    s.resume(4, 7)
    assert list(s) == keys[7:]


def test_resume_mid_epoch_is_exact_with_passes(tmp_path: Path, crash_at) -> None:
    # one epoch of 2 passes = 10 steps; the crash lands in the second pass
    ref, _ = _fit(tmp_path / "ref", epochs=1, interval=3, unit="step", passes=2)
    assert sorted(ref.losses) == list(range(1, 11))
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path / "run", epochs=1, interval=3, unit="step", extra=[crash_at(8)], passes=2)
    latest = find_latest_checkpoint(tmp_path / "run", "toy")
    assert latest is not None and latest.name == "model_epoch_000_step_00006.pth"
    resumed, _ = _fit(tmp_path / "run", epochs=1, interval=3, unit="step", ckpt=str(latest), passes=2)
    _assert_same_tail(ref, resumed, first_step=7)
