"""frustum3d must be usable by other projects without the rest of nvp3d: build its wheel, install it
alone (next to torch) into a fresh virtual environment, import it and run a sparse convolution."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

SMOKE = """
import importlib.util, torch, frustum3d
import frustum3d.sparse as sp
for sibling in ("nvp3d", "datasets3d", "backbone_vggt", "maskformer_head"):
    assert importlib.util.find_spec(sibling) is None, sibling + " leaked into the frustum3d environment"
coords = torch.tensor([[0, 1, 1, 1], [0, 1, 2, 1], [0, 3, 3, 3]])
x = sp.SparseVoxels(coords, torch.randn(3, 4), stride=1, spatial_shape=(8, 8, 8), batch_size=1)
y = sp.SparseConv3d(4, 5, kernel_size=3)(x)
assert y.feats.shape == (3, 5)
print("frustum3d", frustum3d.__version__, "ok")
"""


@pytest.mark.slow
def test_frustum3d_wheel_installs_and_imports_alone(tmp_path: Path) -> None:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH (the workspace is installed with uv; CI always has it)")
    dist = tmp_path / "dist"
    subprocess.run([uv, "build", "--package", "frustum3d", "--wheel", "--out-dir", str(dist), "--quiet"],
                   cwd=REPO_ROOT, check=True)
    wheels = list(dist.glob("frustum3d-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp_path / "venv"
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    python = venv / "bin" / "python"
    torch_version = torch.__version__.split("+")[0]
    subprocess.run([uv, "pip", "install", "--quiet", "--python", str(python), str(wheels[0]),
                    f"torch=={torch_version}"], check=True)
    result = subprocess.run([str(python), "-c", SMOKE], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
