"""Smoke test of ``tools/bench_writers.py`` on a small grid: every writer part is timed and the files it
writes are real (the npz holds the volumes; the mesh has triangles)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np


def test_bench_writers_small_grid(repo_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    tool = importlib.import_module("bench_writers")
    rec = tool.synthetic_reconstruction(48)
    assert rec.geometry.shape == (48, 48, 48) and (rec.geometry < 1.0).any()
    assert {int(s) for s in np.unique(rec.panoptic)} >= {0, 10, 11, 12}  # the room's stuff and the objects
    out = tmp_path / "row.json"
    assert tool.main(["--grid", "48", "--repeats", "1", "--workers", "1", "--launcher", "2000",
                      "--outputs", "volumes", "depth,preview", "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["faces"] > 1000 and row["npz_mb"] > 0
    for part in ("overlays", "npz", "mesh", "ply", "preview", "save_reconstruction", "images_per_s_1_threads",
                 "launcher_alone_s", "launcher_beside_thread_s", "launcher_beside_process_s",
                 "save_reconstruction[volumes]", "save_reconstruction[depth,preview]"):
        assert row[part] > 0
    # the ratios are the launcher's times beside a writer over its time alone
    assert row["slowdown_thread"] == row["launcher_beside_thread_s"] / row["launcher_alone_s"]
    assert row["slowdown_process"] == row["launcher_beside_process_s"] / row["launcher_alone_s"]
