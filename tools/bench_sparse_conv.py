"""Benchmark frustum3d.sparse convolutions: torch vs triton backends, the pre-issue-20 Triton default, spconv-triton.

Workload: a synthetic camera-frustum shell set on a 256^3 grid (thick surfaces of a room: floor, walls, boxes,
spheres, cut to a view frustum and trimmed near-to-far to the requested voxel count; ~17 of 27 neighbours
occupied, like a real 256^3 frustum level). Layers: submanifold 3x3x3 and a stride-2 k4 conv (MinkowskiEngine
floor rule), C_in = C_out = C. Rows: kernel-map build (grid and search builders), forward with a cached map,
forward + backward (input and weight gradients), peak memory, torch/triton ratio.

Columns per row:
* ``torch`` and ``triton`` (automatic per-pass paths, ``frustum3d.sparse.backends.triton_policy``);
* ``before`` (``--before``): the Triton default before issue 20 (``plain`` GEMMs, ``rows`` weight gradient),
  forced in the same process;
* ``spconv`` (default on when ``spconv_triton`` imports; ``--no-spconv`` skips it): spconv-triton on the same
  coordinates and weights with its pairs built once (``tools/spconv_triton_adapter.py``). Its relative errors
  against frustum3d triton cover the forward output, the input gradient and the weight gradient on the common
  output cells.

Correctness gate first: every backend is checked against a dense float64 ``F.conv3d`` reference (fp32 with
TF32 off) and the two backends against each other in fp16/bf16; the script aborts if a check fails.

fp32 runs with TF32 OFF (``torch.backends.cuda.matmul.allow_tf32 = False``, exact IEEE products in Triton).

    cd packages/frustum3d && PYTHONPATH=src python ../../tools/bench_sparse_conv.py --out /tmp/sparse.json

Other modes:
* ``--quick``: 307k voxels, C 16/64, fp32/fp16 only.
* ``--fast``: 4x shorter timing budgets, no map-build rows, spconv-triton autotune capped at 4 candidates
  (``--spconv-max-configs N`` sets the cap). Measured on an H200 with ``--before --spconv-max-configs 2``: 36 of
  the 48 rows in 205 s, with a Triton cache warm for part of the shapes. Compiling spconv-triton's kernels is
  most of the time, so the full grid under 6 minutes needs a warm cache (``TRITON_CACHE_DIR`` from an earlier
  run) or ``--sizes`` / ``--channels`` split over two runs.
* ``--per-op``: time each pass on every Triton path (the data behind the automatic rules).
* ``--timing call stream`` / ``--timing kernel``: how frustum3d and spconv-triton are timed (:data:`TIMING_MODES`):
  one call between CUDA events (the default), back-to-back calls, or the profiler's device time alone (in a run of
  its own). Stop 59's H100 rows in all three are in docs/frustum3d.md.
* ``--autotune``: sweep Triton configs and print the winners; ``--sweep``: a block-config grid, timed on the forward
  as it runs (the automatic path of each ``--layers`` map; ``--sweep-wgrad`` adds the weight gradient).
* ``--per-op --tap-loops``: the tap-list paths with each tap loop (``FRUSTUM3D_TRITON_TAP_LOOP``), columns
  ``fwd:sorted/count``, ``fwd:sorted/branch``, ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import frustum3d.sparse as fs
except ImportError:  # run from the repo root without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "frustum3d" / "src"))
    import frustum3d.sparse as fs

from frustum3d.sparse import SparseVoxels, get_kernel_map, sparse_conv3d, sparse_conv_transpose3d, use_backend
from frustum3d.sparse.coords import CoordinateSet

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------- workload
def frustum_shell_coords(target: int, grid: int = 256, thickness: float = 2.3, seed: int = 0,
                         device: str = "cpu") -> torch.Tensor:
    """``(N, 4)`` coordinates of thick surfaces inside a camera frustum, trimmed near-to-far to ``target``.

    Shells start 2.3 voxels thick (~18.8 of 27 neighbours at 307k); when the scene holds fewer voxels than
    ``target`` the shells are thickened (a 700k level needs ~4-5 voxels, i.e. a truncation band).
    """
    while True:
        coords = _shell_scene(grid, thickness, seed, device)
        if coords.shape[0] >= target:
            return coords[:target]
        if thickness > 12:
            raise RuntimeError(f"scene has only {coords.shape[0]} shell voxels < {target}")
        thickness += 0.7


def _shell_scene(grid: int, thickness: float, seed: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ax = torch.arange(grid, dtype=torch.float32, device=device)
    x, y = torch.meshgrid(ax, ax, indexing="ij")
    c = grid / 2
    keep = []
    half = thickness / 2
    scale = grid / 256
    boxes = [((torch.rand(3, generator=gen) * grid * 0.6 + grid * 0.2).tolist(),
              (torch.rand(3, generator=gen) * 25 * scale + 10 * scale).tolist()) for _ in range(6)]
    spheres = [((torch.rand(3, generator=gen) * grid * 0.6 + grid * 0.2).tolist(),
                (float(torch.rand(1, generator=gen)) * 20 + 12) * scale) for _ in range(4)]
    for zi in range(grid):
        z = float(zi)
        halfw = grid * 0.16 + z * (grid * 0.5 - grid * 0.16) / grid  # frustum cross-section grows with depth
        inside = ((x - c).abs() <= halfw) & ((y - c).abs() <= halfw)
        d = torch.full_like(x, float("inf"))
        d = torch.minimum(d, (grid * 0.92 - 0.05 * (x - c) - z).abs())  # back wall
        d = torch.minimum(d, (y - (grid * 0.85 + 0.08 * (z - c))).abs())  # floor
        d = torch.minimum(d, (x - (grid * 0.12 - 0.25 * (z - c))).abs())  # left wall
        d = torch.minimum(d, (x - (grid * 0.9 + 0.2 * (z - c))).abs())  # right wall
        for centre, size in boxes:
            q = torch.stack([(x - centre[0]).abs() - size[0], (y - centre[1]).abs() - size[1],
                             torch.full_like(x, abs(z - centre[2]) - size[2])])
            outside = q.clamp(min=0).norm(dim=0)
            inner = q.max(dim=0).values.clamp(max=0)
            d = torch.minimum(d, (outside + inner).abs())
        for centre, r in spheres:
            dist = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2).sqrt()
            d = torch.minimum(d, (dist - r).abs())
        m = inside & (d < half)
        idx = m.nonzero()
        keep.append(torch.cat([torch.zeros(len(idx), 1, dtype=torch.int64, device=device), idx,
                               torch.full((len(idx), 1), zi, dtype=torch.int64, device=device)], 1))
    return torch.cat(keep)


def neighbour_density(x: SparseVoxels) -> float:
    kmap = get_kernel_map(x.coordinate_set, x.coordinate_set, 3)
    return float((kmap.nbr >= 0).sum()) / max(1, kmap.num_out)


# ----------------------------------------------------------------------------------------------- timing
TIMING = {"budget_scale": 1.0, "min_reps_cap": 1000}

#: How a call is timed (``--timing``; the JSON keys of a mode other than ``call`` end in ``_<mode>``):
#: * ``call``: CUDA events around each single call, the device idle before it (what every earlier table used). For
#:   calls of 0.1-0.3 ms this includes the host's launch latency, and its ratio between libraries moves between runs.
#: * ``stream``: events around many calls issued back to back, divided by their number: the throughput of a network
#:   that issues one layer after another (host work per call counts where it exceeds the device's).
#: * ``kernel``: the device's busy time per call from ``torch.profiler`` (the union of its kernel, copy and set
#:   intervals): the kernels alone, without any launch latency or host work. It runs alone in its process
#:   (``--timing kernel``): once the profiler has run, CUPTI stays attached and every later launch of the process
#:   is slower (pytorch/pytorch#144455), which made ``call`` / ``stream`` times taken after it too high.
TIMING_MODES = ("call", "stream", "kernel")


def time_ms(fn, min_reps: int = 10, budget_ms: float = 300.0, mode: str = "call") -> float:
    """Median time of ``fn`` in ms after warm-up (2 calls), the ``mode`` way (:data:`TIMING_MODES`); reps fit a time
    budget (``--fast`` shrinks it)."""
    check_mode(mode)
    budget_ms *= TIMING["budget_scale"]
    min_reps = min(min_reps, TIMING["min_reps_cap"])
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    one = max(start.elapsed_time(end), 1e-3)
    if mode == "stream":
        return _stream_ms(fn, one, budget_ms)
    if mode == "kernel":
        return _kernel_ms(fn, one, budget_ms)
    reps = int(min(200, max(min_reps, budget_ms / one)))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check_mode(mode: str) -> None:
    """A wrong ``mode`` fails before anything is timed."""
    if mode not in TIMING_MODES:
        raise ValueError(f"timing mode must be one of {TIMING_MODES}, got {mode!r}")


def _stream_ms(fn, one_ms: float, budget_ms: float, rounds: int = 5) -> float:
    """Median over ``rounds`` of (time of ``n`` back-to-back calls) / ``n``; ``n`` fills a round's share of the budget."""
    n = int(min(200, max(10, budget_ms / rounds / one_ms)))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    per_call = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        per_call.append(start.elapsed_time(end) / n)
    return statistics.median(per_call)


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: device time when kernels overlap (several streams)."""
    total, cur_start, cur_end = 0.0, None, None
    for a, b in sorted(intervals):
        if cur_end is None or a > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = a, b
        else:
            cur_end = max(cur_end, b)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def _kernel_ms(fn, one_ms: float, budget_ms: float) -> float:
    """Device busy time per call: ``torch.profiler``'s CUDA activity (kernels, copies, sets) over ``n`` calls / ``n``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    n = int(min(50, max(5, budget_ms / 2 / one_ms)))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
    if not spans:
        raise RuntimeError("the profiler recorded no CUDA activity (is CUPTI available?)")
    return busy_us(spans) / n / 1000.0


