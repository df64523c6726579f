"""Training-step cost of both NVPanoptix3D stages, fp32 and bf16 autocast, with an optional profile.

    uv run --frozen --no-sync python tools/bench_training.py                       # full preset, 320x240, 256^3
    uv run --frozen --no-sync python tools/bench_training.py --profile             # + torch.profiler top ops
    uv run --frozen --no-sync python tools/bench_training.py --preset tiny --grid 32 --image 64x48 \\
        --repeats 1 --batches-2d 1 2 --device cpu                                  # CPU smoke run

What it measures (synthetic frame from ``datasets3d.synth``, random weights, AdamW):

* ``3d``: one 3D-stage step at batch 1 (forward of the whole network with ground-truth occupancy, 3D loss,
  backward, optimiser step), as ``nvp3d.training.module3d`` trains it: median seconds per step after one
  warm-up step, and peak GPU memory (``torch.cuda.max_memory_allocated``); every row's dtype and batch runs
  one step before the first row is timed, so the first row does not carry the process's warm-up;
* ``--graphs-2d on off`` times the 3D step with the frozen 2D network replayed from CUDA graphs (as the 3D
  stage trains by default, ``train.cuda_graphs_2d``) and eagerly, in the same run;
* ``--cudnn-benchmark`` repeats the 3D rows with ``torch.backends.cudnn.benchmark = True`` (cuDNN times its
  algorithms for the dense 3D convolutions of the decoder; shapes are fixed at a fixed grid);
* ``2d``: one 2D-stage step (``PanopticModule2D.compute_losses``, backward, optimiser step) at batch 1 and
  the ``--batches-2d`` sizes: seconds per step and samples/s; the best batch is the one with the most samples/s
  (a batch that runs out of memory is reported and skipped);
* ``--train-graphs-2d off on`` times the 2D rows eagerly and with the training forward and backward replayed
  from CUDA graphs (``train.cuda_graphs_train_2d``; fp32 only, so bf16 rows stay eager), in the same run.

bf16 rows run the forward under ``torch.autocast(bfloat16)`` with fp32 weights (Lightning's ``bf16-mixed``).
TF32 is on for fp32 matmuls / convs, as in training (``train.allow_tf32``, default true). ``--profile`` prints a ``torch.profiler`` summary (top
ops by device time, including the Triton sparse-conv kernels) of one 3D step per dtype.

The synthetic frame and the batch come from ``tools/bench_inference.py``'s helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import batch_of, build, make_frame, prepare_run  # noqa: E402  (the same spec, data and network)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _timed_steps(step, repeats: int, device: torch.device) -> tuple[float, float | None]:
    """Median seconds of ``repeats`` calls of ``step`` after one warm-up call, and peak GiB (CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        if i > 0:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak


def parts_3d(spec, dm, model, device: torch.device, batch_size: int = 1):
    """The pieces of one 3D-stage training step (the module3d recipe) at ``batch_size``: its optimizer, a forward
    callable and a loss callable (``loss(out)`` -> the total). Shared with ``tools/count_step_ops.py``, which
    counts the phases that :func:`step_3d` times."""
    from nvp3d.data.targets import gt_occupancy
    from nvp3d.training.losses import Stage3DCriterion

    crit = Stage3DCriterion(spec)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    batch = batch_of(dm, batch_size, device)
    gt = gt_occupancy(batch, device)

    def forward():
        return model(batch["image"], batch["intrinsic_reduced"], batch["frustum_mask"], gt)

    def loss(out) -> torch.Tensor:
        return crit(out, batch)[0]

    return opt, forward, loss


def step_3d(spec, dm, model, device: torch.device, dtype: str, batch_size: int = 1):
    """A closure running one 3D-stage training step (:func:`parts_3d`) at ``batch_size``."""
    opt, forward, loss = parts_3d(spec, dm, model, device, batch_size)

    def step() -> None:
        with _autocast(device, dtype):
            out = forward()
        with torch.autocast(device.type, enabled=False):
            total = loss(out)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    return step


def step_2d(module, dm, device: torch.device, dtype: str, batch_size: int):
    """A closure running one 2D-stage training step (``PanopticModule2D.compute_losses``) at ``batch_size``."""
    module.train()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    batch = batch_of(dm, batch_size, device)

    def step() -> None:
        with _autocast(device, dtype):
            total, _, _ = module.compute_losses(batch)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    return step


def profile_step(step, device: torch.device, top: int) -> str:
    """``torch.profiler`` table (top ops by device time, or CPU time without CUDA) of one step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        _sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60)


def _warm_every_row(rows: list[tuple[str, int]], make_step, device: torch.device) -> None:
    """One step of every (dtype, batch) row before any row is timed. Why: the first row of a process paid for
    warm-up that its own single warm-up step did not cover (stop 39, full preset 3D step: bf16 0.344 s when timed
    first, 0.285 s when timed second), an order effect as large as the dtype difference being measured."""
    for dtype, bs in rows:
        try:
            make_step(dtype, bs)()
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()  # the row itself reports it
        _sync(device)


def bench_3d(args, spec, dm, model, device: torch.device) -> list[dict]:
    """3D-stage step rows: every dtype, with cuDNN autotuning off (default) and, with ``--cudnn-benchmark``, on."""
    rows = []
    modes = [False, True] if args.cudnn_benchmark else [False]
    for graphs in args.graphs_2d:
        # the frozen 2D network replayed from CUDA graphs (train.cuda_graphs_2d) or run eagerly
        model.net2d.enable_cuda_graphs(graphs == "on")
        for bench in modes:
            torch.backends.cudnn.benchmark = bench
            rows_3d = [(d, b) for d in args.dtypes for b in args.batches_3d]
            _warm_every_row(rows_3d, lambda d, b: step_3d(spec, dm, model, device, d, b), device)
            for dtype, bs in rows_3d:
                name = (dtype + ("+cudnn.benchmark" if bench else "")
                        + ("+graphs2d" if graphs == "on" and device.type == "cuda" else ""))
                try:
                    step = step_3d(spec, dm, model, device, dtype, bs)
                    sec, peak = _timed_steps(step, args.repeats, device)
                except torch.cuda.OutOfMemoryError:
                    print(f"3d {name}: out of memory at batch {bs}", flush=True)
                    torch.cuda.empty_cache()
                    continue
                row = {"stage": "3d", "dtype": name, "batch": bs, "step_s": sec, "samples_per_s": bs / sec,
                       "peak_mem_gb": peak}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.profile and not bench and bs == args.batches_3d[0]:
                    print(f"\n### profile: 3D step {name}\n{profile_step(step, device, args.top)}", flush=True)
    torch.backends.cudnn.benchmark = False
    model.net2d.enable_cuda_graphs(False)
    return rows


def bench_2d(args, spec, device: torch.device) -> list[dict]:
    from nvp3d.data.datamodule import NVP3DDataModule
    from nvp3d.training.module2d import PanopticModule2D

    if "on" in args.train_graphs_2d and spec.train.activation_checkpoint:
        spec = spec.model_copy(deep=True)
        spec.train.activation_checkpoint = False  # the training graphs need it off: the same for every row
        print("2d: activation checkpointing off for all 2D rows (train.cuda_graphs_train_2d needs it off)", flush=True)
    dm = NVP3DDataModule(spec, stage="2d", splits=("train",))  # samples carry the multi-plane occupancy target
    dm.setup()
    torch.manual_seed(0)
    module = PanopticModule2D(spec, dm.thing_ids, dm.stuff_ids).to(device)
    from nvp3d.model.graphed_train2d import TrainingGraphs

    rows = []
    # every dtype warmed up eagerly before the first timed row (see _warm_every_row); the batches stay the rows' own
    _warm_every_row([(d, 1) for d in args.dtypes], lambda d, b: step_2d(module, dm, device, d, b), device)
    for graphs in args.train_graphs_2d:
        for dtype in args.dtypes:
            for bs in sorted({1, *args.batches_2d}):
                # train.cuda_graphs_train_2d: a fresh capture cache per row (it keeps two shapes)
                module.train_graphs = TrainingGraphs(module.model) if graphs == "on" else None
                name = dtype
                try:
                    sec, peak = _timed_steps(step_2d(module, dm, device, dtype, bs), args.repeats, device)
                except torch.cuda.OutOfMemoryError:
                    print(f"2d {name}: out of memory at batch {bs}", flush=True)
                    module.train_graphs = None
                    torch.cuda.empty_cache()
                    break
                # the label says what ran (TrainingGraphs.applies decides): replayed captures, a failed capture, or
                # eager (CPU, bf16 autocast, checkpointing)
                tg = module.train_graphs
                if tg is not None and tg.failed:
                    name += " (capture failed: eager)"
                elif tg is not None and tg.captures:
                    name += "+traingraphs"
                row = {"stage": "2d", "dtype": name, "batch": bs, "step_s": sec, "samples_per_s": bs / sec,
                       "peak_mem_gb": peak}
                rows.append(row)
                print(json.dumps(row), flush=True)
    module.train_graphs = None
    return rows


def summary(rows: list[dict]) -> str:
    lines = ["| stage | dtype | batch | s/step | samples/s | peak GiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") is not None else "-"
        lines.append(f"| {r['stage']} | {r['dtype']} | {r['batch']} | {r['step_s']:.3f} | {r['samples_per_s']:.2f} "
                     f"| {peak} |")
    for dtype in sorted({r["dtype"] for r in rows if r["stage"] == "2d"}):
        rs = [r for r in rows if r["stage"] == "2d" and r["dtype"] == dtype]
        best = max(rs, key=lambda r: r["samples_per_s"])
        one = next(r for r in rs if r["batch"] == 1)
        lines.append(f"\n2D {dtype}: batch 1 {one['samples_per_s']:.2f} samples/s; best batch {best['batch']} "
                     f"{best['samples_per_s']:.2f} samples/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="full", choices=("full", "small", "tiny"))
    ap.add_argument("--grid", type=int, default=256)
    ap.add_argument("--image", default="320x240")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    ap.add_argument("--stages", nargs="+", default=["3d", "2d"], choices=("3d", "2d"))
    ap.add_argument("--batches-2d", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--batches-3d", type=int, nargs="+", default=[1], help="3D-stage batch sizes (default 1)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler summary of one 3D step per dtype")
    ap.add_argument("--top", type=int, default=25, help="profiler rows")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="also time the 3D step with torch.backends.cudnn.benchmark=True (dense 3D convs)")
    ap.add_argument("--graphs-2d", nargs="+", default=["on"], choices=("on", "off"),
                    help="3D rows with the frozen 2D network replayed from CUDA graphs (train.cuda_graphs_2d, the "
                         "default) and/or eager; no effect on CPU")
    ap.add_argument("--train-graphs-2d", nargs="+", default=["off"], choices=("on", "off"),
                    help="2D rows with the training forward and backward replayed from CUDA graphs "
                         "(train.cuda_graphs_train_2d: fp32 without activation checkpointing only), or eager")
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = prepare_run(args)
    w, h = args.image
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_frame(Path(tmp) / "data", args.grid, args.image)
        spec, dm, model = build(args, data, device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"device {device} ({name}), preset {args.preset}, grid {args.grid}^3, image {w}x{h}", flush=True)
        if "3d" in args.stages:
            rows += bench_3d(args, spec, dm, model, device)
        if "2d" in args.stages:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows += bench_2d(args, spec, device)
    print("\n" + summary(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
