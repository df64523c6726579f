"""``tools/gpu_pending.sh`` (the pending GPU checks in one device call) refuses a machine without CUDA in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_pending_refuses_without_cuda(repo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(repo_root / "tools" / "gpu_pending.sh"), str(out)], cwd=repo_root,
                         env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"gpu_pending: {sys.executable} sees no CUDA device (or cannot import torch); run this on a GPU machine"]
    assert out.is_dir() and not any(out.iterdir())  # nothing ran, nothing half-written


def test_gpu_pending_refuses_an_unknown_list(repo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(repo_root / "tools" / "gpu_pending.sh"), str(out), "speed"], cwd=repo_root,
                         env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["gpu_pending: unknown list 'speed'; use inference or sparse"]
    assert not out.exists()
