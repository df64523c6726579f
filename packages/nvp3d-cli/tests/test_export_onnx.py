"""ONNX export (issue 10): the exported graphs run in onnxruntime (CPU) and match PyTorch.

One ``run_export`` on a tiny 3D-stage checkpoint (2D model + completion decoder at a 32^3 grid) produces the
2D graph, the dense 3D graph and the four sparse 3D graphs (``export.max_voxels`` = 4096 rows); the tests then compare them on *new* inputs (another batch size, so the symbolic batch is exercised)
against independent PyTorch references: ``NVPanoptix3D.forward`` for the 2D graph and the full
``FrustumDecoder.forward`` (sparse levels included) for the dense 3D graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from frustum3d.decoder import FrustumDecoder, frustum_mask_at
from frustum3d.sparse import SparseVoxels
from nvp3d.config.loading import validate_spec
from nvp3d.export import (
    GRAPH_PARTS,
    INPUT_NAME_2D,
    OUTPUT_NAMES_2D,
    OUTPUT_NAMES_3D,
    ExportInputError,
    export_onnx,
    max_relative_error,
    onnxruntime_runners,
    run_export,
    run_exported_3d,
    run_onnxruntime,
    torch_runners,
)
from nvp3d.export import files as export_files
from nvp3d.export.checkpoint_stage import read_checkpoint
from nvp3d.export.model2d import outputs_tuple
from nvp3d.export.model3d import DenseCompletion64, decoder_from_state, decoder_kwargs_from_state
from nvp3d.export.sparse_driver import capped_keep
from nvp3d.model.build import build_net2d
from nvp3d.model.plane import ProjectionBlock
from nvp3d.status import StatusLogger, read_status

H, W = 60, 80  # export input size (padded to 64 x 96 by size_divisibility 32)
GRID = 32  # 3D grid side: the dense level is 8^3
RTOL = 1e-4
SPARSE_ROWS = 4096  # export.max_voxels of the tiny export
# the tiny preset: mask_dim 32 + projected depth features 32, 13 classes, hidden 32 (as nvp3d.model.build builds it)
DECODER_KW = dict(input_groups=(2, 64, 13, 16), query_dim=32, unet_features=4, unet_output_channels=4)


def _spec(tmp: Path, **export):
    return validate_spec({
        "model": {"preset": "tiny", "frustum3d": {"grid_dimensions": GRID}},
        "dataset": {"depth_size": [12, 16]},
        "export": {"input_height": H, "input_width": W, "on_cpu": True, **export},
        "results_dir": str(tmp / "results"),
    })


def _write_3d_checkpoint(path: Path) -> None:
    """A Lightning-style checkpoint of the 3D stage (the layout of nvp3d.model.NVPanoptix3D): the tiny 2D
    model's keys at the top level plus ``projector.*`` and ``completion.*``."""
    torch.manual_seed(0)
    model = build_net2d(_spec(path.parent))
    decoder = FrustumDecoder(**DECODER_KW, grid_dims=(GRID,) * 3)
    projector = ProjectionBlock(32, 32)
    torch.nn.init.normal_(projector.norm.weight)  # not the identity init, so a dropped norm would show
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"model.completion.{k}": v for k, v in decoder.state_dict().items()})
    state.update({f"model.projector.{k}": v for k, v in projector.state_dict().items()})
    torch.save({"state_dict": state, "epoch": 0}, path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Run the export action once (dynamic batch, opset 17) and hand its outputs to the tests."""
    tmp = tmp_path_factory.mktemp("export")
    ckpt = tmp / "model_epoch_000_step_00001.pth"
    _write_3d_checkpoint(ckpt)
    spec = _spec(tmp, checkpoint=str(ckpt), onnx_file_2d=str(tmp / "out" / "m2d.onnx"),
                 onnx_file_3d=str(tmp / "out" / "m3d.onnx"), max_voxels=SPARSE_ROWS)
    results = tmp / "results" / "export"
    results.mkdir(parents=True)
    status = StatusLogger(results / "status.json")
    kpi = run_export(spec, results, status)
    return dict(spec=spec, ckpt=ckpt, kpi=kpi, results=results, onnx_2d=tmp / "out" / "m2d.onnx",
                onnx_3d=tmp / "out" / "m3d.onnx")


@pytest.mark.slow  # one tiny 2D + 3D export through run_export: ~60-90 s on a busy 2-core CI box
def test_2d_graph_matches_model_forward_in_onnxruntime(exported):
    spec = exported["spec"]
    model = build_net2d(spec)
    state = read_checkpoint(str(exported["ckpt"])).state
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=True)
    model.eval()
    gen = torch.Generator().manual_seed(7)
    images = torch.rand(2, 3, H, W, generator=gen) * 255  # batch 2 on a graph traced at batch 1
    with torch.no_grad():
        out = model(images)
        projector = ProjectionBlock(32, 32).eval()
        projector.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("projector.")})
        mf = out["mask_features"]
        encoder_features = torch.cat([mf, projector(out["depth_features"], tuple(mf.shape[-2:]))], 1)
    padded = tuple(out["padded_size"])
    ref = (*outputs_tuple(out, (padded[0] // 2, padded[1] // 2), padded), encoder_features)
    names = (*OUTPUT_NAMES_2D, "encoder_features")
    got = run_onnxruntime(exported["onnx_2d"], {INPUT_NAME_2D: images.numpy()})
    assert list(got) == list(names)
    for name, r in zip(names, ref, strict=True):
        err = max_relative_error(r.numpy(), got[name])
        assert err < RTOL, f"{name}: relative error {err:.3g}"
    assert got["pred_logits"].shape == (2, 16, 14)
    assert got["pred_masks"].shape == (2, 16, padded[0] // 2, padded[1] // 2)
    assert got["occupancy_preds"].shape == (2, 100, 12, 16)
    assert got["encoder_features"].shape == (2, 64, *mf.shape[-2:])  # mask_dim + projected depth features
    np.testing.assert_array_equal(got["orig_pad_shape"], [64, 96])
    assert exported["kpi"]["onnx_2d_max_rel_error"] < RTOL


@pytest.mark.slow  # one tiny 2D + 3D export through run_export: ~60-90 s on a busy 2-core CI box
def test_2d_graph_contract_standard_ops_dynamic_batch_single_file(exported):
    path = exported["onnx_2d"]
    assert not path.with_name(path.name + ".data").exists()  # tiny model: no external data
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert {o.domain for o in graph.opset_import} == {""} and graph.opset_import[0].version == 17
    ops = {n.op_type for n in graph.graph.node}
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}  # no custom (plugin) ops
    assert "GridSample" in ops  # deformable attention sampling
    (inp,) = graph.graph.input
    assert inp.name == "batch_inputs"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, H, W]
    assert [o.name for o in graph.graph.output] == [*OUTPUT_NAMES_2D, "encoder_features"]


@pytest.mark.slow  # one tiny 2D + 3D export through run_export: ~60-90 s on a busy 2-core CI box
def test_3d_dense_graph_matches_full_decoder_forward(exported):
    state = read_checkpoint(str(exported["ckpt"])).state
    decoder = decoder_from_state(state, grid_side=GRID).eval()
    captured = {}
    decoder.enc2.register_forward_pre_hook(lambda _m, args: captured.setdefault("e1", args[0].clone()))
    gen = torch.Generator().manual_seed(3)
    batch, n = 2, 400
    coords = []
    for b in range(batch):
        flat = torch.randperm(GRID**3, generator=gen)[:n]
        xyz = torch.stack([flat // GRID**2, (flat // GRID) % GRID, flat % GRID], 1)
        coords.append(torch.cat([torch.full((n, 1), b), xyz], 1))
    coords = torch.cat(coords)
    lifted = SparseVoxels(coords, torch.randn(len(coords), sum(DECODER_KW["input_groups"]), generator=gen),
                          spatial_shape=(GRID,) * 3, batch_size=batch)
    queries = torch.randn(batch, 16, DECODER_KW["query_dim"], generator=gen)
    frustum = torch.zeros(batch, GRID, GRID, GRID, dtype=torch.bool)
    frustum[:, 4:28, 2:30, 8:] = True
    with torch.no_grad():
        out = decoder(lifted, queries, frustum)
    feeds = {"encoder_features_64": captured["e1"].numpy(), "segm_queries": queries.numpy(),
             "frustum_mask_64": frustum_mask_at(frustum, 4).numpy()}
    got = run_onnxruntime(exported["onnx_3d"], feeds)
    assert list(got) == list(OUTPUT_NAMES_3D)
    for name in ("occupancy_64", "panoptic_64"):
        ref = out[name].numpy()
        assert np.isinf(ref).any() and np.isfinite(ref).any()  # both inside and outside the frustum
        err = max_relative_error(ref, got[name])
        assert err < RTOL, f"{name}: relative error {err:.3g}"
    assert got["decoder_features_64"].shape == (batch, 16, GRID // 4, GRID // 4, GRID // 4)
    assert exported["kpi"]["onnx_3d_max_rel_error"] < RTOL


@pytest.mark.slow  # one tiny 2D + 3D export through run_export: ~60-90 s on a busy 2-core CI box
def test_manifest_and_status_record_what_was_written(exported):
    manifest = json.loads((exported["results"] / "export_manifest.json").read_text())
    assert manifest["checkpoint_stage"] == "3d"
    assert manifest["onnx_2d"]["outputs"] == [*OUTPUT_NAMES_2D, "encoder_features"]
    assert manifest["onnx_2d"]["dynamic_batch"] and not manifest["onnx_2d"]["external_data"]
    assert manifest["onnx_2d"]["bytes"] == exported["onnx_2d"].stat().st_size
    assert "sparse" in manifest["onnx_3d_dense64"]["runs_outside_onnx"]
    assert manifest["onnx_3d_dense64"]["lifting_band"] == 3.0  # the truncation: lifting_band left at null
    messages = [r.get("message", "") for r in read_status(exported["results"] / "status.json")]
    assert any("onnxruntime max relative error" in m for m in messages)
    leftovers = [p.name for p in exported["onnx_2d"].parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # staging folders are removed


@pytest.mark.slow  # one tiny 2D + 3D export through run_export: ~60-90 s on a busy 2-core CI box
def test_sparse_graphs_are_written_verified_and_recorded(exported):
    """The export action writes the four sparse graphs next to the dense one, each checked in onnxruntime, and
    the written files chained by run_exported_3d agree with the PyTorch graph modules on a new input.
    (This checkpoint's random decoder keeps too much for 4096 rows, so both runs cap every prune at 32
    voxels; the exact FrustumDecoder.forward comparison is in test_export_sparse.py.)"""
    out = exported["onnx_3d"].parent
    paths = {p: out / f"m3d_sparse_{p}.onnx" for p in GRAPH_PARTS}
    manifest = json.loads((exported["results"] / "export_manifest.json").read_text())
    sparse = manifest["onnx_3d_sparse"]
    assert sparse["max_voxels"] == SPARSE_ROWS and sparse["batch_size"] == 1 and list(sparse["graphs"]) == list(GRAPH_PARTS)
    for part, path in paths.items():
        entry = sparse["graphs"][part]
        assert entry["files"] == [str(path)] and entry["bytes"] == path.stat().st_size > 0
        assert entry["seconds"] > 0 and not entry["dynamic_batch"]
        assert entry["onnxruntime_max_rel_error"] and max(entry["onnxruntime_max_rel_error"].values()) < RTOL
        dims = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
        assert dims[0] == SPARSE_ROWS
    assert exported["kpi"]["onnx_3d_sparse_max_rel_error"] < RTOL
    assert exported["kpi"]["onnx_3d_sparse_bytes"] == sum(p.stat().st_size for p in paths.values())
    assert "pruning" in manifest["onnx_3d_dense64"]["runs_outside_onnx"]
    messages = [r.get("message", "") for r in read_status(exported["results"] / "status.json")]
    assert not any("max_voxels is ignored" in m or "max_voxels is unused" in m for m in messages)
    assert any("sparse graphs" in m for m in messages)

    decoder = decoder_from_state(read_checkpoint(str(exported["ckpt"])).state, grid_side=GRID).eval()
    gen = torch.Generator().manual_seed(4)
    ax = torch.arange(GRID)
    x, y, z = torch.meshgrid(ax, ax, ax, indexing="ij")
    shell = ((((x - 15) ** 2 + (y - 16) ** 2 + (z - 17) ** 2).float().sqrt() - 3).abs() < 0.8).nonzero()
    coords = torch.cat([torch.zeros(len(shell), 1, dtype=torch.int64), shell], 1)
    lifted = SparseVoxels(coords, torch.randn(len(coords), sum(DECODER_KW["input_groups"]), generator=gen),
                          spatial_shape=(GRID,) * 3, batch_size=1)
    queries = torch.randn(1, 16, DECODER_KW["query_dim"], generator=gen)
    frustum = torch.zeros(1, GRID, GRID, GRID, dtype=torch.bool)
    frustum[:, 4:28, 2:30, 8:] = True
    runs = []
    onnx_runners = onnxruntime_runners({**paths, "dense64": exported["onnx_3d"]}, threads=1)
    for runners in (torch_runners(decoder), onnx_runners):
        with torch.no_grad():
            runs.append(run_exported_3d(decoder, runners, lifted, queries, frustum, max_voxels=SPARSE_ROWS,
                                        keep_fn=capped_keep(32)))
    ref, got = runs
    assert 0 < len(got["coords_256"]) and len(got["coords_128"]) > 32  # the union with L0 adds voxels
    for key in ("occupancy_128", "occupancy_256", "panoptic_128", "panoptic_256", "geometry"):
        assert torch.equal(ref[key].coords, got[key].coords), key
        assert max_relative_error(ref[key].feats.numpy(), got[key].feats.numpy()) < RTOL, key
    for key in ("occupancy_64", "panoptic_64"):
        assert max_relative_error(ref[key].numpy(), got[key].numpy()) < RTOL, key


def test_decoder_sizes_are_read_from_the_weights():
    dec = FrustumDecoder(**DECODER_KW, use_multi_scale=True, multi_scale_channels=6, grid_dims=(GRID,) * 3)
    state = {f"completion.{k}": v for k, v in dec.state_dict().items()}
    kw = decoder_kwargs_from_state(state, "completion.")
    assert kw == dict(**DECODER_KW, use_multi_scale=True, multi_scale_channels=6, fine_skip=False,
                      query_refine_layers=0, semantic_classes=0)
    rebuilt = decoder_from_state(state, grid_side=GRID)
    for k, v in dec.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v)
    assert DenseCompletion64(rebuilt).input_names[-1] == "ms_features_32"
    skip = FrustumDecoder(**DECODER_KW, fine_skip=True, grid_dims=(GRID,) * 3)
    skip_state = {f"completion.{k}": v for k, v in skip.state_dict().items()}
    assert decoder_kwargs_from_state(skip_state, "completion.")["fine_skip"] is True
    assert decoder_from_state(skip_state, grid_side=GRID).skip_256 is not None
    refine = FrustumDecoder(**DECODER_KW, query_refine_layers=3, grid_dims=(GRID,) * 3)
    refine_state = {f"completion.{k}": v for k, v in refine.state_dict().items()}
    assert decoder_kwargs_from_state(refine_state, "completion.")["query_refine_layers"] == 3
    rebuilt = decoder_from_state(refine_state, grid_side=GRID)  # every refiner weight loads into the rebuilt decoder
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in refine.state_dict().items())
    semantic = FrustumDecoder(**DECODER_KW, semantic_classes=7, grid_dims=(GRID,) * 3)
    semantic_state = {f"completion.{k}": v for k, v in semantic.state_dict().items()}
    assert decoder_kwargs_from_state(semantic_state, "completion.")["semantic_classes"] == 7
    rebuilt = decoder_from_state(semantic_state, grid_side=GRID)  # strictly loaded: the head's weights included
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in semantic.state_dict().items())


def test_3d_dense_static_batch_with_multi_scale_input(tmp_path):
    torch.manual_seed(1)
    dec = FrustumDecoder(**DECODER_KW, use_multi_scale=True, multi_scale_channels=6, grid_dims=(GRID,) * 3).eval()
    dense = DenseCompletion64(dec).eval()
    gen = torch.Generator().manual_seed(5)
    inputs = (torch.randn(2, 8, 8, 8, 8, generator=gen), torch.randn(2, 5, 32, generator=gen),
              torch.rand(2, 8, 8, 8, generator=gen) > 0.3, torch.randn(2, 16, 4, 4, 4, generator=gen))
    result = export_onnx(dense, inputs, tmp_path / "d.onnx", input_names=dense.input_names,
                         output_names=OUTPUT_NAMES_3D, opset=18, dynamic_batch=False)
    graph = onnx.load(str(result.path))
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2  # static batch
    got = run_onnxruntime(result.path, {n: t.numpy() for n, t in zip(dense.input_names, inputs, strict=True)})
    with torch.no_grad():
        ref = dense(*inputs)
    for name, r in zip(OUTPUT_NAMES_3D, ref, strict=True):
        assert max_relative_error(r.numpy(), got[name]) < RTOL


class _Affine(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.lin(x).relu()


@pytest.mark.parametrize("limit,external", [(10**9, False), (1000, True)])
def test_external_data_only_above_the_protobuf_limit(tmp_path, monkeypatch, limit, external):
    """The 2 GB rule, exercised with a lowered limit: above it one ``.data`` file, below it one file."""
    monkeypatch.setattr(export_files, "PROTOBUF_LIMIT_BYTES", limit)
    model = _Affine().eval()
    x = torch.randn(3, 64)
    result = export_onnx(model, (x,), tmp_path / "a.onnx", input_names=["x"], output_names=["y"])
    data = tmp_path / "a.onnx.data"
    assert result.external_data is external and data.exists() is external
    assert sorted(p.name for p in tmp_path.iterdir()) == (["a.onnx", "a.onnx.data"] if external else ["a.onnx"])
    got = run_onnxruntime(result.path, {"x": x.numpy()})["y"]
    with torch.no_grad():
        assert max_relative_error(model(x).numpy(), got) < RTOL


def test_max_relative_error_rules():
    a = np.array([1.0, -np.inf, 2.0])
    assert max_relative_error(a, a + np.array([0, 0, 2e-5])) == pytest.approx(1e-5)
    assert max_relative_error(a, np.array([1.0, 0.0, 2.0])) == float("inf")  # -inf pattern must match
    assert max_relative_error(a, a[:2]) == float("inf")
    assert max_relative_error(np.array([1, 2]), np.array([1, 3])) == float("inf")


def test_opset_below_gridsample_is_rejected(tmp_path):
    with pytest.raises(ExportInputError, match="export.opset_version=15.*opset >= 16"):
        export_onnx(_Affine(), (torch.randn(1, 64),), tmp_path / "a.onnx", input_names=["x"], output_names=["y"],
                    opset=15)


@pytest.mark.parametrize("limit,external", [(10**9, False), (1000, True)])
def test_per_tensor_sidecars_are_merged_or_inlined(tmp_path, monkeypatch, limit, external):
    """torch writes one sidecar file per tensor above 2 GB; they end up in one ``.data`` file (above the limit)
    or back inside the graph (below it), and no sidecar or staging folder is left behind."""
    model = _Affine().eval()
    x = torch.randn(2, 64)
    source = export_onnx(model, (x,), tmp_path / "src" / "a.onnx", input_names=["x"], output_names=["y"]).path
    monkeypatch.setattr(export_files, "PROTOBUF_LIMIT_BYTES", limit)

    def write(tmp: Path) -> None:  # mimic torch's large-model layout: graph + one file per initializer
        onnx.save_model(onnx.load(str(source)), str(tmp), save_as_external_data=True,
                        all_tensors_to_one_file=False, size_threshold=0)

    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    target = tmp_path / "m.onnx"
    files = export_files.write_onnx_atomically(target, write)
    assert files == ([target, tmp_path / "m.onnx.data"] if external else [target])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files)
    got = run_onnxruntime(target, {"x": x.numpy()})["y"]
    with torch.no_grad():
        assert max_relative_error(model(x).numpy(), got) < RTOL


def test_checkpoint_of_the_real_3d_stage_model_is_understood(tmp_path):
    """A checkpoint of nvp3d.model.NVPanoptix3D: both stages are found and load strictly, unchanged."""
    from nvp3d.export.checkpoint_stage import require_2d, require_3d
    from nvp3d.export.networks import build_2d_model, build_3d_dense, build_projector
    from nvp3d.model.build import build_net3d

    spec = validate_spec({"model": {"preset": "tiny", "frustum3d": {"grid_dimensions": GRID, "frustum_dims": GRID}},
                          "dataset": {"depth_size": [12, 16], "enable_3d": True}})
    torch.manual_seed(2)
    model3d = build_net3d(spec, thing_ids=(1, 2), stuff_ids=(10, 11))
    path = tmp_path / "model_epoch_000_step_00002.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model3d.state_dict().items()}}, path)
    ckpt = read_checkpoint(str(path))
    assert ckpt.stage == "3d"
    require_2d(ckpt)
    require_3d(ckpt)
    net2d = build_2d_model(spec, ckpt)
    for k, v in model3d.net2d.state_dict().items():
        assert torch.equal(net2d.state_dict()[k], v), k
    projector = build_projector(ckpt)
    for k, v in model3d.projector.state_dict().items():
        assert torch.equal(projector.state_dict()[k], v), k
    dense = build_3d_dense(spec, ckpt)
    for k, v in model3d.completion.state_dict().items():
        assert torch.equal(dense.decoder.state_dict()[k], v), k
