"""Benchmark the full frustum3d reconstruction stage-2 decoder: forward and forward+backward time and peak memory.

Inputs are realistic but random: a synthetic room depth map (back wall, side walls, floor, a few boxes) on the
160x120 lifting plane, projective TSDF lifting of random 2D features (default 512 channels + 13 semantic
probabilities, 7 copies) fused with BUOL occupancy-aware lifting (100 bins), 100 random queries of dim 256,
the analytic front3d frustum; the decoder is the default FrustumDecoder (f=16, output 16) at 256^3.
Losses (FrustumLoss with random targets) are included in the backward timing. The untrained network keeps
~50 % of candidates at every level, so voxel counts (printed) are an upper-end case; a trained network
prunes much harder.

Usage:
    uv run --frozen --no-sync python tools/bench_frustum_decoder.py            # CUDA if present, else small CPU
    uv run --frozen --no-sync python tools/bench_frustum_decoder.py --grid 256 --batch 1 --repeats 5
    options: --multi-scale (front3d: 256 projective + 16 pooled BUOL channels), --features 512, --classes 13, --dtype fp32|bf16 (autocast), --train-gt-union
"""

from __future__ import annotations

import argparse
import time

import torch
from frustum3d import geometry as G
from frustum3d.decoder import FrustumDecoder, decoder_input_groups
from frustum3d.lifting import (
    fuse_lifted,
    fuse_multiscale,
    lift_depth,
    lift_depth_multiscale,
    occupancy_aware_lift,
    occupancy_channels,
    occupancy_pyramid,
)
from frustum3d.losses import FrustumLoss


def room_depth(batch: int, w: int, h: int, k: torch.Tensor, seed: int) -> torch.Tensor:
    """Ray-cast a box room (x in [-2.5, 2.5], floor at y = 1.2, back wall at z = 5) plus random boxes."""
    g = torch.Generator().manual_seed(seed)
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                          indexing="ij")
    dx = (u - k[0, 2]) / k[0, 0]
    dy = (v - k[1, 2]) / k[1, 1]
    out = []
    for _ in range(batch):
        back = 3.5 + 2.0 * torch.rand((), generator=g, dtype=torch.float64)
        t = torch.full_like(dx, float(back))
        for plane, coord in ((-2.5, dx), (2.5, dx)):
            tt = plane / coord
            t = torch.where((tt > 0) & (tt < t), tt, t)
        floor = 1.2 / dy
        t = torch.where((floor > 0) & (floor < t), floor, t)
        for _b in range(4):  # furniture: fronto-parallel boxes
            z0 = 1.0 + 3.0 * torch.rand((), generator=g, dtype=torch.float64)
            x0 = -2 + 3.5 * torch.rand((), generator=g, dtype=torch.float64)
            y0 = 0.2 + 0.8 * torch.rand((), generator=g, dtype=torch.float64)
            hit = (dx * z0 > x0) & (dx * z0 < x0 + 0.8) & (dy * z0 > y0) & (dy * z0 < 1.2)
            t = torch.where(hit & (z0 < t), z0, t)
        out.append(t.clamp(0.4, 6.0))
    return torch.stack(out).float()


