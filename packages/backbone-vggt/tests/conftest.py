"""Shared fixtures: locate the golden data at <repo root>/../shared/golden and load it once per session."""

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


def _golden_file(name: str) -> Path:
    path = GOLDEN_DIR / name
    if not path.exists():
        pytest.skip(f"golden file {path} absent (shared/ folder next to the repo root not present)")
    return path


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden folder {GOLDEN_DIR} absent")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def vggt_tiny() -> dict:
    return torch.load(_golden_file("vggt_tiny.pt"))


@pytest.fixture(scope="session")
def dinov2_golden() -> dict:
    return torch.load(_golden_file("dinov2_small_reg.pt"))


@pytest.fixture(scope="session")
def vggt_keys() -> dict:
    import json

    return json.loads(_golden_file("vggt_keys.json").read_text())


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    """Goldens were made with TF32 off; keep matmuls exact and seeds fixed in every test."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
