#!/usr/bin/env python
"""Benchmark the backbone_vggt aggregator (and DPT depth head): forward time and peak memory.

Random full-size VGGT-1B weights (nothing is downloaded), batch 1, one frame by default, at the toolkit's
364x448 and at 518x518, in fp32 and bf16 autocast, with torch SDPA and (if importable) xformers attention.
Prints a markdown table; ``--json PATH`` also writes the rows (atomically).

Run on a CUDA machine from the repo root:

    uv run --frozen --no-sync python tools/bench_backbone.py
    uv run --frozen --no-sync python tools/bench_backbone.py --frames 1,8 --no-tf32

``--device cpu --preset vggt_tiny --iters 2`` is a quick smoke test without a GPU.
Timing: CUDA events around each forward, median over ``--iters`` runs after ``--warmup`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from backbone_vggt import (
    GraphedAggregator,
    build_vggt,
    cache_low_precision_weights,
    set_attention_backend,
    xformers_available,
)


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]  # type: ignore[misc]


def _timed(fn, device: torch.device, warmup: int, iters: int) -> tuple[float, object]:
    """Median milliseconds of ``fn()`` and its last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            result = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vggt_1b")
    parser.add_argument("--sizes", default="364x448,518x518", help="comma-separated HxW list")
    parser.add_argument("--frames", default="1", help="comma-separated frame counts S")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--backends", default="sdpa,xformers,sdpa+w,sdpa+graph,sdpa+graph+w,xformers+graph+w",
                        help="attention backend per row; '+w' keeps cached bf16 copies of the linear weights "
                             "(bit-identical under autocast, no effect in fp32); '+graph' replays a captured CUDA "
                             "graph of the aggregator; xformers rows are skipped when xformers is not importable")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-tf32", action="store_true", help="turn TF32 off (the baseline table had it on)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --device cpu --preset vggt_tiny for a smoke test")
    torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
    torch.backends.cudnn.allow_tf32 = not args.no_tf32
    torch.manual_seed(0)
    with torch.device(device):
        model = build_vggt(args.preset, enable_camera=False, enable_point=False)
    model.eval()
    agg, depth_head = model.aggregator, model.depth_head

    backends = [b for b in args.backends.split(",") if b]
    if not xformers_available() and any(b.startswith("xformers") for b in backends):
        print("note: xformers not importable, skipping its rows")
        backends = [b for b in backends if not b.startswith("xformers")]
    if device.type != "cuda":
        backends = [b for b in backends if "+graph" not in b]
    rows = []
    for frames in (int(f) for f in args.frames.split(",")):
        for h, w in _parse_sizes(args.sizes):
            images = torch.rand(1, frames, 3, h, w, device=device)
            reference_tokens: dict[str, torch.Tensor] = {}
            for dtype_name in args.dtypes.split(","):
                if dtype_name == "fp32":
                    ctx = nullcontext
                elif dtype_name in ("bf16", "fp16"):
                    amp = torch.bfloat16 if dtype_name == "bf16" else torch.float16

                    def ctx(amp=amp):
                        return torch.autocast(device.type, dtype=amp)
                else:
                    raise SystemExit(f"unknown dtype {dtype_name}")
                for backend in backends:
                    if dtype_name == "fp32" and backend.endswith("+w"):
                        continue  # cached low-precision weights only matter under autocast
                    set_attention_backend(model, backend.split("+")[0])
                    amp_dtype = None if dtype_name == "fp32" else ctx().fast_dtype
                    cache_low_precision_weights(agg, amp_dtype if backend.endswith("+w") else None)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()

                    def run_agg(ctx=ctx, images=images):
                        with torch.no_grad(), ctx():
                            return agg(images)

                    graphed = None
                    if "+graph" in backend:
                        try:
                            graphed = GraphedAggregator(agg, images, autocast_dtype=amp_dtype)
                        except Exception as exc:  # noqa: BLE001 - report and keep benchmarking the rest
                            print(f"note: CUDA graph capture failed for {backend} {h}x{w} {dtype_name}: {exc}")
                            continue

                        def run_agg(graphed=graphed, images=images):  # noqa: F811 - graph replay variant
                            return graphed(images)

                    agg_ms, (tokens, start) = _timed(run_agg, device, args.warmup, args.iters)

                    def run_head(tokens=tokens, start=start, images=images):
                        with torch.no_grad(), torch.autocast(device.type, enabled=False):
                            return depth_head(tokens, images=images, patch_start_idx=start)

                    head_ms, _ = _timed(run_head, device, args.warmup, args.iters)
                    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
                    last = tokens[-1].float()
                    ref = reference_tokens.setdefault(dtype_name, last)
                    rows.append(dict(frames=frames, size=f"{h}x{w}", dtype=dtype_name, backend=backend,
                                     aggregator_ms=agg_ms, depth_head_ms=head_ms, peak_gb=peak,
                                     token_dtype=str(tokens[-1].dtype).replace("torch.", ""),
                                     max_abs_vs_first_backend=float((last - ref).abs().max())))
                    # release this row's graph pool / outputs before the next row's peak-memory reset
                    tokens = last = graphed = run_agg = run_head = None

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\nbackbone_vggt {args.preset} on {dev_name}, torch {torch.__version__}, TF32 {'off' if args.no_tf32 else 'on'}, "
          f"median of {args.iters} after {args.warmup} warm-ups\n")
    print("| frames S | HxW | dtype | attention | aggregator ms | depth head ms | peak GB | tokens dtype | "
          "max abs diff vs first backend |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['frames']} | {r['size']} | {r['dtype']} | {r['backend']} | {r['aggregator_ms']:.2f} | "
              f"{r['depth_head_ms']:.2f} | {r['peak_gb']:.2f} | {r['token_dtype']} | {r['max_abs_vs_first_backend']:.2e} |")
    if args.json:
        payload = dict(device=dev_name, torch=torch.__version__, preset=args.preset, tf32=not args.no_tf32, rows=rows)
        fd, tmp = tempfile.mkstemp(dir=args.json.parent or Path("."), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
