"""Kernel-map build time of frustum3d's two builders (index grid, sorted-key search) at a batch size.

    python tools/bench_kernel_map.py                                   # CPU, 300k voxels per frame, batch 1 and 4
    python tools/bench_kernel_map.py --device cuda --voxels 300000 700000 --batches 1 4 8

For each (voxels per frame, batch): a frustum-shell scene at 256^3 (``tools/bench_sparse_conv.py``'s) repeated
over the batch, then a fresh coordinate set per build (so nothing is cached) and the maps of a subm k3 and a
k4 s2 conv with ``method="grid"`` (the index grid, whatever its size) and ``"search"``, and which one the ``auto``
builder picks (the grid when batch x box cells <= ``GRID_MAX_CELLS``). Best of ``--repeats`` builds, in ms; the
search / grid ratio is from the same run. Both builders give the same table (tested in frustum3d's tests): this only times them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_build(coords: torch.Tensor, batch: int, kernel: int, stride: int, method: str, repeats: int,
               device: torch.device) -> tuple[float, int]:
    """Best build time (ms) of one kernel map from a fresh coordinate set, and its pair count."""
    from frustum3d.sparse import get_kernel_map
    from frustum3d.sparse.coords import CoordinateSet

    best, pairs = float("inf"), 0
    for _ in range(repeats):
        cset, _ = CoordinateSet.from_coords(coords, 1, (256, 256, 256), batch)
        out = cset if stride == 1 else cset.downsample(stride)
        _sync(device)
        t0 = time.perf_counter()
        kmap = get_kernel_map(cset, out, kernel, 1, False, method=method)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        pairs = kmap.num_pairs()
    return 1000.0 * best, pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--voxels", type=int, nargs="+", default=[300_000], help="voxels per frame")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from bench_sparse_conv import frustum_shell_coords
    from frustum3d.sparse.coords import CoordinateSet
    from frustum3d.sparse.kernel_map import GRID_MAX_CELLS, grid_max_cells, index_grid_cells

    device = torch.device(args.device)
    print(f"GRID_MAX_CELLS {GRID_MAX_CELLS} (in use: {grid_max_cells()}), device {device}")
    print("| voxels/frame | batch | layer | grid ms | search ms | search / grid | grid cells | auto picks | pairs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.voxels:
        one = frustum_shell_coords(n, device=str(device))
        for batch in args.batches:
            coords = torch.cat([torch.cat([torch.full_like(one[:, :1], b), one[:, 1:]], 1) for b in range(batch)])
            for label, kernel, stride in (("subm k3", 3, 1), ("k4 s2", 4, 2)):
                ms = {}
                for method in ("grid", "search"):
                    ms[method], pairs = time_build(coords, batch, kernel, stride, method, args.repeats, device)
                cset, _ = CoordinateSet.from_coords(coords, 1, (256, 256, 256), batch)
                cells = index_grid_cells(cset, cset if stride == 1 else cset.downsample(stride), kernel)
                pick = "grid" if cells <= grid_max_cells() else "search"
                print(f"| {one.shape[0]} | {batch} | {label} | {ms['grid']:.1f} | {ms['search']:.1f} | "
                      f"{ms['search'] / ms['grid']:.2f}x | {cells} | {pick} | {pairs} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