def peak_mb(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ----------------------------------------------------------------------------------------------- gate
def correctness_gate(device: torch.device) -> list[dict]:
    """Dense reference (float64 F.conv3d) and backend agreement; raises on failure."""
    rows = []
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(1, 40, 40, 40, generator=gen) < 0.25
    coords = mask.nonzero().to(device)
    for k, s in ((3, 1), (4, 2)):
        cin, cout = 16, 32
        feats = torch.randn(coords.shape[0], cin, generator=gen).to(device)
        w = (torch.randn(k**3, cin, cout, generator=gen) * 0.1).to(device)
        # dense reference in float64 on CPU, ME offsets via padding
        left = k // 2 if k % 2 else 0
        dense = torch.zeros(1, cin, 40, 40, 40, dtype=torch.float64)
        cc = coords.cpu()
        dense[cc[:, 0], :, cc[:, 1], cc[:, 2], cc[:, 3]] = feats.cpu().double()
        wd = fs.dense_weight(w.cpu().double(), k)
        ref_dense = F.conv3d(F.pad(dense, (left, k - 1 - left) * 3), wd, stride=s)
        for backend in ("torch", "triton"):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                x = SparseVoxels(coords, feats.to(dtype), spatial_shape=(40, 40, 40))
                with use_backend(backend):
                    y = sparse_conv3d(x, w.to(dtype), stride=s)
                oc = (y.coords.cpu()[:, 1:] // s)
                ref = ref_dense[y.coords.cpu()[:, 0], :, oc[:, 0], oc[:, 1], oc[:, 2]]
                err = ((y.feats.double().cpu() - ref).norm() / ref.norm()).item()
                tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
                rows.append({"layer": f"k{k}s{s}", "backend": backend, "dtype": str(dtype), "rel_err": err,
                             "ok": err < tol})
                if err >= tol:
                    raise SystemExit(f"correctness gate FAILED: k{k}s{s} {backend} {dtype} rel err {err:.3e}")
    return rows


# ----------------------------------------------------------------------------------------------- spconv-triton
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _suffix(mode: str) -> str:
    """JSON key part of a timing mode: ``call`` keeps the keys of earlier runs (``triton_fwd_ms``)."""
    return "" if mode == "call" else f"_{mode}"


def spconv_triton_row(adapter, x: SparseVoxels, w: torch.Tensor, s: int, ours: dict, ours_grads,
                      modes: tuple[str, ...] = ("call",)) -> dict:
    """spconv-triton fwd / fwd+bwd times and its relative errors against frustum3d triton (``ours``).

    Errors: forward output on the common output cells; input and weight gradients with frustum3d's output
    gradient on the common cells (zero on the cells only one library has: spconv-triton's extra strided cells,
    and frustum3d's cells 127 of a 256 axis, beyond spconv-triton's output range), so all three should agree.
    ``ours_grads(g)`` recomputes frustum3d's gradients for a masked output gradient when the sets differ.
    """
    from spconv_triton_adapter import common_rows

    feats = x.feats
    wk = adapter.krsc(w)
    io, it = common_rows(ours["coords"], adapter.out_coords)
    times = {f"spconv_fwd{_suffix(m)}_ms": time_ms(lambda: adapter.forward(feats, wk), mode=m) for m in modes}
    f = feats.clone().requires_grad_()
    wg = wk.clone().requires_grad_()
    g = torch.zeros(adapter.num_out, w.shape[2], device=feats.device, dtype=feats.dtype)
    g[it] = ours["grad_out"][io]

    def step():
        adapter.forward(f, wg).backward(g)

    times |= {f"spconv_fwdbwd{_suffix(m)}_ms": time_ms(step, min_reps=5, mode=m) for m in modes}
    mem = peak_mb(step)
    f.grad = None
    wg.grad = None
    out = adapter.forward(f, wg)
    out.backward(g)
    d_w = wg.grad.permute(3, 2, 1, 4, 0).reshape(w.shape)  # KRSC (co, kx, ky, kz, ci) -> (kz, ky, kx, ci, co)
    ref_dgrad, ref_wgrad = ours["dgrad"], ours["wgrad"]
    if io.numel() < ours["coords"].shape[0]:  # frustum3d has cells spconv-triton lacks: their gradient is masked
        g_ours = torch.zeros_like(ours["grad_out"])
        g_ours[io] = ours["grad_out"][io]
        ref_dgrad, ref_wgrad = ours_grads(g_ours)
    return times | {"spconv_peak_mb": mem, "spconv_n_out": adapter.num_out,
            "n_out": int(ours["coords"].shape[0]), "n_common": int(io.numel()),
            "spconv_vs_triton_rel_err_out": _rel(out.detach()[it], ours["out"][io]),
            "spconv_vs_triton_rel_err_dgrad": _rel(f.grad, ref_dgrad),
            "spconv_vs_triton_rel_err_wgrad": _rel(d_w, ref_wgrad)}


# ----------------------------------------------------------------------------------------------- sweep
def _gemm_sweep_configs(c: int, dtype: torch.dtype) -> list:
    """Block configs a ``--sweep`` times for one width: the shipped default first (a sweep cut short never picks
    something worse than it), then a grid over rows per tile, output columns, reduction chunk, warps and stages."""
    import triton
    from frustum3d.sparse.backends import triton_backend as tb

    half = dtype != torch.float32
    bk_max = 64 if half else 32
    out = [tb.default_gemm_config(c, c, dtype)]
    for bm in (64, 128, 256) if half else (32, 64, 128):
        for bn in sorted({32, 64, triton.next_power_of_2(min(max(c, 16), 128))}):
            if bn > max(32, triton.next_power_of_2(c)):
                continue
            for bk in sorted({16, min(max(c, 16), bk_max)}):
                for warps, stages in ((4, 2), (4, 3), (4, 4), (8, 2), (8, 3)):
                    cfg = tb.GemmConfig(bm, bn, bk, warps, stages)
                    if cfg not in out:
                        out.append(cfg)
    return out


def sweep(args) -> list[dict]:
    """Time a grid of Triton block configs on the passes as they run (the automatic path and the default tap loop,
    ``FRUSTUM3D_TRITON_TAP_LOOP``): the forward (and with ``--sweep-wgrad`` the weight gradient) of each
    ``--layers`` map at the first size."""
    from frustum3d.sparse.backends import triton_backend as tb

    coords = frustum_shell_coords(args.sizes[0], device="cuda")
    rows = []
    deadline = time.time() + args.sweep_seconds
    for label, k, s in LAYERS:
        if label not in args.layers or label == "gen k4 s2":
            continue
        cset = SparseVoxels(coords, torch.zeros(coords.shape[0], 1, device="cuda"),
                            spatial_shape=(256, 256, 256)).coordinate_set
        kmap = get_kernel_map(cset, cset if s == 1 else cset.downsample(s), k)
        for c in args.channels:
            for dname in args.dtypes:
                dtype = DTYPES[dname]
                feats = torch.randn(kmap.num_in, c, device="cuda", dtype=dtype)
                w = torch.randn(k**3, c, c, device="cuda", dtype=dtype) / math.sqrt(k**3 * c)
                g = torch.randn(kmap.num_out, c, device="cuda", dtype=dtype)
                key = (c, c, 2 if dtype != torch.float32 else 4)
                path = tb.path_for("fwd", dtype, c, c, lambda m=kmap: m.fill(False))
                for i, cfg in enumerate(_gemm_sweep_configs(c, dtype)):
                    if time.time() > deadline:
                        return rows
                    tb.SHIPPED_GEMM[key] = cfg
                    try:
                        ms = time_ms(lambda f=feats, w=w, m=kmap: tb.conv_forward(f, w, m), min_reps=10, budget_ms=60)
                    except Exception as exc:  # a config can exceed shared memory or registers
                        rows.append({"layer": label, "c": c, "dtype": dname, "pass": "fwd", "cfg": str(cfg),
                                     "err": repr(exc)[:80]})
                        continue
                    finally:
                        tb.SHIPPED_GEMM.pop(key, None)
                    rows.append({"layer": label, "c": c, "dtype": dname, "pass": "fwd", "path": path,
                                 "cfg": str(cfg), "ms": ms, "config": asdict(cfg), "default": i == 0})
                    print(json.dumps(rows[-1]), flush=True)
                if not args.sweep_wgrad:
                    continue
                for bp in (32, 64, 128):
                    for bci in sorted({min(max(c, 16), 32), min(max(c, 16), 64)}):
                        for warps, stages in ((4, 2), (8, 2)):
                            if time.time() > deadline:
                                return rows
                            cfg = tb.WgradConfig(bp, bci, bci, warps, stages)
                            try:
                                table = kmap.offset_major()
                                ms = time_ms(lambda cfg=cfg, f=feats, g=g, t=table: tb._launch_wgrad(f, g, t, cfg),
                                             min_reps=10, budget_ms=60)
                            except Exception as exc:
                                rows.append({"layer": label, "c": c, "dtype": dname, "pass": "wgrad",
                                             "cfg": str(cfg), "err": repr(exc)[:80]})
                                continue
                            rows.append({"layer": label, "c": c, "dtype": dname, "pass": "wgrad", "cfg": str(cfg),
                                         "ms": ms, "config": asdict(cfg)})
                            print(json.dumps(rows[-1]), flush=True)
    return rows


LAYERS = (("subm k3", 3, 1), ("k4 s2", 4, 2), ("gen k4 s2", 4, 2))


def apply_layer(label: str, x: SparseVoxels, w: torch.Tensor, s: int) -> SparseVoxels:
    if label == "gen k4 s2":
        return sparse_conv_transpose3d(x, w, stride=s, generative=True)
    return sparse_conv3d(x, w, stride=s)


# ----------------------------------------------------------------------------------------------- main
IMPLS = ("torch", "triton", "before", "spconv")
BEFORE_PATHS = {"fwd": "plain", "dgrad": "plain", "wgrad": "rows"}  # the default until issue 20


def _impl_context(impl: str):
    """Backend / path context of one implementation column (``before`` = the pre-issue-20 Triton default)."""
    import contextlib

    from frustum3d.sparse.backends.triton_policy import force_paths

    if impl == "torch":
        return use_backend("torch")
    if impl == "before":
        stack = contextlib.ExitStack()
        stack.enter_context(use_backend("triton"))
        stack.enter_context(force_paths(**BEFORE_PATHS))
        return stack
    return use_backend("triton")


def time_impl(impl: str, label: str, x_in: SparseVoxels, w: torch.Tensor, s: int,
              modes: tuple[str, ...] = ("call",)) -> dict:
    """fwd / fwd+bwd / peak memory of one frustum3d implementation column, plus its outputs and gradients.

    ``ms`` holds the ``call`` times (and peak MB); ``times`` every mode's, keyed like the row's JSON columns.
    """
    times = {}
    with _impl_context(impl):
        y = apply_layer(label, x_in, w, s)  # builds/caches the map, compiles kernels
        for m in modes:
            times[f"{impl}_fwd{_suffix(m)}_ms"] = time_ms(lambda: apply_layer(label, x_in, w, s), mode=m)
        f = x_in.feats.clone().requires_grad_()
        wg = w.clone().requires_grad_()
        g = torch.randn(y.feats.shape, generator=torch.Generator().manual_seed(7)).to(y.feats.device, y.feats.dtype)

        def step():
            out = apply_layer(label, x_in.replace_feats(f), wg, s)
            out.feats.backward(g)

        for m in modes:
            times[f"{impl}_fwdbwd{_suffix(m)}_ms"] = time_ms(step, min_reps=5, mode=m)
        mem = peak_mb(step)
        f.grad = None
        wg.grad = None
        step()
    call = (times.get(f"{impl}_fwd_ms"), times.get(f"{impl}_fwdbwd_ms"), mem)
    return {"ms": call, "times": times, "out": y.feats, "coords": y.coords, "grad_out": g, "dgrad": f.grad,
            "wgrad": wg.grad}


def run(args) -> dict:
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import triton
    from spconv_triton_adapter import SpconvTritonConv, restrict_autotune, spconv_triton_available

    env = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "python": platform.python_version(), "tf32": "off",
        "autotune": os.environ.get("FRUSTUM3D_TRITON_AUTOTUNE", "0"),
        "row_sort": os.environ.get("FRUSTUM3D_TRITON_ROW_SORT", "auto"),
        "spconv_triton": spconv_triton_available() if args.spconv else None,
        "spconv_autotune_cap": args.spconv_max_configs, "fast": args.fast, "timing": list(args.timing),
    }
    if env["spconv_triton"] and args.spconv_max_configs:
        env["spconv_autotuners_capped"] = restrict_autotune(args.spconv_max_configs)
    print("env:", env, flush=True)
    gate = correctness_gate(device)
    print(f"correctness gate passed ({len(gate)} checks, max fp32 rel err "
          f"{max(r['rel_err'] for r in gate if 'float32' in r['dtype']):.2e})", flush=True)
    results = {"env": env, "gate": gate, "rows": [], "kmap": []}
    impls = [i for i in args.backends] + (["before"] if args.before else [])
    for n in args.sizes:
        t0 = time.time()
        coords = frustum_shell_coords(n, device="cuda")
        ones = torch.ones(coords.shape[0], 1, device=device)
        x0 = SparseVoxels(coords, ones, spatial_shape=(256, 256, 256))
        dens = neighbour_density(x0)
        print(f"\n## N={coords.shape[0]} (neighbours {dens:.1f}/27, generated in {time.time() - t0:.1f}s)", flush=True)
        if not args.fast:  # kernel-map build from scratch (new coordinate set each time; sort included)
            for label, k, s in (("subm k3", 3, 1), ("k4 s2", 4, 2)):
                for method in ("grid", "search"):
                    def build(k=k, s=s, method=method, coords=coords):
                        cset, _ = CoordinateSet.from_coords(coords, 1, (256, 256, 256), 1)
                        out = cset if s == 1 else cset.downsample(s)
                        get_kernel_map(cset, out, k, 1, False, method=method)
                    ms = time_ms(build, min_reps=5)
                    results["kmap"].append({"n": n, "layer": label, "method": method, "ms": ms})
                    print(f"kmap build {label:8s} {method:6s}: {ms:7.2f} ms", flush=True)
        adapters: dict[str, object] = {}
        for c in args.channels:
            for dname in args.dtypes:
                dtype = DTYPES[dname]
                gen = torch.Generator(device="cpu").manual_seed(c)
                feats = torch.randn(coords.shape[0], c, generator=gen).to(device, dtype)
                x = SparseVoxels(coords, feats, spatial_shape=(256, 256, 256))
                for label, k, s in LAYERS:
                    if label not in args.layers:
                        continue
                    w = (torch.randn(k**3, c, c, generator=gen) / math.sqrt(c * k**3)).to(device, dtype)
                    if label == "gen k4 s2":  # decoder upsampling: coarse (stride 2) -> generated fine voxels
                        cset = x.coordinate_set.downsample(2)
                        x_in = SparseVoxels.from_set(cset, torch.randn(cset.num_voxels, c, generator=gen).to(device, dtype))
                    else:
                        x_in = x
                    row = {"n": n, "layer": label, "c": c, "dtype": dname, "n_in": x_in.num_voxels}
                    outs = {}
                    for impl in impls:
                        try:
                            res = time_impl(impl, label, x_in, w, s, args.timing)
                        except Exception as exc:  # a failing column is reported, the run goes on
                            row[f"{impl}_error"] = repr(exc)[:200]
                            continue
                        outs[impl] = res
                        row.update(res["times"])
                        row[f"{impl}_peak_mb"] = res["ms"][2]
                    if "torch" in outs and "triton" in outs and "triton_fwd_ms" in row:
                        row["triton_vs_torch_rel_err"] = _rel(outs["triton"]["out"], outs["torch"]["out"])
                        row["fwd_speedup"] = row["torch_fwd_ms"] / row["triton_fwd_ms"]
                        row["fwdbwd_speedup"] = row["torch_fwdbwd_ms"] / row["triton_fwdbwd_ms"]
                    if "before" in outs and "triton" in outs and "triton_fwd_ms" in row:
                        row["vs_before_fwd"] = row["before_fwd_ms"] / row["triton_fwd_ms"]
                        row["vs_before_fwdbwd"] = row["before_fwdbwd_ms"] / row["triton_fwdbwd_ms"]
                    if env["spconv_triton"] and label != "gen k4 s2" and "triton" in outs:
                        try:
                            if label not in adapters:  # rows in frustum3d's (sorted) order, like x_in.feats
                                adapters[label] = SpconvTritonConv(x_in.coords, k, s)
                            def ours_grads(g, label=label, x_in=x_in, w=w, s=s):
                                f, wg = x_in.feats.clone().requires_grad_(), w.clone().requires_grad_()
                                with use_backend("triton"):
                                    apply_layer(label, x_in.replace_feats(f), wg, s).feats.backward(g)
                                return f.grad, wg.grad

                            row.update(spconv_triton_row(adapters[label], x_in, w, s, outs["triton"], ours_grads,
                                                         args.timing))
                            for m in args.timing:
                                for p in ("fwd", "fwdbwd"):
                                    row[f"vs_spconv_{p}{_suffix(m)}"] = (row[f"spconv_{p}{_suffix(m)}_ms"]
                                                                         / row[f"triton_{p}{_suffix(m)}_ms"])
                        except Exception as exc:
                            row["spconv_error"] = repr(exc)[:300]
                    results["rows"].append(row)
                    print(json.dumps({k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in row.items()}),
                          flush=True)
                    if args.out is not None:  # partial results survive a time limit
                        write_json(args.out, results)
    if os.environ.get("FRUSTUM3D_TRITON_AUTOTUNE", "0") not in ("", "0"):
        from frustum3d.sparse.backends import triton_backend

        results["tuned"] = triton_backend.tuned_configs()
    return results


def _f(r: dict, key: str, fmt: str = ".3f") -> str:
    v = r.get(key)
    return format(v, fmt) if isinstance(v, (int, float)) else "-"


def markdown(results: dict) -> str:
    """Tables: frustum3d (before / after) vs torch, frustum3d vs spconv-triton with relative errors, map builds."""
    lines = ["| N | layer | C | dtype | torch fwd | triton fwd | x torch | before fwd | x before | torch fwd+bwd "
             "| triton fwd+bwd | x torch | before fwd+bwd | x before | peak MB torch / triton |", "|" + "---|" * 15]
    for r in results["rows"]:
        lines.append(
            f"| {r['n']:,} | {r['layer']} | {r['c']} | {r['dtype']} | {_f(r, 'torch_fwd_ms')} | "
            f"{_f(r, 'triton_fwd_ms')} | {_f(r, 'fwd_speedup', '.2f')} | {_f(r, 'before_fwd_ms')} | "
            f"{_f(r, 'vs_before_fwd', '.2f')} | {_f(r, 'torch_fwdbwd_ms')} | {_f(r, 'triton_fwdbwd_ms')} | "
            f"{_f(r, 'fwdbwd_speedup', '.2f')} | {_f(r, 'before_fwdbwd_ms')} | {_f(r, 'vs_before_fwdbwd', '.2f')} | "
            f"{_f(r, 'torch_peak_mb', '.0f')} / {_f(r, 'triton_peak_mb', '.0f')} |")
    sp = [r for r in results["rows"] if "spconv_fwd_ms" in r or "spconv_error" in r]
    if sp:
        lines += ["", "| N | layer | C | dtype | frustum3d fwd | spconv-triton fwd | x | frustum3d fwd+bwd "
                  "| spconv-triton fwd+bwd | x | rel err out / dgrad / wgrad | outputs frustum3d / spconv-triton |",
                  "|" + "---|" * 12]
        for r in sp:
            if "spconv_error" in r:
                lines.append(f"| {r['n']:,} | {r['layer']} | {r['c']} | {r['dtype']} | error: {r['spconv_error'][:80]} |")
                continue
            lines.append(
                f"| {r['n']:,} | {r['layer']} | {r['c']} | {r['dtype']} | {_f(r, 'triton_fwd_ms')} | "
                f"{_f(r, 'spconv_fwd_ms')} | {_f(r, 'vs_spconv_fwd', '.2f')} | {_f(r, 'triton_fwdbwd_ms')} | "
                f"{_f(r, 'spconv_fwdbwd_ms')} | {_f(r, 'vs_spconv_fwdbwd', '.2f')} | "
                f"{_f(r, 'spconv_vs_triton_rel_err_out', '.1e')} / {_f(r, 'spconv_vs_triton_rel_err_dgrad', '.1e')} / "
                f"{_f(r, 'spconv_vs_triton_rel_err_wgrad', '.1e')} | {r['n_out']:,} / {r['spconv_n_out']:,} |")
    modes = results.get("env", {}).get("timing", ["call"])
    if list(modes) != ["call"] and sp:
        lines += ["", mode_table(sp, modes)]
    if results.get("kmap"):
        lines += ["", "| N | kernel map | builder | ms |", "|---|---|---|---|"]
        for r in results["kmap"]:
            lines.append(f"| {r['n']:,} | {r['layer']} | {r['method']} | {r['ms']:.2f} |")
    return "\n".join(lines)


def mode_table(rows: list[dict], modes: list[str]) -> str:
    """frustum3d / spconv-triton ms and ratio ("x" = spconv-triton time / frustum3d time) per timing mode."""
    head = "| N | layer | C | dtype |" + "".join(f" {p} {m}: frustum3d / spconv-triton (x) |"
                                               for p in ("fwd", "fwd+bwd") for m in modes)
    lines = [head, "|" + "---|" * (4 + 2 * len(modes))]
    for r in rows:
        if "spconv_error" in r:
            continue
        cells = []
        for p in ("fwd", "fwdbwd"):
            for m in modes:
                sfx = _suffix(m)
                cells.append(f"{_f(r, f'triton_{p}{sfx}_ms')} / {_f(r, f'spconv_{p}{sfx}_ms')} "
                             f"({_f(r, f'vs_spconv_{p}{sfx}', '.2f')})")
        lines.append(f"| {r['n']:,} | {r['layer']} | {r['c']} | {r['dtype']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- per pass
def per_op(args) -> list[dict]:
    """Time each pass (fwd, dgrad, wgrad) of the Triton backend on every path (the data behind triton_policy)."""
    from frustum3d.sparse.backends import triton_backend as tb
    from frustum3d.sparse.backends.triton_policy import GEMM_PATHS, WGRAD_PATHS, force_paths

    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for n in args.sizes:
        coords = frustum_shell_coords(n, device="cuda")
        for label, k, s in LAYERS:
            if label not in args.layers:
                continue
            for c in args.channels:
                for dname in args.dtypes:
                    dtype = DTYPES[dname]
                    x = SparseVoxels(coords, torch.randn(coords.shape[0], c, device="cuda", dtype=dtype),
                                     spatial_shape=(256, 256, 256))
                    if label == "gen k4 s2":
                        cset = x.coordinate_set.downsample(2)
                        cout = fs.transposed_output_set(cset, k, s, True)
                        kmap = get_kernel_map(cset, cout, k, 1, transposed=True)
                    else:
                        cset = x.coordinate_set
                        cout = cset if s == 1 else cset.downsample(s)
                        kmap = get_kernel_map(cset, cout, k)
                    feats = torch.randn(kmap.num_in, c, device="cuda", dtype=dtype)
                    w = torch.randn(k**3, c, c, device="cuda", dtype=dtype) / math.sqrt(c * k**3)
                    g = torch.randn(kmap.num_out, c, device="cuda", dtype=dtype)
                    calls = {"fwd": lambda f=feats, w=w, m=kmap: tb.conv_forward(f, w, m),
                             "dgrad": lambda g=g, w=w, m=kmap: tb.conv_dgrad(g, w, m),
                             "wgrad": lambda f=feats, g=g, m=kmap: tb.conv_wgrad(f, g, m)}
                    row = {"n": n, "layer": label, "c": c, "dtype": dname, "fill_fwd": kmap.fill(False),
                           "fill_rev": kmap.fill(True)}
                    for op, fn in calls.items():
                        for path in (WGRAD_PATHS if op == "wgrad" else GEMM_PATHS):
                            # --tap-loops: the tap-list paths with each tap loop (columns "/count", "/branch"),
                            # else with the default one (FRUSTUM3D_TRITON_TAP_LOOP)
                            loops = tb.TAP_LOOPS if path in ("taps", "sorted") and args.tap_loops else (None,)
                            for loop in loops:
                                col = f"{op}:{path}" + (f"/{loop}" if loop else "")
                                loop_ctx = tb.tap_loop(loop) if loop else contextlib.nullcontext()
                                try:
                                    with force_paths(**{op: path}), loop_ctx:
                                        row[col] = time_ms(fn, min_reps=5, budget_ms=40)
                                except Exception as exc:
                                    row[col] = repr(exc)[:120]
                        reverse = op == "dgrad" or (op == "wgrad" and kmap.num_in < kmap.num_out)
                        row[f"{op}:auto"] = tb.path_for(op, dtype, c, c, lambda r=reverse, m=kmap: m.fill(r))
                    rows.append(row)
                    print(json.dumps({k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in row.items()}),
                          flush=True)
                    if args.out is not None:
                        write_json(args.out, {"per_op": rows})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[307_000, 700_000])
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 96])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"], choices=list(DTYPES))
    p.add_argument("--backends", nargs="+", default=["torch", "triton"], choices=["torch", "triton"])
    p.add_argument("--layers", nargs="+", default=["subm k3", "k4 s2"], choices=[name for name, _, _ in LAYERS],
                   help="layers to time (add 'gen k4 s2' for the generative transposed conv)")
    p.add_argument("--row-sort", action="store_true", help="FRUSTUM3D_TRITON_ROW_SORT=1 (mask-sorted rows)")
    p.add_argument("--quick", action="store_true", help="307k voxels, C 16/64, fp32/fp16")
    p.add_argument("--no-spconv", dest="spconv", action="store_false", help="skip the spconv-triton rows")
    p.add_argument("--spconv-max-configs", type=int, default=0,
                   help="cap spconv-triton's autotune candidates per key (0 = its full list; --fast: 4)")
    p.add_argument("--before", action="store_true",
                   help="also time the pre-issue-20 Triton default (plain GEMMs, row-table wgrad) as 'before'")
    p.add_argument("--fast", action="store_true",
                   help="short timing budgets, no map-build rows, spconv-triton autotune capped at 4 (36 of 48 "
                        "rows took 205 s on an H200; the full grid needs a warm Triton cache)")
    p.add_argument("--per-op", action="store_true", help="time each pass on every Triton path instead")
    p.add_argument("--autotune", action="store_true", help="set FRUSTUM3D_TRITON_AUTOTUNE=1 (slow first calls)")
    p.add_argument("--configs", type=Path, default=None, help="sweep JSON whose 'best' configs to install first")
    p.add_argument("--sweep", action="store_true", help="time a grid of Triton block configs instead")
    p.add_argument("--sweep-seconds", type=float, default=150.0)
    p.add_argument("--sweep-wgrad", action="store_true", help="--sweep: also the weight-gradient configs")
    p.add_argument("--tap-loops", action="store_true",
                   help="--per-op: also time the tap-list paths with the branching tap loop (column '/branch')")
    p.add_argument("--timing", nargs="+", default=["call"], choices=list(TIMING_MODES),
                   help="how frustum3d triton and spconv-triton are timed: call = events around each call; stream = "
                        "back-to-back calls; kernel = the profiler's device busy time (alone: it slows later launches)")
    p.add_argument("--out", type=Path, default=None, help="write JSON results here (atomically)")
    args = p.parse_args(argv)
    args.timing = tuple(dict.fromkeys(args.timing))
    if "kernel" in args.timing and len(args.timing) > 1:
        p.error("--timing kernel runs alone: the profiler stays attached to the process and slows every later "
                "launch (pytorch/pytorch#144455); time call / stream in another run")
    if args.quick:
        args.sizes, args.channels, args.dtypes = [307_000], [16, 64], ["fp32", "fp16"]
    if args.fast:
        TIMING.update(budget_scale=0.25, min_reps_cap=3)
        args.spconv_max_configs = args.spconv_max_configs or 4
    if args.autotune:
        os.environ["FRUSTUM3D_TRITON_AUTOTUNE"] = "1"
    if args.row_sort:
        os.environ["FRUSTUM3D_TRITON_ROW_SORT"] = "1"
    if not torch.cuda.is_available():
        print("bench_sparse_conv: needs a CUDA GPU (the CPU path is covered by the tests)", file=sys.stderr)
        return 2
    if args.per_op:
        per_op(args)
        return 0
    if args.sweep:
        torch.backends.cuda.matmul.allow_tf32 = False
        rows = sweep(args)
        best: dict = {}
        for r in rows:
            if "ms" in r:
                key = (r["layer"], r["c"], r["dtype"], r["pass"])
                if key not in best or r["ms"] < best[key]["ms"]:
                    best[key] = r
        print("\nbest configs:")
        for r in best.values():
            print(json.dumps(r))
        # the shipped table (load_config_table, --configs) is keyed by width and dtype only, not by layer, so "best"
        # holds the first swept layer's winners; every layer's are in "best_by_layer"
        first = next((r["layer"] for r in rows if "ms" in r), None)
        if args.out is not None:
            write_json(args.out, {"sweep": rows, "best": [r for r in best.values() if r["layer"] == first],
                                  "best_by_layer": list(best.values())})
        return 0
    if args.configs is not None:
        from frustum3d.sparse.backends import triton_backend

        if args.configs.is_file():
            best = json.loads(args.configs.read_text())["best"]
            triton_backend.load_config_table(best)
            print(f"installed {len(best)} configs from {args.configs}")
        else:
            print(f"warning: {args.configs} not found; using the shipped configs", flush=True)
    results = run(args)
    table = markdown(results)
    print("\n" + table)
    if args.out is not None:
        write_json(args.out, results | {"markdown": table})
    return 0


def write_json(path: Path, data: dict) -> None:
    """Atomic JSON write (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as fh:
        json.dump(data, fh, indent=1)
    os.replace(fh.name, path)


if __name__ == "__main__":
    raise SystemExit(main())
