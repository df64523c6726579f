"""Profile one forward+backward step of the frustum3d decoder (with FrustumLoss), per sparse backend.

Builds the same inputs as ``tools/bench_frustum_decoder.py`` (its functions are imported), then for every
backend in ``--backends``:

1. warms up (kernel maps, Triton compilation);
2. times ``--repeats`` training steps with stage markers and prints the median time per stage: forward
   ``encoder`` (input blocks, sparse 128/64 encoder, dense 32/16/8 encoder), ``level64`` (dense decoder,
   occupancy / panoptic heads, pruning), ``level128``, ``level256``, ``losses``, then backward split where
   the gradient reaches the input of the 256 / 128 / 64 decoder stages. Markers are CUDA events on CUDA and
   host clocks on the CPU; they are taken from module hooks, so the decoder itself is not modified;
3. runs one more step under ``torch.profiler`` and prints the top ops by self CUDA time and by CPU time
   (the stage names also appear there as ``record_function`` ranges).

Usage (GPU, from the repository root):
    PYTHONPATH=packages/frustum3d/src python3 tools/profile_frustum_decoder.py --grid 256 --dtype bf16
CPU smoke run (the Triton backend needs CUDA, so only torch runs there):
    uv run --frozen --no-sync python tools/profile_frustum_decoder.py --grid 64 --device cpu --features 32
Options: --backends torch,triton  --top 25  --repeats 3  --out-dir DIR (full tables + chrome traces).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_frustum_decoder import add_input_arguments, make_inputs, make_targets, resolve_device  # noqa: E402
from frustum3d.decoder import FrustumDecoder, decoder_input_groups  # noqa: E402
from frustum3d.lifting import occupancy_channels  # noqa: E402
from frustum3d.losses import FrustumLoss  # noqa: E402
from frustum3d.sparse import SparseVoxels  # noqa: E402

FORWARD_STAGES = ("encoder", "level64", "level128", "level256")
BACKWARD_STAGES = ("bwd_level256", "bwd_level128", "bwd_level64", "bwd_encoder")


class Clock:
    """Named time points: CUDA events on CUDA (no sync while recording), host clocks on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.points: dict[str, object] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.points[name] = ev
        else:
            self.points[name] = time.perf_counter()

    def elapsed(self, a: str, b: str) -> float:
        """Seconds from point ``a`` to point ``b`` (NaN when either is missing)."""
        if a not in self.points or b not in self.points:
            return float("nan")
        pa, pb = self.points[a], self.points[b]
        if self.cuda:
            return pa.elapsed_time(pb) / 1e3  # type: ignore[union-attr]
        return float(pb) - float(pa)  # type: ignore[arg-type]


class StageMarkers:
    """Module hooks that mark stage boundaries of ``FrustumDecoder.forward`` and its backward.

    Forward: decoder entry -> ``dec4`` (first dense decoder) -> ``dec1`` (64 -> 128) -> ``dec0`` (128 -> 256) ->
    decoder exit. Backward: a tensor hook on the input features of ``dec0`` / ``dec1`` / ``dec4`` fires once
    their gradient is complete, i.e. when the backward of everything after that point is done.
    """

    def __init__(self, dec: FrustumDecoder, clock: Clock) -> None:
        self.clock = clock
        self.ranges: list = []
        self.handles = [
            dec.register_forward_pre_hook(self._enter("encoder", None)),
            dec.dec4.register_forward_pre_hook(self._enter("level64", "bwd_level64_done")),
            dec.dec1.register_forward_pre_hook(self._enter("level128", "bwd_level128_done")),
            dec.dec0.register_forward_pre_hook(self._enter("level256", "bwd_level256_done")),
            dec.register_forward_hook(self._exit),
        ]

    def _close_range(self) -> None:
        while self.ranges:
            self.ranges.pop().__exit__(None, None, None)

    def _enter(self, stage: str, grad_point: str | None):
        def hook(module, args):
            self._close_range()
            self.clock.mark(stage)
            rf = torch.profiler.record_function(f"stage::{stage}")
            rf.__enter__()
            self.ranges.append(rf)
            x = args[0] if args else None
            t = x.feats if isinstance(x, SparseVoxels) else x
            if grad_point is not None and torch.is_tensor(t) and t.requires_grad:
                t.register_hook(lambda g: (self.clock.mark(grad_point), None)[1])

        return hook

    def _exit(self, module, args, output):
        self._close_range()
        self.clock.mark("forward_end")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def stage_times(clock: Clock) -> dict[str, float]:
    """Seconds per stage from the marks of one step."""
    e = clock.elapsed
    return {
        "encoder": e("encoder", "level64"),
        "level64": e("level64", "level128"),
        "level128": e("level128", "level256"),
        "level256": e("level256", "forward_end"),
        "losses": e("forward_end", "backward_start"),
        "bwd_level256": e("backward_start", "bwd_level256_done"),
        "bwd_level128": e("bwd_level256_done", "bwd_level128_done"),
        "bwd_level64": e("bwd_level128_done", "bwd_level64_done"),
        "bwd_encoder": e("bwd_level64_done", "backward_end"),
        "forward": e("encoder", "forward_end"),
        "backward": e("backward_start", "backward_end"),
        "total": e("encoder", "backward_end"),
    }


