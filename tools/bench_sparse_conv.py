"""Benchmark frustum3d.sparse convolutions (torch vs triton backends, optional spconv / spconv-triton rows).

Workload: a synthetic camera-frustum shell set on a 256^3 grid (thick surfaces of a room: floor, walls, boxes,
spheres, cut to a view frustum and trimmed near-to-far to the requested voxel count; ~17 of 27 neighbours
occupied, like a real 256^3 frustum level). Layers: submanifold 3x3x3 and a stride-2 k4 conv (MinkowskiEngine
floor rule), C_in = C_out = C. Rows: kernel-map build (grid and search builders), forward with a cached map,
forward + backward (input and weight gradients), peak memory, torch/triton ratio.

Correctness gate first: every backend is checked against a dense float64 ``F.conv3d`` reference (fp32 with
TF32 off) and the two backends against each other in fp16/bf16; the script aborts if a check fails.

fp32 runs with TF32 OFF (``torch.backends.cuda.matmul.allow_tf32 = False``, exact IEEE products in Triton).

    cd packages/frustum3d && PYTHONPATH=src python ../../tools/bench_sparse_conv.py --out /tmp/sparse.json
    (--quick: 307k voxels, C 16/64, fp32/fp16 only; --autotune: sweep Triton configs and print the winners)
"""

from __future__ import annotations

