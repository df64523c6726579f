"""Sparse instance norm of several batch items: the row-block broadcast (frustum3d >= 0.3.16) against the
``index_select`` gather of the per-item statistics (frustum3d 0.3.15), forward and forward + backward.

    python tools/bench_norm.py                                         # CPU, 1M rows per item, C 16 / 48
    python tools/bench_norm.py --device cuda --rows 3600000 --batches 4 --channels 16 48

Why: at batch 4 the 256^3 level's occupancy and geometry heads normalise about 14M candidate rows; under the
torch profiler the gathers of the 0.3.15 form took 81.5 ms of device time in one frame (72 calls, H100, stop 46),
and batch 4's level 256 went from 21 to 37 ms per frame. Both forms compute the same values (frustum3d's tests
compare them with the per-item reference in float64); this only times them. Median of ``--repeats`` runs in ms,
and the gather / broadcast ratio from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gather_form(f: Tensor, batch: Tensor, counts: list[int], eps: float = 1e-8) -> Tensor:
    """The 0.3.15 form: block means broadcast back to the rows with ``index_select(0, batch)`` (autograd)."""
    from frustum3d.sparse.norm import _block_means

    d = f - _block_means(f, counts).index_select(0, batch)
    inv = torch.rsqrt(_block_means(d * d, counts) + eps)
    return d * inv.index_select(0, batch)


def time_ms(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms caches and kernels
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000.0 * (time.perf_counter() - t0))
    return statistics.median(times[1:])


def _passes(f: Tensor, g: Tensor, batch: Tensor, counts: list[int]) -> dict:
    """Pass name -> (gather form, row-block broadcast) callables on the same features."""
    from frustum3d.sparse.norm import _BatchedInstanceNorm

    return {
        "forward": (lambda: gather_form(f.detach(), batch, counts),
                    lambda: _BatchedInstanceNorm.apply(f.detach(), counts, 1e-8)),
        "forward+backward": (lambda: gather_form(f, batch, counts).backward(g),
                             lambda: _BatchedInstanceNorm.apply(f, counts, 1e-8).backward(g)),
    }


def main(argv: list[str] | None = None) -> int:
    from frustum3d.sparse.norm import _BatchedInstanceNorm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows per batch item")
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--channels", type=int, nargs="+", default=[16, 48])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    print("| batch | rows | C | pass | gather ms | broadcast ms | gather / broadcast | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for b in args.batches:
        counts = [args.rows] * b
        batch = torch.arange(b, device=device).repeat_interleave(args.rows)
        for c in args.channels:
            f = torch.randn(b * args.rows, c, device=device).requires_grad_()
            g = torch.randn_like(f)
            with torch.no_grad():  # the same values (a guard on what is timed; frustum3d's tests check the maths)
                diff = (gather_form(f, batch, counts) - _BatchedInstanceNorm.apply(f, counts, 1e-8)).abs().max()
            runs = _passes(f, g, batch, counts)
            for name, (old, new) in runs.items():
                t_old, t_new = time_ms(old, args.repeats, device), time_ms(new, args.repeats, device)
                print(f"| {b} | {b * args.rows} | {c} | {name} | {t_old:.2f} | {t_new:.2f} | {t_old / t_new:.2f}x "
                      f"| {float(diff):.1e} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
