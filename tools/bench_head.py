"""Benchmark the full NVPanoptix3D 2D head (maskformer_head) at toolkit sizes on CUDA.

Measures forward and forward+backward time and peak memory of `MaskFormerHead` ("full"
preset: VGGT tokens 2048-d on a 26x32 patch grid -> res2 104x128 ... res5 13x16, 100 queries,
9 decoder layers, 100-bin occupancy at 120x160), per component and end to end, including the
set criterion (12544 points, deep supervision) in the training step. Prints a Markdown table.

    uv run --frozen --no-sync python tools/bench_head.py                 # fp32 and bf16 autocast, B=1,2
    uv run --frozen --no-sync python tools/bench_head.py --batch 4 --iters 20 --tf32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch


def _inputs(batch: int, cfg, grid: tuple[int, int], device: torch.device):
    """Backbone tokens, DPT depth features and targets for a ``grid`` patch grid (26x32 = toolkit)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    ph, pw = grid
    tokens = [torch.randn(batch, 1, 5 + ph * pw, cfg.token_dim, generator=g).to(device) for _ in range(4)]
    depth = [torch.randn(batch, cfg.depth_dim, ph * 8 // s, pw * 8 // s, generator=g).to(device) for s in (1, 2, 4, 8)]
    targets = []
    for _ in range(batch):
        n = 6
        targets.append(
            {
                "labels": torch.randint(0, cfg.num_classes, (n,), generator=g).to(device),
                "masks": (torch.rand(n, ph * 10, pw * 10, generator=g) > 0.5).to(device),
                "depths": (torch.rand(1, ph * 14, pw * 14, generator=g) * 5).to(device),
                "occupancy": (torch.rand(cfg.occupancy_bins, *cfg.occupancy_size, generator=g) > 0.9).float().to(device),
                "depth_map": torch.rand(*cfg.occupancy_size, generator=g).to(device),
            }
        )
    return tokens, depth, targets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], None], warmup: int, iters: int, device: torch.device) -> tuple[float, float]:
    """Median milliseconds per call and peak allocated GiB over the timed calls (NaN on CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def _workloads(head, criterion, tokens, depth, targets, grid, batch, device, bf16: bool):
    """(label, callable) pairs: component forwards, full forward, full training step."""

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def component(stop: str):
        def run():
            with torch.no_grad(), autocast():
                feats = head.adapter(tokens, grid, 5)
                if stop == "adapter":
                    return
                if stop == "occupancy":
                    head.occupancy_module(feats)
                    return
                mf, _, ms = head.pixel_decoder.forward_features(feats)
                if stop == "pixel decoder":
                    return
                d, dl = head.depth_projector(depth, tuple(mf.shape[-2:]), [tuple(f.shape[-2:]) for f in ms])
                head.predictor(ms, dl, mf, d)

        return run

    def forward():
        with torch.no_grad(), autocast():
            head(tokens, grid, depth, patch_start_idx=5)

    def train_step():
        with autocast():
            out = head(tokens, grid, depth, patch_start_idx=5)
        out["pred_depths"] = depth[0].new_ones(batch, 1, grid[0] * 14, grid[1] * 14, requires_grad=True)
        losses = criterion(out, targets)
        criterion.weighted_total(losses).backward()
        head.zero_grad(set_to_none=True)

    return [
        ("fwd: adapter", component("adapter")),
        ("fwd: adapter + occupancy head", component("occupancy")),
        ("fwd: adapter + pixel decoder", component("pixel decoder")),
        ("fwd: adapter + pixel decoder + depth proj + decoder", component("decoder")),
        ("fwd: full head", forward),
        ("fwd+loss+bwd: full head + criterion", train_step),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--smoke", action="store_true",
                        help="check the script on CPU with the tiny preset (numbers are meaningless)")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("bench_head.py needs a CUDA device (none found); run it on the GPU machine "
              "(or pass --smoke for a CPU check of the script).", file=sys.stderr)
        return 2

    from maskformer_head import HungarianMatcher, SetCriterion, build_head

    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = True
    device = torch.device("cpu" if args.smoke else "cuda")
    head = build_head("tiny" if args.smoke else "full").to(device)
    cfg = head.config
    grid = (4, 6) if args.smoke else (26, 32)
    num_points = 64 if args.smoke else 12544
    n_params = sum(p.numel() for p in head.parameters())
    weights = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0, "loss_depth": 5.0, "loss_mp_occ": 5.0}
    for i in range(cfg.dec_layers):
        weights.update({f"loss_ce_{i}": 2.0, f"loss_mask_{i}": 5.0, f"loss_dice_{i}": 5.0})
    criterion = SetCriterion(
        cfg.num_classes, HungarianMatcher(2.0, 5.0, 5.0, num_points), weights, 0.1,
        ["labels", "masks", "depths", "mp_occ"], num_points, 3.0, 0.75,
    ).to(device)

    where = "CPU (smoke test, tiny preset)" if args.smoke else torch.cuda.get_device_name()
    print(f"# maskformer_head {'tiny' if args.smoke else 'full'} preset on {where} "
          f"(torch {torch.__version__}, TF32 {'on' if args.tf32 else 'off'}, {n_params / 1e6:.1f} M params)\n")
    print("| batch | precision | what | median ms | peak GiB |")
    print("|---|---|---|---|---|")
    for batch in args.batch:
        tokens, depth, targets = _inputs(batch, cfg, grid, device)
        for precision in args.precision:
            rows = _workloads(head, criterion, tokens, depth, targets, grid, batch, device, precision == "bf16")
            for what, fn in rows:
                try:
                    ms, gib = _time(fn, args.warmup, args.iters, device)
                    print(f"| {batch} | {precision} | {what} | {ms:.1f} | {gib:.2f} |", flush=True)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    print(f"| {batch} | {precision} | {what} | OOM | - |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
