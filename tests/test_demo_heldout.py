"""``tools/demo_heldout.py`` scores a finished demo run on extra unseen rooms made for the run's camera, and
refuses a held-out folder generated for another camera."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_heldout_scores_a_run_on_new_rooms(repo_root: Path, tmp_path: Path, monkeypatch) -> None:
    from nvp3d.demo.run import demo

    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    tool = importlib.import_module("demo_heldout")
    run = tmp_path / "run"
    demo(run, scenes=2, frames_per_scene=1, grid=32, image_size=(64, 48), epochs=1, say=lambda *_: None,
         enable_progress_bar=False, stage3d=False, extra_test_scenes=0)
    held = tmp_path / "held"
    out = tmp_path / "rows.json"
    assert tool.main([str(run), "--data", str(held), "--scenes", "2", "--frames-per-scene", "1",
                      "--json", str(out)]) == 0
    frames = json.loads((held / "meta" / "heldout.json").read_text())
    assert len(frames) == 2 and {f["scene_id"] for f in frames} == {f"synth-{tool.HELDOUT_SEED:04d}-0000{i}"
                                                                     for i in (0, 1)}
    (row,) = json.loads(out.read_text())
    assert row["run"] == str(run) and "3d" not in row  # no 3D stage in this run
    assert set(row["2d"]) >= {"PQ", "PQ_th", "PQ_st", "things"}
    assert row["2d"]["things"]["gt_things"] >= 0
    metrics = json.loads((held / "evaluations" / "run_2d" / "metrics_2d.json").read_text())
    assert metrics["frames"] == 2
    # a held-out folder made for another image size is refused, not silently mixed
    other = tmp_path / "other"
    demo(other, scenes=2, frames_per_scene=1, grid=32, image_size=(48, 36), epochs=1, say=lambda *_: None,
         enable_progress_bar=False, stage3d=False, extra_test_scenes=0)
    with pytest.raises(SystemExit, match="another camera"):
        tool.main([str(other), "--data", str(held)])