import argparse
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
def time_ms(fn, min_reps: int = 10, budget_ms: float = 300.0) -> float:
    """Median CUDA-event time of ``fn`` after warm-up (2 calls); reps fit a time budget."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    one = max(start.elapsed_time(end), 1e-3)
    reps = int(min(200, max(min_reps, budget_ms / one)))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


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


# ----------------------------------------------------------------------------------------------- spconv
def spconv_rows(coords: torch.Tensor, c: int, dtype: torch.dtype, w: torch.Tensor, ours: torch.Tensor,
                feats: torch.Tensor) -> list[dict]:
    """Submanifold k3 forward with spconv / spconv-triton on the same coordinates and weights (if importable)."""
    rows = []
    for modname in ("spconv.pytorch", "spconv_triton.pytorch"):
        try:
            mod = __import__(modname, fromlist=["SubMConv3d"])
        except Exception:
            continue
        try:
            conv = mod.SubMConv3d(c, c, 3, bias=False, indice_key="bench").to(coords.device, dtype)
            # ours: W[ix + 3 iy + 9 iz][ci, co]; spconv KRSC (co, kx, ky, kz, ci) over index dims (x, y, z)
            wk = w.reshape(3, 3, 3, c, c).permute(4, 2, 1, 0, 3).contiguous()
            with torch.no_grad():
                conv.weight.copy_(wk.to(conv.weight.shape == wk.shape and dtype or dtype))
            st = mod.SparseConvTensor(feats, coords.int(), [256, 256, 256], 1)
            out = conv(st)
            err = ((out.features.float() - ours.float()).norm() / ours.float().norm()).item()
            ms = time_ms(lambda conv=conv, st=st: conv(st))
            rows.append({"library": modname.split(".")[0], "rel_err_vs_frustum3d": err, "fwd_ms": ms})
        except Exception as exc:  # report, never fail the benchmark for an optional baseline
            rows.append({"library": modname.split(".")[0], "error": repr(exc)[:200]})
    return rows


# ----------------------------------------------------------------------------------------------- sweep
def sweep(args) -> list[dict]:
    """Time a small grid of Triton block configs (subm k3 forward and weight gradient) at the first size."""
    import triton
    from frustum3d.sparse.backends import triton_backend as tb

    coords = frustum_shell_coords(args.sizes[0], device="cuda")
    rows = []
    deadline = time.time() + args.sweep_seconds
    for c in args.channels:
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            feats = torch.randn(coords.shape[0], c, device="cuda", dtype=dtype)
            x = SparseVoxels(coords, feats, spatial_shape=(256, 256, 256))
            kmap = get_kernel_map(x.coordinate_set, x.coordinate_set, 3)
            nbr = kmap.offset_major()
            w = torch.randn(27, c, c, device="cuda", dtype=dtype) / math.sqrt(27 * c)
            out = torch.empty(coords.shape[0], c, device="cuda", dtype=dtype)
            g = torch.randn_like(out)
            bk_max = 64 if dtype != torch.float32 else 32
            # the shipped default first, so a sweep cut short never picks something worse than it
            for cfg in (tb.default_gemm_config(c, c, dtype),):
                try:
                    ms = time_ms(lambda cfg=cfg, feats=feats, w=w, nbr=nbr, out=out: tb._launch_gemm(
                        feats, w, (w.stride(0), w.stride(1), w.stride(2)), nbr, out, cfg), min_reps=10, budget_ms=60)
                    rows.append({"c": c, "dtype": dname, "pass": "fwd", "cfg": str(cfg), "ms": ms,
                                 "config": asdict(cfg), "default": True})
                    wcfg = tb.default_wgrad_config(c, c, dtype)
                    ms = time_ms(lambda cfg=wcfg, feats=feats, g=g, nbr=nbr: tb._launch_wgrad(feats, g, nbr, cfg),
                                 min_reps=10, budget_ms=60)
                    rows.append({"c": c, "dtype": dname, "pass": "wgrad", "cfg": str(wcfg), "ms": ms,
                                 "config": asdict(wcfg), "default": True})
                except Exception as exc:
                    print("default config failed:", repr(exc)[:200], flush=True)
            for bm in (64, 128, 256) if dtype != torch.float32 else (32, 64, 128):
                for bn in sorted({32, 64, triton.next_power_of_2(min(max(c, 16), 128))}):
                    if bn > max(32, triton.next_power_of_2(c)):
                        continue
                    for bk in sorted({16, min(max(c, 16), bk_max)}):
                        for warps, stages in ((4, 2), (4, 3), (8, 2)):
                            if time.time() > deadline:
                                return rows
                            cfg = tb.GemmConfig(bm, bn, bk, warps, stages)
                            try:
                                ms = time_ms(lambda cfg=cfg, feats=feats, w=w, nbr=nbr, out=out: tb._launch_gemm(
                                    feats, w, (w.stride(0), w.stride(1), w.stride(2)), nbr, out, cfg), min_reps=10,
                                    budget_ms=60)
                            except Exception as exc:
                                rows.append({"c": c, "dtype": dname, "pass": "fwd", "cfg": str(cfg), "err": repr(exc)[:80]})
                                continue
                            rows.append({"c": c, "dtype": dname, "pass": "fwd", "cfg": str(cfg), "ms": ms,
                                         "config": asdict(cfg)})
                            print(json.dumps(rows[-1]), flush=True)
            for bp in (32, 64, 128):
                for bci in sorted({min(max(c, 16), 32), min(max(c, 16), 64)}):
                    for warps, stages in ((4, 2), (8, 2)):
                        if time.time() > deadline:
                            return rows
                        cfg = tb.WgradConfig(bp, bci, bci, warps, stages)
                        try:
                            ms = time_ms(lambda cfg=cfg, feats=feats, g=g, nbr=nbr: tb._launch_wgrad(feats, g, nbr, cfg),
                                         min_reps=10, budget_ms=60)
                        except Exception as exc:
                            rows.append({"c": c, "dtype": dname, "pass": "wgrad", "cfg": str(cfg), "err": repr(exc)[:80]})
                            continue
                        rows.append({"c": c, "dtype": dname, "pass": "wgrad", "cfg": str(cfg), "ms": ms,
                                     "config": asdict(cfg)})
                        print(json.dumps(rows[-1]), flush=True)
    return rows


LAYERS = (("subm k3", 3, 1), ("k4 s2", 4, 2), ("gen k4 s2", 4, 2))


def apply_layer(label: str, x: SparseVoxels, w: torch.Tensor, s: int) -> SparseVoxels:
    if label == "gen k4 s2":
        return sparse_conv_transpose3d(x, w, stride=s, generative=True)
    return sparse_conv3d(x, w, stride=s)


# ----------------------------------------------------------------------------------------------- main
def run(args) -> dict:
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import triton

    env = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "python": platform.python_version(), "tf32": "off",
        "autotune": os.environ.get("FRUSTUM3D_TRITON_AUTOTUNE", "0"),
        "row_sort": os.environ.get("FRUSTUM3D_TRITON_ROW_SORT", "0"),
    }
    print("env:", env, flush=True)
    gate = correctness_gate(device)
    print(f"correctness gate passed ({len(gate)} checks, max fp32 rel err "
          f"{max(r['rel_err'] for r in gate if 'float32' in r['dtype']):.2e})", flush=True)
    results = {"env": env, "gate": gate, "rows": [], "kmap": [], "spconv": []}
    for n in args.sizes:
        t0 = time.time()
        coords = frustum_shell_coords(n, device="cuda")
        ones = torch.ones(coords.shape[0], 1, device=device)
        x0 = SparseVoxels(coords, ones, spatial_shape=(256, 256, 256))
        dens = neighbour_density(x0)
        print(f"\n## N={coords.shape[0]} (neighbours {dens:.1f}/27, generated in {time.time() - t0:.1f}s)", flush=True)
        # kernel-map build from scratch (new coordinate set each time; sort included in 'set' column)
        for label, k, s in (("subm k3", 3, 1), ("k4 s2", 4, 2)):
            for method in ("grid", "search"):
                def build(k=k, s=s, method=method, coords=coords):
                    cset, _ = CoordinateSet.from_coords(coords, 1, (256, 256, 256), 1)
                    out = cset if s == 1 else cset.downsample(s)
                    get_kernel_map(cset, out, k, 1, False, method=method)
                ms = time_ms(build, min_reps=5)
                results["kmap"].append({"n": n, "layer": label, "method": method, "ms": ms})
                print(f"kmap build {label:8s} {method:6s}: {ms:7.2f} ms", flush=True)
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
                    for backend in args.backends:
                        with use_backend(backend):
                            y = apply_layer(label, x_in, w, s)  # builds/caches the map, compiles kernels
                            outs[backend] = y.feats
                            fwd = time_ms(lambda x=x_in, w=w, s=s, label=label: apply_layer(label, x, w, s))
                            f = x_in.feats.clone().requires_grad_()
                            wg = w.clone().requires_grad_()
                            g = torch.randn_like(y.feats)

                            def step(f=f, wg=wg, g=g, x=x_in, s=s, label=label):
                                out = apply_layer(label, x.replace_feats(f), wg, s)
                                out.feats.backward(g)

                            fb = time_ms(step, min_reps=5)
                            mem = peak_mb(step)
                        row[f"{backend}_fwd_ms"] = fwd
                        row[f"{backend}_fwdbwd_ms"] = fb
                        row[f"{backend}_peak_mb"] = mem
                    if "torch" in outs and "triton" in outs:
                        a, b = outs["triton"].float(), outs["torch"].float()
                        row["triton_vs_torch_rel_err"] = ((a - b).norm() / b.norm()).item()
                        row["fwd_speedup"] = row["torch_fwd_ms"] / row["triton_fwd_ms"]
                        row["fwdbwd_speedup"] = row["torch_fwdbwd_ms"] / row["triton_fwdbwd_ms"]
                    results["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    if label == "subm k3" and args.spconv:
                        w3 = w
                        sp = spconv_rows(coords, c, dtype, w3, outs.get("triton", outs.get("torch")), feats)
                        for r in sp:
                            r.update({"n": n, "c": c, "dtype": dname})
                        results["spconv"].extend(sp)
        if args.out is not None:  # partial results survive a time limit
            write_json(args.out, results)
    if os.environ.get("FRUSTUM3D_TRITON_AUTOTUNE", "0") not in ("", "0"):
        from frustum3d.sparse.backends import triton_backend

        results["tuned"] = triton_backend.tuned_configs()
    return results


def markdown(results: dict) -> str:
    lines = ["| N | layer | C | dtype | torch fwd ms | triton fwd ms | fwd x | torch fwd+bwd ms | triton fwd+bwd ms "
             "| fwd+bwd x | peak MB torch / triton |", "|" + "---|" * 11]
    for r in results["rows"]:
        lines.append(
            f"| {r['n']:,} | {r['layer']} | {r['c']} | {r['dtype']} | {r.get('torch_fwd_ms', float('nan')):.3f} | "
            f"{r.get('triton_fwd_ms', float('nan')):.3f} | {r.get('fwd_speedup', float('nan')):.2f} | "
            f"{r.get('torch_fwdbwd_ms', float('nan')):.3f} | {r.get('triton_fwdbwd_ms', float('nan')):.3f} | "
            f"{r.get('fwdbwd_speedup', float('nan')):.2f} | {r.get('torch_peak_mb', float('nan')):.0f} / "
            f"{r.get('triton_peak_mb', float('nan')):.0f} |")
    lines += ["", "| N | kernel map | builder | ms |", "|---|---|---|---|"]
    for r in results["kmap"]:
        lines.append(f"| {r['n']:,} | {r['layer']} | {r['method']} | {r['ms']:.2f} |")
    if results.get("spconv"):
        lines += ["", "| N | C | dtype | library | subm k3 fwd ms | rel err vs frustum3d |", "|---|---|---|---|---|---|"]
        for r in results["spconv"]:
            lines.append(f"| {r['n']:,} | {r['c']} | {r['dtype']} | {r['library']} | "
                         f"{r.get('fwd_ms', float('nan')):.3f} | {r.get('rel_err_vs_frustum3d', r.get('error'))} |")
    return "\n".join(lines)


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
    p.add_argument("--no-spconv", dest="spconv", action="store_false", help="skip optional spconv rows")
    p.add_argument("--autotune", action="store_true", help="set FRUSTUM3D_TRITON_AUTOTUNE=1 (slow first calls)")
    p.add_argument("--configs", type=Path, default=None, help="sweep JSON whose 'best' configs to install first")
    p.add_argument("--sweep", action="store_true", help="time a grid of Triton block configs instead")
    p.add_argument("--sweep-seconds", type=float, default=150.0)
    p.add_argument("--out", type=Path, default=None, help="write JSON results here (atomically)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.channels, args.dtypes = [307_000], [16, 64], ["fp32", "fp16"]
    if args.autotune:
        os.environ["FRUSTUM3D_TRITON_AUTOTUNE"] = "1"
    if args.row_sort:
        os.environ["FRUSTUM3D_TRITON_ROW_SORT"] = "1"
    if not torch.cuda.is_available():
        print("bench_sparse_conv: needs a CUDA GPU (the CPU path is covered by the tests)", file=sys.stderr)
        return 2
    if args.sweep:
        torch.backends.cuda.matmul.allow_tf32 = False
        rows = sweep(args)
        best: dict = {}
        for r in rows:
            if "ms" in r:
                key = (r["c"], r["dtype"], r["pass"])
                if key not in best or r["ms"] < best[key]["ms"]:
                    best[key] = r
        print("\nbest configs:")
        for r in best.values():
            print(json.dumps(r))
        if args.out is not None:
            write_json(args.out, {"sweep": rows, "best": list(best.values())})
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