def make_inputs(args, device):
    w, h = 160 * args.grid // 256 or 1, 120 * args.grid // 256 or 1
    w, h = max(w, 20), max(h, 15)
    k = G.front3d_intrinsic((w, h))
    voxel = 0.03 * 256 / args.grid
    geo = dict(grid_dims=(args.grid,) * 3, voxel_size=voxel)
    depth = room_depth(args.batch, w, h, k, 0).to(device)
    feats = torch.randn(args.batch, args.features, 104 * h // 120, 128 * w // 160, device=device)
    sem = torch.softmax(torch.randn(args.batch, args.classes, h, w, device=device), 1)
    occ = torch.randn(args.batch, 100, h, w, device=device)
    t0 = time.perf_counter()
    proj = lift_depth(depth, k, feats, sem, **geo)
    buol = occupancy_aware_lift(sem, occ, depth, k, stuff_classes=(10, 11, 12), **geo)
    lifted = fuse_lifted(proj, buol)
    ms = None
    if args.multi_scale:
        ms_maps = [torch.randn(args.batch, args.ms_channels, h // s, w // s, device=device) for s in (2, 4, 8)]
        ms = fuse_multiscale(lift_depth_multiscale(depth, k, ms_maps, **geo), occupancy_pyramid(buol))
    _sync(device)
    lift_s = time.perf_counter() - t0
    frustum = G.FrustumGeometry(plane_size=(w, h), **geo).frustum_mask(k)
    frustum = frustum.to(device)[None].expand(args.batch, *geo["grid_dims"])
    queries = torch.randn(args.batch, 100, 256, device=device)
    return lifted, ms, queries, frustum, lift_s


def make_targets(args, device, n):
    g = args.grid
    tg = {}
    for lvl, s in (("64", 4), ("128", 2), ("256", 1)):
        c = g // s
        tg[f"occupancy_{lvl}"] = torch.rand(args.batch, c, c, c, device=device) > 0.9
        tg[f"masks_{lvl}"] = [torch.rand(n, c, c, c, device=device) > 0.95 for _ in range(args.batch)]
    tg["geometry"] = 3 * torch.rand(args.batch, g, g, g, device=device)
    indices = [(torch.arange(n), torch.arange(n)) for _ in range(args.batch)]
    return tg, indices


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    """Flags describing the decoder inputs and run (shared with tools/profile_frustum_decoder.py)."""
    p.add_argument("--grid", type=int, default=None, help="grid edge (default 256 on CUDA, 64 on CPU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--features", type=int, default=512)
    p.add_argument("--classes", type=int, default=13)
    p.add_argument("--multi-scale", action="store_true")
    p.add_argument("--ms-channels", type=int, default=256)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default=None)


def resolve_device(args: argparse.Namespace) -> torch.device:
    """CUDA when present (unless --device says otherwise); fills the grid default for that device."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.grid is None:
        args.grid = 256 if device.type == "cuda" else 64
    return device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_input_arguments(p)
    p.add_argument("--train-gt-union", action="store_true", help="pass random GT occupancy for the prune rule")
    args = p.parse_args()
    device = resolve_device(args)
    torch.manual_seed(0)

    lifted, ms, queries, frustum, lift_s = make_inputs(args, device)
    dec = FrustumDecoder(decoder_input_groups(args.features, args.classes), query_dim=256,
                         use_multi_scale=args.multi_scale,
                         multi_scale_channels=args.ms_channels + occupancy_channels(args.classes),
                         grid_dims=(args.grid,) * 3).to(device)
    crit = FrustumLoss()
    n_masks = 8
    targets, indices = make_targets(args, device, n_masks)
    gt_occ = ({k: targets[f"occupancy_{k}"] for k in ("64", "128", "256")} if args.train_gt_union else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def forward():
        with autocast:
            return dec(lifted, queries, frustum, ms_features=ms, gt_occupancy=gt_occ)

    rows = []
    for mode in ("forward (no_grad)", "forward+backward"):
        times, peaks, counts = [], [], None
        for i in range(args.repeats + 1):
            dec.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            t0 = time.perf_counter()
            if mode.startswith("forward ("):
                with torch.no_grad():
                    out = forward()
            else:
                dec.train()
                out = forward()
                losses = crit(out, targets, indices)
                sum(losses.values()).backward()
            _sync(device)
            dt = time.perf_counter() - t0
            if i == 0:
                counts = {k: out[k].num_voxels for k in ("occupancy_128", "panoptic_128", "occupancy_256",
                                                         "geometry")}
                continue  # warm-up (kernel maps, autotuning)
            times.append(dt)
            peaks.append(torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"))
            del out
        rows.append((mode, min(times) / args.batch, sum(times) / len(times) / args.batch, max(peaks) / args.batch,
                     counts))

    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}) "
          f"grid={args.grid}^3 batch={args.batch} dtype={args.dtype} multi_scale={args.multi_scale} "
          f"lifted voxels={lifted.num_voxels} channels={lifted.num_channels} lifting={lift_s:.3f}s "
          f"params={sum(p.numel() for p in dec.parameters()) / 1e6:.2f}M")
    print(f"{'mode':<20} {'best s/sample':>14} {'mean s/sample':>14} {'peak GiB/sample':>16}  voxels "
          "(cand128, kept128, cand256, kept256)")
    for mode, best, mean, peak, c in rows:
        print(f"{mode:<20} {best:>14.4f} {mean:>14.4f} {peak:>16.3f}  "
              f"{c['occupancy_128']}, {c['panoptic_128']}, {c['occupancy_256']}, {c['geometry']}")


if __name__ == "__main__":
    main()
