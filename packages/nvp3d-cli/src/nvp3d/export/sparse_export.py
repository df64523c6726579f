"""Export the four sparse 3D graphs (:mod:`frustum3d.decoder_graphs`) and check each in onnxruntime.

The graphs are traced on the feeds of one driver run (:func:`nvp3d.export.sparse_driver.run_exported_3d` with
the PyTorch graph modules) over a synthetic batch-1 input that is guaranteed to fit ``max_voxels``
(:func:`example_sparse_inputs`): a square patch of lifted voxels whose level-128 set has at most
``max_voxels / 128`` voxels, with every prune capped at ``max_voxels / 128`` kept voxels (a generative k4/s2
transposed convolution makes at most 64 children per voxel, so each generated set stays within the budget
whatever the checkpoint predicts). The onnxruntime check compares the valid rows of every output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from frustum3d.decoder import FrustumDecoder
from frustum3d.decoder_graphs import GRAPH_PARTS, SparseGraph, build_sparse_graphs
from frustum3d.sparse import SparseVoxels

from nvp3d.export.onnx_export import (
    DEFAULT_RTOL,
    OnnxExportResult,
    compare_outputs,
    export_onnx,
    run_onnxruntime,
)
from nvp3d.export.sparse_driver import KeepFn, capped_keep, run_exported_3d, torch_runners

__all__ = ["example_sparse_inputs", "export_3d_sparse", "sparse_graph_paths", "valid_outputs"]


def sparse_graph_paths(dense_path: Path) -> dict[str, Path]:
    """File of each sparse graph next to the dense one: ``<base>_sparse_<part>.onnx``, where ``<base>`` is the
    dense graph's stem without a trailing ``_dense64`` (``nvpanoptix3d_3d_dense64.onnx`` ->
    ``nvpanoptix3d_3d_sparse_encoder.onnx`` ...)."""
    stem = dense_path.stem
    base = stem[: -len("_dense64")] if stem.endswith("_dense64") and len(stem) > len("_dense64") else stem
    return {part: dense_path.with_name(f"{base}_sparse_{part}{dense_path.suffix or '.onnx'}") for part in GRAPH_PARTS}


def example_sparse_inputs(decoder: FrustumDecoder, max_voxels: int, num_queries: int, seed: int = 0,
                          device: torch.device | str = "cpu") -> tuple[SparseVoxels, torch.Tensor, torch.Tensor]:
    """A batch-1 lifted input that fits ``max_voxels`` after capped prunes (module docstring), random queries
    and a frustum covering the whole grid. The lifted voxels are a square patch on the plane z = Z/2."""
    gen = torch.Generator().manual_seed(seed)
    grid = decoder.grid_dims
    side = 2 * max(1, math.isqrt(max(1, max_voxels // 128)))
    side = min(side, grid[0] - grid[0] % 2, grid[1] - grid[1] % 2)
    x0, y0 = (grid[0] - side) // 4 * 2, (grid[1] - side) // 4 * 2  # even, so the patch is 2x2-aligned
    xs, ys = torch.meshgrid(torch.arange(x0, x0 + side), torch.arange(y0, y0 + side), indexing="ij")
    n = xs.numel()
    coords = torch.stack([torch.zeros(n, dtype=torch.int64), xs.flatten(), ys.flatten(),
                          torch.full((n,), grid[2] // 2)], 1)
    feats = torch.randn(n, sum(decoder.input_groups), generator=gen)
    lifted = SparseVoxels(coords.to(device), feats.to(device), spatial_shape=grid, batch_size=1)
    queries = torch.randn(1, num_queries, decoder.query_proj_64.in_features, generator=gen).to(device)
    frustum = torch.ones(1, *grid, dtype=torch.bool, device=device)
    return lifted, queries, frustum


def valid_outputs(graph: SparseGraph, feeds: Mapping[str, torch.Tensor], outputs: Mapping[str, object]
                  ) -> dict[str, np.ndarray]:
    """The outputs cut to their valid rows (``graph.output_rows``), as numpy arrays."""
    out = {}
    for name in graph.output_names:
        value = outputs[name]
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        rows = graph.output_rows.get(name)
        out[name] = arr[: int(feeds[rows][0])] if rows else arr
    return out


def export_3d_sparse(decoder: FrustumDecoder, paths: Mapping[str, Path], *, max_voxels: int, num_queries: int,
                     opset: int, device: torch.device, verify: bool = True, verbose: bool = False,
                     rtol: float = DEFAULT_RTOL, example: tuple | None = None, keep_fn: KeepFn | None = None
                     ) -> dict[str, tuple[OnnxExportResult, dict[str, float]]]:
    """Trace and write the sparse graphs (``paths[part]`` for each of :data:`GRAPH_PARTS`) with ``max_voxels``
    rows; with ``verify`` run each in onnxruntime (CPU) on its example feeds and compare the valid rows with
    the PyTorch module (raises :class:`~nvp3d.export.errors.OnnxMismatchError` above ``rtol``).

    ``example`` (lifted, queries, frustum) and ``keep_fn`` replace the synthetic input and its prune rule
    (the decoder's, capped at ``max_voxels // 128``); a level over the budget raises
    :class:`~nvp3d.export.sparse_driver.VoxelBudgetError`. Returns ``{part: (result, errors)}``.
    """
    torch.backends.cuda.matmul.allow_tf32 = False  # the PyTorch reference must be fp32 (as for the 2D graph)
    torch.backends.cudnn.allow_tf32 = False
    decoder = decoder.to(device).eval()
    graphs = build_sparse_graphs(decoder)
    lifted, queries, frustum = example or example_sparse_inputs(decoder, max_voxels, num_queries, device=device)
    record: dict[str, list] = {}
    with torch.no_grad():
        run_exported_3d(decoder, torch_runners(decoder), lifted, queries, frustum, max_voxels=max_voxels,
                        keep_fn=keep_fn or capped_keep(max(1, max_voxels // 128)), record=record)
    results: dict[str, tuple[OnnxExportResult, dict[str, float]]] = {}
    for part in GRAPH_PARTS:
        graph, feeds = graphs[part], record[part][0]
        inputs = tuple(feeds[n] for n in graph.input_names)
        result = export_onnx(graph, inputs, paths[part], input_names=graph.input_names,
                             output_names=graph.output_names, opset=opset, dynamic_batch=False, verbose=verbose)
        errors: dict[str, float] = {}
        if verify:
            with torch.no_grad():
                ref = graph.run(feeds)
            got = run_onnxruntime(paths[part], {n: t.detach().cpu().numpy() for n, t in zip(graph.input_names, inputs,
                                                                                            strict=True)})
            errors = compare_outputs(valid_outputs(graph, feeds, ref), valid_outputs(graph, feeds, got), rtol)
        results[part] = (result, errors)
    return results
