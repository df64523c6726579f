"""The ``export`` and ``gen_trt_engine`` actions: ``run_export(spec, results_dir, status)`` and
``run_gen_trt_engine(spec, results_dir, status)`` (the signature of :data:`nvp3d.actions.ACTIONS`).

``run_export`` order of work, so that bad input fails before anything expensive:
output paths writable -> (format tensorrt: TensorRT importable) -> checkpoint exists and holds the right
stage -> build and load -> PyTorch reference -> trace -> onnxruntime check -> (engines) -> manifest.
A 3D checkpoint also gets the four sparse-level graphs (``export.max_voxels`` rows each) next to the dense
one, see :mod:`nvp3d.export.sparse_export`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nvp3d.errors import ExportFileNotFoundError, ExportInputError
from nvp3d.export.checkpoint_stage import read_checkpoint, require_2d, require_3d
from nvp3d.export.files import check_writable
from nvp3d.export.model2d import INPUT_NAME_2D, Export2DWrapper, outputs_tuple
from nvp3d.export.model3d import OUTPUT_NAMES_3D, DenseCompletion64, example_inputs_3d
from nvp3d.export.networks import build_2d_model, build_3d_dense, build_projector, pick_device
from nvp3d.export.onnx_export import (
    DEFAULT_RTOL,
    OnnxExportResult,
    check_opset,
    compare_outputs,
    export_onnx,
    run_onnxruntime,
)
from nvp3d.export.sparse_export import export_3d_sparse, sparse_graph_paths
from nvp3d.export.tensorrt_engine import EngineSettings, build_engine, import_tensorrt
from nvp3d.fileio import atomic_write_text
from nvp3d.model.checkpoint import is_3d_key

#: what the manifest says runs outside the graphs of a 3D export
_RUNS_OUTSIDE = ("back-projection and lifting (frustum3d); all sparse coordinate work between the graphs: "
                 "kernel maps, unions, generative output sets, dropping voxels outside the grid, pruning "
                 "(nvp3d.export.sparse_driver, PyTorch)")
DEFAULT_2D_NAME = "nvpanoptix3d_2d.onnx"
DEFAULT_3D_NAME = "nvpanoptix3d_3d_dense64.onnx"
MANIFEST_NAME = "export_manifest.json"


def example_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A deterministic (B, 3, H, W) RGB batch in 0..255 (smooth gradients plus noise, like a photo)."""
    gen = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height)[:, None]
    xs = torch.linspace(0, 1, width)[None, :]
    base = torch.stack(torch.broadcast_tensors(ys * xs, 1 - ys, xs)).expand(batch, 3, height, width)
    noise = torch.rand(batch, 3, height, width, generator=gen)
    return (255.0 * (0.7 * base + 0.3 * noise)).clamp(0, 255)


