"""``tools/bench_inference.py --checkpoint``: the benchmark's model takes the ``model`` section a checkpoint
records (a checkpoint trained with other 3D sizes than the preset's loads key-for-key), and a checkpoint of
another grid or without a record is refused in one line."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch


def _tool(repo_root: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    return importlib.import_module("bench_inference")


def _spec(tmp_path: Path, grid: int = 32):
    from nvp3d.demo.specs import demo_spec

    spec = demo_spec(tmp_path / "data", tmp_path / "runs", num_gpus=0)
    spec.dataset.enable_3d = True
    spec.model.frustum3d.grid_dimensions = spec.model.frustum3d.frustum_dims = grid
    return spec


def test_checkpoint_model_replaces_the_bench_model(repo_root: Path, tmp_path: Path, monkeypatch) -> None:
    from nvp3d.model.provenance import RECORD_KEY, spec_record

    tool = _tool(repo_root, monkeypatch)
    trained = _spec(tmp_path)
    trained.model.frustum3d.unet_features = 8  # not what the bench spec has
    trained.model.frustum3d.iso_recon_value = 0.75
    path = tmp_path / "model.pth"
    torch.save({"state_dict": {}, RECORD_KEY: spec_record(trained, None)}, path)

    bench = _spec(tmp_path)
    assert bench.model.frustum3d.unet_features != 8
    got = tool._model_of_checkpoint(bench, str(path))
    assert got.model.frustum3d.unet_features == 8 and got.model.frustum3d.iso_recon_value == 0.75
    assert got.model.preset == trained.model.preset
    assert got.dataset.target_size == bench.dataset.target_size  # only the model section is taken over

    with pytest.raises(SystemExit, match="trained at grid 32; pass --grid 32"):
        tool._model_of_checkpoint(_spec(tmp_path, grid=64), str(path))
    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(SystemExit, match="no nvp3d model record"):
        tool._model_of_checkpoint(bench, str(plain))


def test_profile_attributes_ops_to_call_sites_on_cpu(repo_root: Path, tmp_path: Path, monkeypatch) -> None:
    """``--profile``: one frame under torch.profiler, the ops grouped by their project call site (the sparse
    convolutions name frustum3d's functions) and the synchronising ops counted by call site."""
    import argparse

    tool = _tool(repo_root, monkeypatch)
    torch.set_num_threads(1)
    args = argparse.Namespace(preset="tiny", grid=32, image=(64, 48), checkpoint="", device="cpu",
                              dtypes=["fp32"], top=5, profile_batch=1)
    data = tool.make_frame(tmp_path / "data", args.grid, args.image)
    spec, dm, model = tool.build(args, data, torch.device("cpu"))
    model.eval()
    text = tool.profile_frame(args, dm, model, torch.device("cpu"))
    assert "### profile: one frame, fp32, batch 1" in text
    sites = text.split("ATen ops by call site")[1].split("synchronising ATen ops")[0]
    assert "frustum3d/" in sites  # the Python stacks were recorded (torch 2.11 needs the verbose config)
    syncs = text.split("synchronising ATen ops by call site (")[1]
    assert int(syncs.split(" calls")[0]) > 0 and "frustum3d/" in syncs


def test_time_decoder_modules_times_every_hooked_module(repo_root: Path, monkeypatch, capsys) -> None:
    """``tools/time_decoder_modules.py`` (CPU, tiny preset, 32^3, bf16 autocast): one row per decoder module with
    its voxel counts, and the frame's phases."""
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    tool = importlib.import_module("time_decoder_modules")
    monkeypatch.setattr("sys.argv", ["time_decoder_modules.py", "--preset", "tiny", "--grid", "32", "--image",
                                     "64x48", "--depth", "1", "--repeats", "1", "--device", "cpu"])
    tool.main()
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()[1:] if line.strip()}
    for name in ("dec0", "occupancy_256", "geometry_head", "phase"):
        assert name in rows, rows.keys()
    assert float(rows["dec0"].split()[0]) > 0 and " out " in rows["dec0"]


def test_stream_rows_compare_the_predictor_modes_on_cpu(repo_root: Path, tmp_path: Path, monkeypatch) -> None:
    """``--stream``: the Predictor one batch at a time, overlapped and with the deferred copy; each frame's
    outputs equal (CPU: the modes only change the order)."""
    import argparse
    import time

    tool = _tool(repo_root, monkeypatch)
    torch.set_num_threads(1)
    args = argparse.Namespace(preset="tiny", grid=32, image=(64, 48), checkpoint="", device="cpu", dtypes=["fp32"],
                              batches=[], stream=2, json="", deadline=0.0, t_start=time.perf_counter(),
                              compile_2d=False)
    data = tool.make_frame(tmp_path / "data", args.grid, args.image)
    spec, dm, model = tool.build(args, data, torch.device("cpu"))
    model.eval()
    model.completion.threshold = 0.95  # prune hard: a random decoder keeps about every voxel
    rows = tool.bench_stream(args, spec, data, model, torch.device("cpu"))
    assert [(r["dtype"], r["batch"]) for r in rows] == [("fp32", 1)]
    row = rows[0]
    assert "error" not in row, row
    assert all(row[f"{mode}_ms"] > 0 for mode in ("sequential", "overlapped", "deferred"))
    assert row["warmup_s"] > 0  # the first pass, timed on its own
    assert row["panoptic3d_equal"] == 1.0 and row["semantic3d_equal"] == 1.0 and row["tdf_max_abs"] == 0.0
    import nvp3d.inference.predictor as predictor_module
    from nvp3d.model.build import build_net3d
    from nvp3d.model.checkpoint import load_stage_weights

    # the benchmark's stand-ins for the network builder and weight loader do not outlive its Predictors
    assert predictor_module.build_net3d is build_net3d and predictor_module.load_stage_weights is load_stage_weights


def test_folder_rows_write_the_outputs_asked_for_on_cpu(repo_root: Path, tmp_path: Path, monkeypatch) -> None:
    """``--folder`` with ``--folder-configs ...@kinds``: each config's row runs ``nvp3d inference`` writing only
    those kinds (``inference.outputs``) and reports its images/s and each image's writing time."""
    import argparse
    import time

    tool = _tool(repo_root, monkeypatch)
    torch.set_num_threads(1)
    args = argparse.Namespace(preset="tiny", grid=32, image=(64, 48), checkpoint="", device="cpu", dtypes=["fp32"],
                              batches=[], folder=2, folder_configs=["eager:fp32:2:1@volumes", "eager:fp32:2:0"],
                              json="", deadline=0.0, t_start=time.perf_counter(), compile_2d=False)
    data = tool.make_frame(tmp_path / "data", args.grid, args.image)
    spec, dm, model = tool.build(args, data, torch.device("cpu"))
    model.eval()
    model.completion.threshold = 0.95  # prune hard: a random decoder keeps about every voxel
    rows = tool.bench_folder(args, spec, data, model, torch.device("cpu"))
    assert [r.get("error") for r in rows] == [None, None], rows
    from nvp3d.inference.writers import OUTPUT_KINDS

    assert rows[0]["outputs"] == ["volumes"] and rows[1]["outputs"] == list(OUTPUT_KINDS)
    for row in rows:
        assert row["images"] == 2 and row["images_per_second"] > 0 and row["write_seconds_mean"] > 0

