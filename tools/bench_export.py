#!/usr/bin/env python
"""Benchmark ``nvp3d export``: ONNX export time, file size and onnxruntime agreement at full size.

Builds the composed NVPanoptix3D (``--preset full``: VGGT-1B + toolkit-sized head; random weights, nothing is
downloaded) and, with ``--with-3d``, a toolkit-sized completion decoder (f=16, query_dim 256, 256^3 grid ->
dense 64^3 level). Exports each through :func:`nvp3d.export.export_2d` / :func:`~nvp3d.export.export_3d_dense`
(the code paths of ``nvp3d export``), then runs the graph in onnxruntime on the CPU and reports the largest
relative error against PyTorch. Prints a markdown table; ``--json PATH`` also writes the rows.
Columns: ``export_s`` = trace + ONNX passes + writing the files; ``verify_s`` = the PyTorch reference forward
plus the onnxruntime (CPU) run; ``MiB`` = graph plus external data on disk.

Run from the repo root on a CUDA machine (the coordinator's H100), e.g.:

    uv run --frozen --no-sync python tools/bench_export.py --with-3d
    uv run --frozen --no-sync python tools/bench_export.py --sizes 240x320,544x960 --batch-size -1

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
from nvp3d.config.loading import validate_spec
from nvp3d.export import DenseCompletion64, export_2d, export_3d_dense
from nvp3d.model.builder import build_model


def _sizes(text: str) -> list[tuple[int, int]]:
    """``"240x320,544x960"`` -> [(240, 320), (544, 960)] as (H, W)."""
    out = []
    for item in text.split(","):
        h, w = item.lower().split("x")
        out.append((int(h), int(w)))
    return out


def _row(part: str, size: str, device: torch.device, result, errors, verify_s: float) -> dict:
    return {
        "part": part, "input": size, "device": str(device), "export_s": round(result.seconds, 2),
        "verify_s": round(verify_s, 2), "MiB": round(result.bytes / 2**20, 1), "files": len(result.files),
        "external_data": result.external_data, "dynamic_batch": result.dynamic_batch,
        "max_rel_err": f"{max(errors.values(), default=float('nan')):.2e}" if errors else "-",
    }


def _table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="full", choices=["full", "tiny"])
    ap.add_argument("--sizes", default="240x320", help="export input sizes HxW, comma separated")
    ap.add_argument("--batch-size", type=int, default=-1, help="-1 = dynamic batch (traced at 1)")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--with-3d", action="store_true", help="also export the dense 64^3 completion level")
    ap.add_argument("--grid", type=int, default=256, help="3D grid side (dense level = grid/4)")
    ap.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    ap.add_argument("--out-dir", default="", help="keep the graphs here (default: a temporary folder)")
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    spec = validate_spec({"model": {"preset": args.preset}})
    t0 = time.perf_counter()
    model = build_model(spec).eval()
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    print(f"built {args.preset} model ({params / 1e6:.1f} M parameters) in {build_s:.1f} s; device {device}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out_dir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        for h, w in _sizes(args.sizes):
            t0 = time.perf_counter()
            result, errors = export_2d(model, out / f"nvp3d_2d_{h}x{w}.onnx", input_hw=(h, w),
                                       batch_size=args.batch_size, opset=args.opset, device=device,
                                       verify=not args.no_verify)
            total = time.perf_counter() - t0
            rows.append(_row("2d", f"{h}x{w}", device, result, errors, total - result.seconds))
            print(_table(rows[-1:]), flush=True)
        model.cpu()
        del model
        if args.with_3d:
            full = args.preset == "full"
            decoder = FrustumDecoder(
                decoder_input_groups(512 if full else 16, 13), query_dim=256 if full else 32,
                unet_features=16 if full else 4, unet_output_channels=16 if full else 4,
                grid_dims=(args.grid,) * 3,
            ).eval()
            t0 = time.perf_counter()
            result, errors = export_3d_dense(DenseCompletion64(decoder), out / "nvp3d_3d_dense64.onnx",
                                             batch_size=args.batch_size, num_queries=100 if full else 16,
                                             opset=args.opset, device=device, verify=not args.no_verify)
            total = time.perf_counter() - t0
            g = args.grid // 4
            rows.append(_row("3d dense", f"{g}^3", device, result, errors, total - result.seconds))
    print()
    print(_table(rows))
    if args.json:
        target = Path(args.json)
        tmp_json = target.with_name(f".{target.name}.tmp")
        tmp_json.write_text(json.dumps(rows, indent=2) + "\n")
        os.replace(tmp_json, target)


if __name__ == "__main__":
    main()
