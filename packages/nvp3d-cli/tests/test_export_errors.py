"""Bad input to ``nvp3d export`` / ``nvp3d gen_trt_engine``: one-line errors naming the key and the fix,
raised before any expensive work, and the missing-TensorRT message (TensorRT is not installed in CI)."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest
import torch
from nvp3d.config.loading import validate_spec
from nvp3d.export import (
    ExportFileNotFoundError,
    ExportInputError,
    TensorRTUnavailableError,
    UnwritableOutputError,
    WrongStageCheckpointError,
    run_export,
    run_gen_trt_engine,
)
from nvp3d.export.checkpoint_stage import read_checkpoint
from nvp3d.export.files import check_writable
from nvp3d.export.networks import build_2d_model
from nvp3d.model.build import build_net2d
from nvp3d.status import StatusLogger

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _spec(tmp: Path, section: str = "export", **values):
    return validate_spec({"model": {"preset": "tiny"}, "dataset": {"depth_size": [12, 16]},
                          "results_dir": str(tmp / "results"), section: values})


def _run(fn, spec, tmp: Path):
    results = tmp / "results" / "x"
    results.mkdir(parents=True, exist_ok=True)
    return fn(spec, results, StatusLogger(results / "status.json"))


def _save(path: Path, state: dict) -> Path:
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, path)
    return path


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_empty_and_missing_checkpoint(tmp_path):
    with pytest.raises(ExportInputError) as exc:
        _run(run_export, _spec(tmp_path), tmp_path)
    assert "export.checkpoint is empty" in _one_line(exc)
    with pytest.raises(FileNotFoundError) as exc:
        _run(run_export, _spec(tmp_path, checkpoint=str(tmp_path / "nope.pth")), tmp_path)
    assert isinstance(exc.value, ExportFileNotFoundError)
    assert "export.checkpoint=" in _one_line(exc) and "does not exist" in str(exc.value)


def test_2d_checkpoint_where_3d_is_needed(tmp_path):
    ckpt = _save(tmp_path / "c2d.pth", {"backbone.w": torch.zeros(2), "sem_seg_head.w": torch.zeros(2)})
    spec = _spec(tmp_path, checkpoint=str(ckpt), onnx_file_3d=str(tmp_path / "m3d.onnx"))
    with pytest.raises(WrongStageCheckpointError) as exc:
        _run(run_export, spec, tmp_path)
    msg = _one_line(exc)
    assert "2D-stage checkpoint" in msg and "export.onnx_file_3d" in msg and "enable_3d: true" in msg
    spec = validate_spec({"model": {"preset": "tiny"}, "dataset": {"enable_3d": True},
                          "results_dir": str(tmp_path / "results"), "export": {"checkpoint": str(ckpt)}})
    with pytest.raises(WrongStageCheckpointError, match="dataset.enable_3d is true"):
        _run(run_export, spec, tmp_path)


def test_3d_only_or_backbone_only_checkpoint_where_2d_is_needed(tmp_path):
    ckpt = _save(tmp_path / "c3d.pth", {"completion.occupancy_64.weight": torch.zeros(1, 16)})
    with pytest.raises(WrongStageCheckpointError) as exc:
        _run(run_export, _spec(tmp_path, checkpoint=str(ckpt)), tmp_path)
    assert "only 3D-stage weights (completion.*)" in _one_line(exc)
    vggt = tmp_path / "vggt.pt"
    torch.save({"aggregator.patch_embed.w": torch.zeros(1), "depth_head.w": torch.zeros(1)}, vggt)
    with pytest.raises(WrongStageCheckpointError) as exc:
        _run(run_export, _spec(tmp_path, checkpoint=str(vggt)), tmp_path)
    assert "official VGGT backbone weights" in _one_line(exc) and "pretrained_model_path" in str(exc.value)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"this is not a pickle")
    with pytest.raises(ExportInputError) as exc:
        _run(run_export, _spec(tmp_path, checkpoint=str(bad)), tmp_path)
    assert "not a readable PyTorch checkpoint" in _one_line(exc)


def test_checkpoint_of_another_size_or_incomplete(tmp_path):
    torch.manual_seed(0)
    spec = _spec(tmp_path)
    state = build_net2d(spec).state_dict()
    key = "sem_seg_head.predictor.class_embed.weight"
    wrong = dict(state, **{key: torch.zeros(3, 3)})
    with pytest.raises(WrongStageCheckpointError) as exc:
        build_2d_model(spec, read_checkpoint(str(_save(tmp_path / "w.pth", wrong))))
    assert key in _one_line(exc) and "model.preset" in str(exc.value)
    partial = {k: v for k, v in state.items() if k != key}
    with pytest.raises(WrongStageCheckpointError, match=f"lacks 1 tensors of the 2D model \\(first: {key}\\)"):
        build_2d_model(spec, read_checkpoint(str(_save(tmp_path / "p.pth", partial))))


def test_unwritable_output_paths(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UnwritableOutputError) as exc:  # parent "folder" is a file (works as root too)
        check_writable(blocker / "m.onnx", "export.onnx_file_2d")
    assert "export.onnx_file_2d=" in _one_line(exc) and "choose a writable path" in str(exc.value)
    with pytest.raises(UnwritableOutputError, match="is a folder"):
        check_writable(tmp_path, "export.onnx_file_2d")
    # the action checks outputs before it even reads the checkpoint
    spec = _spec(tmp_path, checkpoint=str(tmp_path / "missing.pth"), onnx_file_2d=str(blocker / "m.onnx"))
    with pytest.raises(UnwritableOutputError):
        _run(run_export, spec, tmp_path)
    spec = _spec(tmp_path, checkpoint="x.pth", onnx_file_2d=str(tmp_path / "same.onnx"),
                 onnx_file_3d=str(tmp_path / "same.onnx"))
    with pytest.raises(ExportInputError, match="same file"):
        _run(run_export, spec, tmp_path)


def test_old_opset_is_rejected_up_front(tmp_path):
    spec = _spec(tmp_path, checkpoint=str(tmp_path / "missing.pth"), opset_version=13)
    with pytest.raises(ExportInputError, match="export.opset_version=13"):
        _run(run_export, spec, tmp_path)


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the missing-TensorRT message cannot be shown")
def test_tensorrt_missing_message(tmp_path):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"graph")
    spec = _spec(tmp_path, "gen_trt_engine", onnx_file=str(onnx_file))
    with pytest.raises(TensorRTUnavailableError) as exc:
        _run(run_gen_trt_engine, spec, tmp_path)
    msg = _one_line(exc)
    assert "'tensorrt' Python package" in msg and "nvp3d-cli[tensorrt]" in msg
    # export.format=tensorrt fails fast, before the (missing) checkpoint is even looked at
    spec = _spec(tmp_path, checkpoint=str(tmp_path / "missing.pth"), format="tensorrt")
    with pytest.raises(TensorRTUnavailableError, match="export.format=tensorrt"):
        _run(run_export, spec, tmp_path)


def test_gen_trt_engine_needs_an_existing_onnx_file(tmp_path):
    with pytest.raises(ExportInputError, match="gen_trt_engine.onnx_file is empty"):
        _run(run_gen_trt_engine, _spec(tmp_path, "gen_trt_engine"), tmp_path)
    spec = _spec(tmp_path, "gen_trt_engine", onnx_file=str(tmp_path / "none.onnx"))
    with pytest.raises(FileNotFoundError, match="gen_trt_engine.onnx_file=.*does not exist"):
        _run(run_gen_trt_engine, spec, tmp_path)


def test_cli_prints_one_line_and_data_error_exit_code(tmp_path, restore_actions):
    from nvp3d.errors import ExitCode
    from nvp3d.runner import run_action

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(f"results_dir: {tmp_path / 'r'}\nmodel:\n  preset: tiny\n")
    err = io.StringIO()
    code = run_action("export", spec_file, [f"export.checkpoint={tmp_path / 'gone.pth'}"], out=io.StringIO(),
                      err=err)
    assert code == ExitCode.DATA_ERROR
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and "export.checkpoint=" in lines[0] and "does not exist" in lines[0]
    if not HAS_TENSORRT:
        restore_actions["gen_trt_engine"] = run_gen_trt_engine
        (tmp_path / "m.onnx").write_bytes(b"graph")
        err = io.StringIO()
        code = run_action("gen_trt_engine", spec_file, [f"gen_trt_engine.onnx_file={tmp_path / 'm.onnx'}"],
                          out=io.StringIO(), err=err)
        assert code == ExitCode.DATA_ERROR
        assert "tensorrt" in err.getvalue() and len(err.getvalue().strip().splitlines()) == 1


@pytest.mark.parametrize("key,value", [("mask_prior_2d", True), ("fine_skip", True), ("query_refine_layers", 2),
                                       ("semantic_weight", 1.0)])
def test_network_options_without_graphs_are_not_exported(tmp_path, key, value):
    spec = validate_spec({"model": {"preset": "tiny", "frustum3d": {key: value}},
                          "dataset": {"enable_3d": True}, "results_dir": str(tmp_path / "results"),
                          "export": {"checkpoint": str(tmp_path / "any.pth")}})
    with pytest.raises(ExportInputError) as exc:
        _run(run_export, spec, tmp_path)
    shown = "true" if value is True else str(value)
    assert f"model.frustum3d.{key}: {shown} is not exported" in _one_line(exc)


@pytest.mark.parametrize("key,value,off", [("labels_2d_bands", 1.0, "0"), ("coarse_mask_weight", 0.25, "0"),
                                           ("things_of_2d", True, "false"), ("test_time_flip", True, "false")])
def test_fusion_settings_are_not_exported(tmp_path, key, value, off):
    """Evaluation-time fusion settings the 3D graphs do not carry are refused by name, with the value to export
    with instead (the weights are the same)."""
    spec = validate_spec({"model": {"preset": "tiny", "frustum3d": {key: value}},
                          "dataset": {"enable_3d": True}, "results_dir": str(tmp_path / "results"),
                          "export": {"checkpoint": str(tmp_path / "any.pth")}})
    with pytest.raises(ExportInputError) as exc:
        _run(run_export, spec, tmp_path)
    assert f"model.frustum3d.{key}" in _one_line(exc) and f"{key}={off}" in str(exc.value)
