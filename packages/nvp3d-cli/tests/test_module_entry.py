"""``python -m nvp3d`` runs the command line (it used to fail: only ``python -m nvp3d.cli`` worked)."""

from __future__ import annotations

import subprocess
import sys

from nvp3d import __version__


def test_python_dash_m_nvp3d_runs_the_cli() -> None:
    result = subprocess.run([sys.executable, "-m", "nvp3d", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert __version__ in result.stdout


def test_python_dash_m_nvp3d_reports_spec_errors_like_the_script(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "nvp3d", "train", "-e", str(tmp_path / "absent.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "spec file not found" in result.stderr
