"""Fixtures shared by the AutoML tests: a spec file and a stand-in for one ``nvp3d train`` rung.

The stand-in lets the search logic (sampling, pruning, promotion, failures, storage) be tested in seconds;
the real subprocess path is covered by test_automl_search.py.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import yaml
from nvp3d.automl.trial_run import RungResult

#: Learning rates above this make the stand-in train run fail, like a diverging run would.
FAIL_LR = 3e-3


def write_spec(path: Path, results_dir: Path, **automl) -> Path:
    """A default spec (CPU) with an ``automl`` section; enough for the stand-in trials."""
    data = {"results_dir": str(results_dir), "train": {"num_gpus": 0},
            "automl": {"algorithm": "asha", "max_trials": 6, "max_epochs": 9, "min_epochs": 1, **automl}}
    path.write_text(yaml.safe_dump(data))
    return path


def fake_run_rung(trial_dir: Path, spec_path: Path, epochs: int, metric: str, *, cuda_visible, timeout_s=None,
                  extra_overrides=(), delay: float = 0.0) -> RungResult:
    """A rung whose loss depends on the trial's lr and falls with epochs; high lr fails with a reason."""
    time.sleep(delay)
    spec = yaml.safe_load(spec_path.read_text())
    lr = spec["train"]["optim"]["lr"]
    if lr > FAIL_LR:
        return RungResult(epochs=epochs, returncode=1, seconds=0.0,
                          error="nvp3d train: error: internal error: loss is NaN")
    value = abs(math.log10(lr) + 4.0) + 1.0 / epochs
    ckpt = trial_dir / "train" / f"model_epoch_{epochs - 1:03d}_step_{2 * epochs:05d}.pth"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_text("stand-in")
    return RungResult(epochs=epochs, returncode=0, seconds=0.0, value=value, fresh=True, step=2 * epochs,
                      checkpoint=str(ckpt), last_epoch=epochs - 1)


@pytest.fixture
def spec_writer():
    """``write_spec(path, results_dir, **automl)``."""
    return write_spec


@pytest.fixture
def fake_rung(monkeypatch):
    """Replace the search's ``run_rung`` by :func:`fake_run_rung`; returns the list of calls (trial dir, epochs)."""
    import nvp3d.automl.search as search

    calls: list[tuple[str, int]] = []

    def runner(trial_dir, spec_path, epochs, metric, **kwargs):
        calls.append((Path(trial_dir).name, epochs))
        return fake_run_rung(trial_dir, spec_path, epochs, metric, **kwargs)

    monkeypatch.setattr(search, "run_rung", runner)
    return calls