def train_step(dec, crit, inputs, targets, indices, autocast, clock: Clock | None):
    lifted, ms, queries, frustum = inputs
    dec.zero_grad(set_to_none=True)
    with autocast:
        out = dec(lifted, queries, frustum, ms_features=ms)
        with torch.profiler.record_function("stage::losses"):
            losses = crit(out, targets, indices)
            total = sum(losses.values())
    if clock is not None:
        clock.mark("backward_start")
    with torch.profiler.record_function("stage::backward"):
        total.backward()
    if clock is not None:
        clock.mark("backward_end")
    counts = {k: out[k].num_voxels for k in ("occupancy_128", "panoptic_128", "occupancy_256", "geometry")}
    return counts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_backend(name: str, args, device, inputs, targets, indices) -> dict:
    os.environ["FRUSTUM3D_SPARSE_BACKEND"] = name
    torch.manual_seed(0)
    dec = FrustumDecoder(decoder_input_groups(args.features, args.classes), query_dim=256,
                         use_multi_scale=args.multi_scale,
                         multi_scale_channels=args.ms_channels + occupancy_channels(args.classes),
                         grid_dims=(args.grid,) * 3).to(device).train()
    crit = FrustumLoss()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    counts = train_step(dec, crit, inputs, targets, indices, autocast, None)  # warm-up
    _sync(device)
    rows = []
    peak = float("nan")
    for _ in range(args.repeats):
        clock = Clock(device)
        markers = StageMarkers(dec, clock)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        train_step(dec, crit, inputs, targets, indices, autocast, clock)
        _sync(device)
        wall = time.perf_counter() - t0
        markers.remove()
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**30
        st = stage_times(clock)
        st["wall"] = wall
        rows.append(st)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    clock = Clock(device)
    markers = StageMarkers(dec, clock)
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        train_step(dec, crit, inputs, targets, indices, autocast, clock)
        _sync(device)
    markers.remove()
    ka = prof.key_averages()
    tables = {}
    if device.type == "cuda":
        tables["self_cuda"] = ka.table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=60)
    tables["self_cpu"] = ka.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60)
    tables["cpu_total"] = ka.table(sort_by="cpu_time_total", row_limit=args.top, max_name_column_width=60)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tag = f"{name}_{args.dtype}_g{args.grid}"
        (out / f"profile_{tag}.txt").write_text("\n\n".join(f"== {k}\n{v}" for k, v in tables.items()))
        if args.trace:
            prof.export_chrome_trace(str(out / f"trace_{tag}.json"))
    return {"stages": med, "peak": peak, "counts": counts, "tables": tables}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_input_arguments(p)
    p.add_argument("--backends", default="torch,triton", help="comma list of sparse backends")
    p.add_argument("--top", type=int, default=25, help="rows per profiler table")
    p.add_argument("--out-dir", default=None, help="write full profiler tables (and traces) here")
    p.add_argument("--trace", action="store_true", help="also export chrome traces to --out-dir")
    args = p.parse_args()
    device = resolve_device(args)
    torch.manual_seed(0)
    lifted, ms, queries, frustum, _lift_s = make_inputs(args, device)
    targets, indices = make_targets(args, device, 8)
    inputs = (lifted, ms, queries, frustum)

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if device.type != "cuda" and "triton" in backends:
        print("note: the triton backend needs CUDA here; profiling torch only")
        backends = [b for b in backends if b != "triton"]
    results = {b: profile_backend(b, args, device, inputs, targets, indices) for b in backends}

    for b, r in results.items():
        for k, v in r["tables"].items():
            print(f"\n===== backend={b} dtype={args.dtype} top ops by {k}\n{v}")
    print(f"\ndevice={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}) "
          f"grid={args.grid}^3 batch={args.batch} dtype={args.dtype} lifted voxels={lifted.num_voxels} "
          f"channels={lifted.num_channels}")
    names = list(FORWARD_STAGES) + ["losses"] + list(BACKWARD_STAGES) + ["forward", "backward", "total", "wall"]
    print("stage times, median ms per step (backward split at the inputs of dec0 / dec1 / dec4):")
    print(f"{'stage':<14}" + "".join(f"{b:>12}" for b in results))
    for n in names:
        print(f"{n:<14}" + "".join(f"{1e3 * r['stages'][n]:>12.1f}" for r in results.values()))
    print(f"{'peak GiB':<14}" + "".join(f"{r['peak']:>12.2f}" for r in results.values()))
    for b, r in results.items():
        c = r["counts"]
        print(f"voxels {b}: cand128 {c['occupancy_128']}, kept128 {c['panoptic_128']}, "
              f"cand256 {c['occupancy_256']}, kept256 {c['geometry']}")


if __name__ == "__main__":
    main()
