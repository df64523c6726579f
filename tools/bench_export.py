#!/usr/bin/env python
"""Benchmark ``nvp3d export``: ONNX export time, file size and onnxruntime agreement at full size.

Builds the composed NVPanoptix3D (``--preset full``: VGGT-1B + toolkit-sized head; random weights, nothing is
downloaded) and, with ``--with-3d``, a toolkit-sized completion decoder (f=16, query_dim 256, 256^3 grid ->
dense 64^3 level). Exports each through :func:`nvp3d.export.export_2d` / :func:`~nvp3d.export.export_3d_dense`
(the code paths of ``nvp3d export``), then runs the graph in onnxruntime on the CPU and reports the largest
relative error against PyTorch. Prints a markdown table; ``--json PATH`` also writes the rows.
Columns: ``export_s`` = trace + ONNX passes + writing the files; ``verify_s`` = the PyTorch reference forward
plus the onnxruntime (CPU) run; ``MiB`` = graph plus external data on disk.

With ``--with-sparse`` it also exports the four sparse-level graphs (:func:`nvp3d.export.export_3d_sparse`,
``--max-voxels`` rows, default 700000) on a synthetic scene with realistic voxel counts: the lifted input is a
3-voxel band around a wavy depth surface (~173k voxels at 256^3) and every prune keeps the candidates near
that surface (what a trained network does; the random weights' own prune would keep an arbitrary fraction).
It prints per graph the export time, size and onnxruntime-vs-PyTorch error, the voxel count of every
level, and the per-frame time of :func:`nvp3d.export.run_exported_3d` with the graphs run by PyTorch on
``--device`` and by onnxruntime (CUDAExecutionProvider when onnxruntime-gpu is installed, else the CPU),
plus the chain's max relative error between the two. For context it also times ``FrustumDecoder.forward``
itself (frustum3d's sparse backend, Triton on CUDA) with the driver's prune decisions replayed, so both build
the same voxel sets, and prints the driver's max relative error against it (the full-size equivalence check).
The padded graphs always process ``--max-voxels`` rows per set; the native decoder only the real voxels.

Run from the repo root on a CUDA machine (the coordinator's H100), e.g.:

    uv run --frozen --no-sync python tools/bench_export.py --with-3d
    uv run --frozen --no-sync python tools/bench_export.py --sizes 240x320,544x960 --batch-size -1
    uv run --frozen --no-sync python tools/bench_export.py --skip-2d --with-sparse

``--preset tiny --device cpu`` is a quick smoke test without a GPU. The full 2D graph is ~4.5 GB, so it is
written with one external-data file; peak host memory is roughly 3x the weights (~15 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from frustum3d.decoder import FrustumDecoder, decoder_input_groups
from frustum3d.sparse import SparseVoxels
from nvp3d.config.loading import validate_spec
from nvp3d.export import (
    DenseCompletion64,
    export_2d,
    export_3d_dense,
    export_3d_sparse,
    max_relative_error,
    onnxruntime_runners,
    run_exported_3d,
    sparse_graph_paths,
    torch_runners,
)
from nvp3d.model.build import build_net2d


def _sizes(text: str) -> list[tuple[int, int]]:
    """``"240x320,544x960"`` -> [(240, 320), (544, 960)] as (H, W)."""
    out = []
    for item in text.split(","):
        h, w = item.lower().split("x")
        out.append((int(h), int(w)))
    return out


def _row(part: str, size: str, device: torch.device, result, errors, verify_s: float | None) -> dict:
    return {
        "part": part, "input": size, "device": str(device), "export_s": round(result.seconds, 2),
        "verify_s": "-" if verify_s is None else round(verify_s, 2), "MiB": round(result.bytes / 2**20, 1),
        "files": len(result.files),
        "external_data": result.external_data, "dynamic_batch": result.dynamic_batch,
        "max_rel_err": f"{max(errors.values(), default=float('nan')):.2e}" if errors else "-",
    }


def _table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- sparse levels
def _surface_z(x: torch.Tensor, y: torch.Tensor, grid: int) -> torch.Tensor:
    """A wavy depth surface across the grid (finest-grid units)."""
    return grid / 2 + grid * 0.1875 * torch.sin(x / (grid * 0.09)) * torch.cos(y / (grid * 0.12))


def surface_scene(decoder: FrustumDecoder, num_queries: int, band: int, device: torch.device, seed: int = 0):
    """Batch-1 lifted input: the voxels within ``band`` of the surface in every column (a margin of grid/32 at
    the sides), random features and queries, and a frustum covering the grid."""
    grid = decoder.grid_dims[0]
    gen = torch.Generator().manual_seed(seed)
    ax = torch.arange(grid // 32, grid - grid // 32)
    x, y = torch.meshgrid(ax, ax, indexing="ij")
    z = _surface_z(x.float(), y.float(), grid).round().long()[..., None] + torch.arange(-band, band + 1)
    z = z.clamp(0, grid - 1)
    n = z.numel()
    coords = torch.stack([torch.zeros(n, dtype=torch.long), x[..., None].expand_as(z).flatten(),
                          y[..., None].expand_as(z).flatten(), z.flatten()], 1).unique(dim=0)
    feats = torch.randn(len(coords), sum(decoder.input_groups), generator=gen)
    lifted = SparseVoxels(coords.to(device), feats.to(device), spatial_shape=decoder.grid_dims, batch_size=1)
    queries = torch.randn(1, num_queries, decoder.query_proj_64.in_features, generator=gen).to(device)
    return lifted, queries, torch.ones(1, *decoder.grid_dims, dtype=torch.bool, device=device)


def surface_keep(grid: int, bands: dict[int, float]):
    """Prune rule of the synthetic scene: keep the candidates whose cell centre lies within ``bands[stride]``
    of the surface (ignores the logits, so the voxel sets are the same on every device and run)."""

    def keep(logits: torch.Tensor, coords: torch.Tensor, stride: int, settings) -> torch.Tensor:
        centre = coords[:, 1:].float() + stride / 2
        return (centre[:, 2] - _surface_z(centre[:, 0], centre[:, 1], grid)).abs() <= bands[stride]

    return keep


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _chain_error(ref: dict, got: dict) -> float:
    worst = 0.0
    for key, value in ref.items():
        if isinstance(value, SparseVoxels):
            if not torch.equal(value.coords.cpu(), got[key].coords.cpu()):
                return float("inf")
            a, b = value.feats, got[key].feats
        elif value.dtype.is_floating_point:
            a, b = value, got[key]
        else:
            continue
        worst = max(worst, max_relative_error(a.detach().cpu().numpy(), b.detach().cpu().numpy()))
    return worst


def _time_chain(decoder, runners, scene, max_voxels, keep, device, reps):
    """Mean seconds per frame of run_exported_3d over ``reps`` runs after one warm-up, per part too."""
    with torch.no_grad():
        out = run_exported_3d(decoder, runners, *scene, max_voxels=max_voxels, keep_fn=keep)
        _sync(device)
        parts: dict[str, float] = {}
        start = time.perf_counter()
        for _ in range(reps):
            out = run_exported_3d(decoder, runners, *scene, max_voxels=max_voxels, keep_fn=keep, timings=parts)
        _sync(device)
    total = (time.perf_counter() - start) / reps
    return out, total, {k: v / reps for k, v in parts.items()}


def _time_native(decoder: FrustumDecoder, scene, masks: list[torch.Tensor], device: torch.device, reps: int):
    """FrustumDecoder.forward on the scene with the driver's prune decisions replayed (the decoder's prune
    sees the same candidates in the same order, so the voxel sets match); mean seconds per frame."""
    from unittest import mock

    import frustum3d.decoder as decoder_module

    def replaying(queue: list[torch.Tensor]):
        def keep_mask(logits, batch, batch_size, threshold, min_keep, gt):
            mask = queue.pop(0)
            if mask.shape != logits.shape:
                raise RuntimeError(f"candidate sets differ: {tuple(mask.shape)} vs {tuple(logits.shape)}")
            return mask
        return keep_mask

    with torch.no_grad(), mock.patch.object(decoder_module, "keep_mask", replaying(list(masks))):
        out = decoder(*scene)  # warm-up (Triton compilation) and the reference outputs
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        with torch.no_grad(), mock.patch.object(decoder_module, "keep_mask", replaying(list(masks))):
            decoder(*scene)
    _sync(device)
    return out, (time.perf_counter() - start) / reps


def bench_sparse(decoder: FrustumDecoder, out: Path, args, device: torch.device, num_queries: int) -> list[dict]:
    """Export the sparse graphs at full size, verify them, time the driver; returns the table rows."""
    grid = decoder.grid_dims[0]
    scene = surface_scene(decoder, num_queries, band=1, device=device)
    keep = surface_keep(grid, {4: 6.0, 2: 1.0, 1: 1.5})
    paths = sparse_graph_paths(out / "nvp3d_3d_dense64.onnx")
    decoder = decoder.to(device).eval()
    results = export_3d_sparse(decoder, paths, max_voxels=args.max_voxels, num_queries=num_queries,
                               opset=args.opset, device=device, verify=not args.no_verify, example=scene,
                               keep_fn=keep)
    rows = [_row(f"3d sparse {part}", f"{args.max_voxels} rows", device, result, errors, None)
            for part, (result, errors) in results.items()]
    print(_table(rows), flush=True)
    record: dict[str, list] = {}
    masks: list[torch.Tensor] = []

    def recording_keep(logits, coords, stride, settings):
        mask = keep(logits, coords, stride, settings)
        masks.append(mask)
        return mask

    with torch.no_grad():
        drv = run_exported_3d(decoder, torch_runners(decoder), *scene, max_voxels=args.max_voxels,
                              keep_fn=recording_keep, record=record)
    counts = {n: int(v[0]) for part in record for n, v in record[part][0].items() if n.startswith("num_")}
    print("voxels per level:", ", ".join(f"{k[4:]}={v}" for k, v in counts.items()), flush=True)
    native_out, native_s = _time_native(decoder, scene, masks, device, args.reps)
    print(f"FrustumDecoder.forward (native sparse backend, same prune decisions): {native_s:.3f} s/frame; "
          f"driver + PyTorch graphs vs FrustumDecoder.forward, max relative error over all outputs: "
          f"{_chain_error(native_out, drv):.2e}", flush=True)

    torch_out, torch_s, torch_parts = _time_chain(decoder, torch_runners(decoder), scene, args.max_voxels, keep,
                                                  device, args.reps)
    import onnxruntime as ort

    providers = (["CUDAExecutionProvider", "CPUExecutionProvider"]
                 if "CUDAExecutionProvider" in ort.get_available_providers() else ["CPUExecutionProvider"])
    graph_paths = dict(paths)
    dense_path = out / "nvp3d_3d_dense64.onnx"
    fallback = torch_runners(decoder)
    if dense_path.exists() and args.batch_size in (-1, 1):
        graph_paths["dense64"] = dense_path
    ort_runners = onnxruntime_runners(graph_paths, providers=providers, fallback=fallback)
    ort_out, ort_s, ort_parts = _time_chain(decoder, ort_runners, scene, args.max_voxels, keep, device,
                                            args.ort_reps)
    err = _chain_error(torch_out, ort_out)
    timing_rows = []
    for name, seconds, parts in (("driver + PyTorch graphs", torch_s, torch_parts),
                                 (f"driver + onnxruntime ({providers[0]})", ort_s, ort_parts)):
        timing_rows.append({"runner": name, "device": str(device), "frame_s": round(seconds, 3),
                            **{f"{k}_s": round(v, 3) for k, v in parts.items()}})
    print()
    print(_table(timing_rows))
    print(f"chain max relative error, onnxruntime vs PyTorch graphs (all outputs): {err:.2e}"
          + ("" if "dense64" in graph_paths else " (dense64 ran in PyTorch in both)"), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="full", choices=["full", "tiny"])
    ap.add_argument("--sizes", default="240x320", help="export input sizes HxW, comma separated")
    ap.add_argument("--batch-size", type=int, default=-1, help="-1 = dynamic batch (traced at 1)")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--with-3d", action="store_true", help="also export the dense 64^3 completion level")
    ap.add_argument("--with-sparse", action="store_true",
                    help="also export the sparse 128^3/256^3 graphs and time run_exported_3d (full-size scene)")
    ap.add_argument("--skip-2d", action="store_true", help="do not export the 2D graph")
    ap.add_argument("--max-voxels", type=int, default=700000, help="rows of the sparse graphs (export.max_voxels)")
    ap.add_argument("--reps", type=int, default=5, help="timed frames of the driver with PyTorch graphs")
    ap.add_argument("--ort-reps", type=int, default=1, help="timed frames of the driver with onnxruntime")
    ap.add_argument("--grid", type=int, default=256, help="3D grid side (dense level = grid/4)")
    ap.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    ap.add_argument("--out-dir", default="", help="keep the graphs here (default: a temporary folder)")
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out_dir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        if not args.skip_2d:
            spec = validate_spec({"model": {"preset": args.preset}})
            t0 = time.perf_counter()
            model = build_net2d(spec).eval()
            build_s = time.perf_counter() - t0
            params = sum(p.numel() for p in model.parameters())
            print(f"built {args.preset} model ({params / 1e6:.1f} M parameters) in {build_s:.1f} s; device {device}")
        for h, w in [] if args.skip_2d else _sizes(args.sizes):
            t0 = time.perf_counter()
            result, errors = export_2d(model, out / f"nvp3d_2d_{h}x{w}.onnx", input_hw=(h, w),
                                       batch_size=args.batch_size, opset=args.opset, device=device,
                                       verify=not args.no_verify)
            total = time.perf_counter() - t0
            rows.append(_row("2d", f"{h}x{w}", device, result, errors, total - result.seconds))
            print(_table(rows[-1:]), flush=True)
        if not args.skip_2d:
            model.cpu()
            del model
        full = args.preset == "full"
        num_queries = 100 if full else 16
        if args.with_3d or args.with_sparse:
            torch.manual_seed(0)
            decoder = FrustumDecoder(
                decoder_input_groups(512 if full else 16, 13), query_dim=256 if full else 32,
                unet_features=16 if full else 4, unet_output_channels=16 if full else 4,
                grid_dims=(args.grid,) * 3,
            ).eval()
        if args.with_3d or args.with_sparse:  # the sparse chain runs the dense graph between its levels
            t0 = time.perf_counter()
            result, errors = export_3d_dense(DenseCompletion64(decoder), out / "nvp3d_3d_dense64.onnx",
                                             batch_size=args.batch_size, num_queries=num_queries,
                                             opset=args.opset, device=device, verify=not args.no_verify)
            total = time.perf_counter() - t0
            g = args.grid // 4
            rows.append(_row("3d dense", f"{g}^3", device, result, errors, total - result.seconds))
        if args.with_sparse:
            rows += bench_sparse(decoder, out, args, device, num_queries)
    print()
    print(_table(rows))
    if args.json:
        target = Path(args.json)
        tmp_json = target.with_name(f".{target.name}.tmp")
        tmp_json.write_text(json.dumps(rows, indent=2) + "\n")
        os.replace(tmp_json, target)


if __name__ == "__main__":
    main()
