"""Shared fixtures: the golden Mask2Former data at <repo root>/../shared/golden."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _repo_root() -> Path:
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "uv.lock").exists() or (parent / ".git").exists():
            return parent
    return here.parents[3]


GOLDEN_DIR = _repo_root().parent / "shared" / "golden"
GOLDEN_FILE = GOLDEN_DIR / "mask2former_tiny.pt"


@pytest.fixture(scope="session")
def golden() -> dict:
    if not GOLDEN_FILE.exists():
        pytest.skip(f"golden data absent: {GOLDEN_FILE} (shared folder not checked out)")
    return torch.load(GOLDEN_FILE, weights_only=True)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Goldens were made with one thread; keep reductions in the same order where it matters."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