def _fp32_exact() -> None:
    """TF32 would make the PyTorch reference differ from onnxruntime by ~1e-3 on Ampere+ GPUs."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def export_2d(model: torch.nn.Module, path: Path, *, input_hw: tuple[int, int], batch_size: int, opset: int,
              device: torch.device, projector: torch.nn.Module | None = None, verify: bool = True,
              verbose: bool = False, rtol: float = DEFAULT_RTOL) -> tuple[OnnxExportResult, dict[str, float]]:
    """Export the 2D stage of ``model`` to ``path`` and (``verify``) check it with onnxruntime on the CPU.

    ``batch_size`` -1 exports a symbolic batch (traced at 1); a positive value fixes it. With the 3D stage's
    ``projector`` the graph also outputs ``encoder_features``. Returns the export result and the per-output
    max relative errors (empty when not verified).
    """
    _fp32_exact()
    model = model.to(device).eval()
    if projector is not None:
        projector = projector.to(device).eval()
    wrapper = Export2DWrapper(model, input_hw, projector).eval()
    names = wrapper.output_names
    batch = 1 if batch_size == -1 else batch_size
    images = example_images(batch, *input_hw).to(device)
    with torch.no_grad():  # the reference is the model's own forward, not the wrapper
        ref = dict(zip(names, outputs_tuple(model(images), wrapper.half_padded_hw, wrapper.padded_hw, projector),
                       strict=True))
    result = export_onnx(wrapper, (images,), path, input_names=[INPUT_NAME_2D], output_names=names,
                         opset=opset, dynamic_batch=batch_size == -1, static_outputs=("orig_pad_shape",),
                         verbose=verbose)
    errors: dict[str, float] = {}
    if verify:
        got = run_onnxruntime(path, {INPUT_NAME_2D: images.cpu().numpy()})
        errors = compare_outputs(ref, got, rtol)
    return result, errors


def export_3d_dense(module: DenseCompletion64, path: Path, *, batch_size: int, num_queries: int, opset: int,
                    device: torch.device, verify: bool = True, verbose: bool = False, rtol: float = DEFAULT_RTOL
                    ) -> tuple[OnnxExportResult, dict[str, float]]:
    """Export the dense 64^3 completion part and (``verify``) check it with onnxruntime on the CPU."""
    _fp32_exact()
    module = module.to(device).eval()
    batch = 1 if batch_size == -1 else batch_size
    inputs = example_inputs_3d(module.decoder, batch, num_queries, device)
    with torch.no_grad():
        ref = dict(zip(OUTPUT_NAMES_3D, module(*inputs), strict=True))
    names = module.input_names
    result = export_onnx(module, inputs, path, input_names=names, output_names=OUTPUT_NAMES_3D, opset=opset,
                         dynamic_batch=batch_size == -1, verbose=verbose)
    errors: dict[str, float] = {}
    if verify:
        got = run_onnxruntime(path, {n: t.cpu().numpy() for n, t in zip(names, inputs, strict=True)})
        errors = compare_outputs(ref, got, rtol)
    return result, errors


def _engine_settings(spec: Any, batch_size: int) -> EngineSettings:
    trt_spec = spec.gen_trt_engine.tensorrt
    lo, opt, hi = trt_spec.min_batch_size, trt_spec.opt_batch_size, trt_spec.max_batch_size
    if batch_size > 0:
        lo = opt = hi = batch_size
    return EngineSettings(fp16=trt_spec.data_type == "FP16", workspace_mib=trt_spec.workspace_size, min_batch=lo,
                          opt_batch=opt, max_batch=hi, timing_cache=spec.gen_trt_engine.timing_cache)


def _describe(result: OnnxExportResult, errors: Mapping[str, float]) -> dict[str, Any]:
    return {
        "files": [str(p) for p in result.files], "bytes": result.bytes, "seconds": round(result.seconds, 3),
        "opset": result.opset, "dynamic_batch": result.dynamic_batch, "external_data": result.external_data,
        "inputs": result.input_names, "outputs": result.output_names,
        "onnxruntime_max_rel_error": {k: float(v) for k, v in errors.items()},
    }


def run_export(spec: Any, results_dir: Path, status: Any) -> dict[str, Any]:
    """``nvp3d export``: the 2D graph (always) and the dense 3D graph (3D checkpoint or onnx_file_3d set)."""
    e = spec.export
    opset = check_opset(e.opset_version)
    want_3d = bool(e.onnx_file_3d) or bool(spec.dataset.enable_3d)
    path_2d = check_writable(e.onnx_file_2d or e.onnx_file or results_dir / DEFAULT_2D_NAME,
                             "export.onnx_file_2d" if (e.onnx_file_2d or not e.onnx_file) else "export.onnx_file")
    path_3d = check_writable(e.onnx_file_3d or results_dir / DEFAULT_3D_NAME, "export.onnx_file_3d") if want_3d else None
    # network options the 3D graphs do not carry (their weights differ, so no export-time setting can drop them)
    for key, missing in (("mask_prior_2d", "the 3D graphs have no 2D mask prior"),
                         ("fine_skip", "the sparse 3D graphs have no finest-level skip"),
                         ("query_refine_layers", "the sparse 3D graphs take the 2D queries unrefined"),
                         ("semantic_weight", "the sparse 3D graphs have no semantic head")):
        value = getattr(spec.model.frustum3d, key)
        if want_3d and value:
            shown = "true" if value is True else value
            raise ExportInputError(f"model.frustum3d.{key}: {shown} is not exported yet ({missing}); export the 2D graph "
                                   "only (leave export.onnx_file_3d empty and dataset.enable_3d false) or use a model "
                                   "trained without it")
    # fusion settings the 3D graphs do not compute (the weights are the same, so exporting without them works)
    for key, why in (("labels_2d_bands", "the 3D graphs output the 3D mask logits only"),
                     ("coarse_mask_weight", "the 3D graphs output the level-256 mask logits only"),
                     ("things_of_2d", "the 3D graphs output the 3D mask logits, not the 2D panoptic result"),
                     ("test_time_flip", "the 3D graphs lift one pass of the 2D network")):
        value = getattr(spec.model.frustum3d, key)
        if want_3d and value:
            shown, off = ("true", "false") if isinstance(value, bool) else (f"{value:g}", "0")
            raise ExportInputError(f"model.frustum3d.{key}: {shown} is not exported yet ({why}); export with "
                                   f"model.frustum3d.{key}={off} (an evaluation setting: the weights are the same)")
    if path_3d is not None and path_3d == path_2d:
        raise ExportInputError(f"export.onnx_file_3d and export.onnx_file_2d are the same file ({path_2d}); "
                               "give them different names")
    sparse_paths = sparse_graph_paths(path_3d) if path_3d is not None else {}
    for part, path in sparse_paths.items():
        check_writable(path, f"export.onnx_file_3d (sparse {part} graph)")
        if path in (path_2d, path_3d):
            raise ExportInputError(f"the sparse {part} graph would overwrite {path}; give export.onnx_file_3d "
                                   "another name")
    if e.format == "tensorrt":
        import_tensorrt("export.format=tensorrt")
    ckpt = read_checkpoint(e.checkpoint)
    require_2d(ckpt)
    if want_3d:
        require_3d(ckpt, why="export.onnx_file_3d is set" if e.onnx_file_3d else "dataset.enable_3d is true")
    elif ckpt.keys_3d:
        status.running("The checkpoint also holds 3D-stage weights; set export.onnx_file_3d (or dataset.enable_3d: "
                       "true) to export the dense 3D level as well.")
    device = pick_device(e.on_cpu, e.gpu_id)
    if "max_voxels" in e.model_fields_set and path_3d is None:
        status.running("export.max_voxels is unused: no 3D graph is exported (set export.onnx_file_3d).")
    input_hw = (e.input_height, e.input_width)
    status.running(f"Exporting the 2D model ({spec.model.preset}, {input_hw[0]}x{input_hw[1]}, "
                   f"batch {'dynamic' if e.batch_size == -1 else e.batch_size}, opset {opset}) on {device}.")
    model = build_2d_model(spec, ckpt)
    projector = build_projector(ckpt)
    ckpt.state = {k: v for k, v in ckpt.state.items() if is_3d_key(k)}  # 2D weights now live in the model
    res_2d, err_2d = export_2d(model, path_2d, input_hw=input_hw, batch_size=e.batch_size, opset=opset, device=device,
                               projector=projector, verbose=e.verbose)
    num_queries = model.head_config.num_queries
    del model, projector
    manifest: dict[str, Any] = {"checkpoint": str(ckpt.path), "checkpoint_stage": ckpt.stage,
                                "input_hw": list(input_hw), "onnx_2d": _describe(res_2d, err_2d)}
    kpi: dict[str, Any] = {"onnx_2d_bytes": res_2d.bytes, "onnx_2d_seconds": round(res_2d.seconds, 3),
                           "onnx_2d_max_rel_error": max(err_2d.values(), default=0.0)}
    status.running(f"Wrote {path_2d} ({res_2d.bytes / 2**20:.1f} MiB); onnxruntime max relative error "
                   f"{kpi['onnx_2d_max_rel_error']:.2e}.")
    if path_3d is not None:
        dense = build_3d_dense(spec, ckpt)
        res_3d, err_3d = export_3d_dense(dense, path_3d, batch_size=e.batch_size, num_queries=num_queries,
                                         opset=opset, device=device, verbose=e.verbose)
        manifest["onnx_3d_dense64"] = _describe(res_3d, err_3d)
        f3 = spec.model.frustum3d
        # the lifting runs outside the graphs: a deployment must lift with the band the network was trained with
        manifest["onnx_3d_dense64"]["lifting_band"] = float(f3.truncation if f3.lifting_band is None else f3.lifting_band)
        kpi.update(onnx_3d_bytes=res_3d.bytes, onnx_3d_seconds=round(res_3d.seconds, 3),
                   onnx_3d_max_rel_error=max(err_3d.values(), default=0.0))
        status.running(f"Wrote {path_3d} ({res_3d.bytes / 2**20:.1f} MiB); onnxruntime max relative error "
                       f"{kpi['onnx_3d_max_rel_error']:.2e}.")
        if dense.decoder.use_multi_scale:
            manifest["onnx_3d_dense64"]["runs_outside_onnx"] = (
                "back-projection, lifting, the sparse encoders with multi-scale adapters, pruning and the sparse "
                "128^3 and 256^3 levels (frustum3d, PyTorch): sparse graphs are not exported for use_multi_scale")
            status.running("The decoder uses multi-scale adapters: the sparse levels are not exported (they run "
                           "in PyTorch); only the dense 64^3 graph was written.")
        else:
            status.running(f"Exporting the sparse 3D levels ({len(sparse_paths)} graphs, export.max_voxels="
                           f"{e.max_voxels} rows each).")
            sparse = export_3d_sparse(dense.decoder, sparse_paths, max_voxels=e.max_voxels,
                                      num_queries=num_queries, opset=opset, device=device, verbose=e.verbose)
            manifest["onnx_3d_dense64"]["runs_outside_onnx"] = _RUNS_OUTSIDE
            manifest["onnx_3d_sparse"] = {"max_voxels": e.max_voxels, "batch_size": 1,
                                          "graphs": {p: _describe(r, err) for p, (r, err) in sparse.items()}}
            sizes = [r.bytes for r, _ in sparse.values()]
            worst = max((v for _, err in sparse.values() for v in err.values()), default=0.0)
            kpi.update(onnx_3d_sparse_bytes=sum(sizes),
                       onnx_3d_sparse_seconds=round(sum(r.seconds for r, _ in sparse.values()), 3),
                       onnx_3d_sparse_max_rel_error=worst)
            status.running(f"Wrote {len(sparse)} sparse graphs ({', '.join(p.name for p in sparse_paths.values())}; "
                           f"{sum(sizes) / 2**20:.1f} MiB); onnxruntime max relative error {worst:.2e}.")
    if e.format == "tensorrt":
        settings = _engine_settings(spec, e.batch_size)
        engines = {}
        for name, path in (("2d", path_2d), ("3d", path_3d)):
            if path is None:
                continue
            engine = build_engine(path, path.with_suffix(".engine"), settings, "export.format=tensorrt")
            engines[name] = {"path": str(engine.path), "bytes": engine.bytes, "seconds": round(engine.seconds, 3),
                             "precision": engine.precision}
            status.running(f"Built TensorRT {engine.precision} engine {engine.path}.")
        manifest["tensorrt_engines"] = engines
    atomic_write_text(results_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return kpi


def run_gen_trt_engine(spec: Any, results_dir: Path, status: Any) -> dict[str, Any]:
    """``nvp3d gen_trt_engine``: a TensorRT engine from ``gen_trt_engine.onnx_file`` (needs TensorRT + CUDA)."""
    g = spec.gen_trt_engine
    if not g.onnx_file:
        raise ExportInputError("gen_trt_engine.onnx_file is empty; set it to a graph written by nvp3d export "
                               f"(e.g. {DEFAULT_2D_NAME})")
    onnx_path = Path(g.onnx_file).expanduser()
    if not onnx_path.is_file():
        raise ExportFileNotFoundError(f"gen_trt_engine.onnx_file={g.onnx_file} does not exist; run nvp3d export "
                                      "first or fix the path")
    precision = g.tensorrt.data_type
    default_engine = results_dir / f"{onnx_path.stem}_{precision.lower()}.engine"
    engine_path = check_writable(g.trt_engine or default_engine, "gen_trt_engine.trt_engine")
    if g.timing_cache:
        check_writable(g.timing_cache, "gen_trt_engine.timing_cache")
    import_tensorrt("gen_trt_engine")
    status.running(f"Building a TensorRT {precision} engine from {onnx_path}.")
    result = build_engine(onnx_path, engine_path, _engine_settings(spec, g.batch_size))
    return {"engine_bytes": result.bytes, "engine_seconds": round(result.seconds, 3), "precision": result.precision}
