"""Latency of full 2D+3D NVPanoptix3D inference per frame, with a breakdown.

Run on a GPU machine (the coordinator runs it on an H100):

    uv run --frozen --no-sync python tools/bench_inference.py                 # full preset, 320x240, 256^3
    uv run --frozen --no-sync python tools/bench_inference.py --preset tiny --grid 32 --image 64x48 --repeats 1
                                                                               # CPU smoke run
    uv run --frozen --no-sync python tools/bench_inference.py --folder 64      # + `nvp3d inference` images/s
    uv run --frozen --no-sync python tools/bench_inference.py --json out.json  # rows also as JSON

What it does: generates one synthetic 3D-FRONT-format frame (``datasets3d.synth``) at the requested image size
and grid (so the 3D stage sees a realistic depth and surface), builds the 3D-stage network of the preset with
random weights (no download; the timing does not depend on the weights except through pruning, see below),
and times, per frame, in fp32 and bf16 autocast, for batch 1 and the batch sizes of ``--batches`` (the best
ms/frame is reported):

* ``backbone``: VGGT aggregator + DPT depth head;
* ``head``: the 2D head (adapter, pixel decoder, depth projector, masked decoder, occupancy head);
* ``plane``: 2D post-processing to the lifting plane + the depth-feature projector;
* ``lifting``: projective + occupancy-aware lifting and their union;
* ``decoder.encoder`` (input blocks and L0..L4), ``decoder.level64`` (dense up-path and level-64 heads),
  ``decoder.level128``, ``decoder.level256`` (generative up-sampling, occupancy, geometry and mask heads),
  ``decoder.other`` (pruning, unions, query dot products: the rest of the decoder forward). In ``graphed``
  mode the decoder's dense part (L2..L4 encoders, dense up-path, level-64 heads) replays from one CUDA graph
  and is timed as a whole under ``decoder.level64``;
* ``fusion``: densify the TDF and 3D panoptic fusion per frame.

Module times come from forward hooks with a device synchronisation around each module (that adds a little
overhead; the ``total`` column is measured separately without hooks). Random weights predict occupancy near
0.5, so pruning keeps about half the candidates. ``--checkpoint`` loads a trained 3D checkpoint instead, with
the ``model`` section it records (preset, head and 3D sizes; ``--preset`` is then ignored and ``--grid`` must be
its grid). Measured on an H200
with the learning benchmark's small 64^3 model: trained it kept 38k finest-level voxels per frame against 64k
with random weights, but the time per frame was the same within noise (graphed bf16: 65 / 24 ms at batch 1 / 4,
random 63 / 25 ms): at that size the decoder is bound by launches and host syncs, not by voxels.

Before/after in one run (``--graphs both``, the default on CUDA): ``mode`` ``eager`` is the 2D network as it ran
before ``inference.cuda_graphs`` (no graphs, no cached bf16 weights, the decoder's dense part eager);
``graphed`` replays the 2D network and the decoder's dense part from CUDA graphs (:mod:`nvp3d.model.graphed2d`,
:mod:`nvp3d.model.graphed3d`; the 2D breakdown is then one ``2d`` number, module hooks do not fire inside a
replay). A parity row per dtype and batch compares the graphed run with the eager one on the same input: 2D
outputs (max |diff| over max |eager|), the dense TDF (max |diff|) and the 3D panoptic labels (share equal).

``--folder N`` runs ``nvp3d inference`` in-process (``nvp3d.inference.run.run_inference``, outputs written) on N
synthetic images (copies of the frame with a little noise) for each ``--folder-configs`` entry
(``mode:dtype:batch[:write_workers]``) and reports images/s, with the share spent in the network's forward passes. It reuses
the benchmark's model (random weights, nothing written to disk as a checkpoint).

Training-step costs (3D and 2D stages, fp32 and bf16, peak memory, profile) are measured by
``tools/bench_training.py``, which builds the same spec and network (:func:`build`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ModuleTimer:
    """Forward-hook timer of named modules (synchronising the device around each call)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, float] = {}
        self._start: dict[int, float] = {}
        self.handles = []
        self.restores: list[Callable[[], None]] = []

    def attach(self, name: str, module: torch.nn.Module) -> None:
        def pre(mod, args):
            _sync(self.device)
            self._start[id(mod)] = time.perf_counter()

        def post(mod, args, out):
            _sync(self.device)
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - self._start.pop(id(mod))

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def attach_call(self, name: str, owner: Any, attr: str) -> None:
        """Time calls of the callable attribute ``owner.<attr>`` (a graph replay has no module hooks)."""
        inner = getattr(owner, attr)

        def timed(*args: Any) -> Any:
            _sync(self.device)
            start = time.perf_counter()
            out = inner(*args)
            _sync(self.device)
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
            return out

        setattr(owner, attr, timed)
        self.restores.append(lambda: setattr(owner, attr, inner))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        while self.restores:
            self.restores.pop()()


DECODER_GROUPS = {
    "decoder.encoder": ("input_encoders", "enc0", "enc1", "enc2", "enc3", "enc4", "adapters"),
    "decoder.level64": ("dec4", "dec3", "dec2", "occupancy_64", "segm_embed_64", "query_proj_64"),
    "decoder.level128": ("dec1", "occupancy_128", "segm_embed_128", "query_proj_128"),
    "decoder.level256": ("dec0", "occupancy_256", "geometry_head", "segm_embed_256", "query_proj_256"),
}


def make_frame(out: Path, grid: int, image: tuple[int, int]) -> Path:
    from datasets3d.synth import generate

    generate(out, scenes=1, frames_per_scene=1, grid=grid, image_size=image, seed=0, check=False)
    return out


def prepare_run(args) -> torch.device:
    """``args.image`` ``"WxH"`` -> ``(w, h)``; the device of ``args.device``, with TF32 on for CUDA matmuls and
    convolutions (as ``nvp3d inference`` runs fp32 with ``inference.allow_tf32``, the default, and training with
    ``train.allow_tf32``)."""
    from nvp3d.demo.specs import parse_image_size

    args.image = parse_image_size(args.image)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def _model_of_checkpoint(spec, path: str):
    """``spec`` with the ``model`` section a trained checkpoint records (its preset, head and 3D sizes), so that
    a checkpoint of any recipe loads key-for-key; the grid must still match ``--grid``."""
    from nvp3d.config import validate_spec
    from nvp3d.config.loading import spec_to_dict
    from nvp3d.model.provenance import read_spec_record

    record = read_spec_record(path)
    if record is None:
        raise SystemExit(f"--checkpoint {path}: no nvp3d model record in it (not written by nvp3d train)")
    d = spec_to_dict(spec)
    d["model"] = dict(record["model"])
    grid = d["model"].get("frustum3d", {}).get("grid_dimensions")
    if grid is not None and int(grid) != int(spec.model.frustum3d.grid_dimensions):
        raise SystemExit(f"--checkpoint {path}: trained at grid {grid}; pass --grid {grid}")
    return validate_spec(d, source=f"bench spec with the model of {path}")


def build(args, data: Path, device: torch.device):
    from nvp3d.data.datamodule import NVP3DDataModule
    from nvp3d.demo.specs import demo_spec
    from nvp3d.model.build import build_net3d

    camera = json.loads((data / "meta" / "camera.json").read_text())
    spec = demo_spec(data, data / "runs", image_size=args.image, voxel_size=camera["voxel_size"], num_gpus=0,
                     min_instance_pixels=1, batch_size=1)
    spec.dataset.enable_3d = True
    f3 = spec.model.frustum3d
    f3.grid_dimensions = f3.frustum_dims = args.grid
    if args.checkpoint:  # the checkpoint's whole model section, its preset included
        spec = _model_of_checkpoint(spec, args.checkpoint)
    elif args.preset != spec.model.preset:
        from nvp3d.config import validate_spec
        from nvp3d.config.loading import spec_to_dict

        # the preset is switched in the dict and validated once: assigning model.preset alone would be checked
        # against the demo spec's head sizes (the ModelSpec validator refuses a mixed spec)
        d = spec_to_dict(spec)
        d["model"]["preset"] = args.preset
        for section in ("sem_seg_head", "mask_former"):
            d["model"].pop(section, None)  # let the preset's defaults apply
        spec = validate_spec(d, source="bench spec")
    spec.train.optim.lr = 1e-4
    for split in ("train", "val", "test"):
        getattr(spec.dataset, split).json_path = str(data / "meta" / "train.json")
    dm = NVP3DDataModule(spec, splits=("train",))
    dm.setup()
    torch.manual_seed(0)
    model = build_net3d(spec, dm.thing_ids, dm.stuff_ids)
    if args.checkpoint:
        from nvp3d.model.checkpoint import load_stage_weights

        for stage in ("2d", "3d"):
            print(load_stage_weights(model, args.checkpoint, stage, "--checkpoint"))
    return spec, dm, model.to(device)


def batch_of(dm, n: int, device: torch.device) -> dict:
    from datasets3d import collate_samples

    s = dm.datasets["train"][0]
    batch = collate_samples([s] * n)
    # every tensor on the device, the per-frame segment lists included, as Lightning moves a training batch
    # before the step (left on the host, the lists' copies would be counted as the criterion's by count_step_ops)
    return {k: (v.to(device) if torch.is_tensor(v) else
                [t.to(device) for t in v] if isinstance(v, list) and v and torch.is_tensor(v[0]) else v)
            for k, v in batch.items()}


def autocast_of(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def set_graphs(model, on: bool) -> None:
    """Switch the CUDA graphs of the 2D network and the 3D decoder's dense levels, as ``inference.cuda_graphs``
    does (off also drops the captures and the cached bf16 weight copies)."""
    model.enable_cuda_graphs(on)


def inference_phases(model, batch, stuff_ids) -> tuple[list[tuple[str, Callable[[], None]]], dict[str, Any]]:
    """One inference forward as named phases (2D network, lifting plane, lifting, sparse decoder, fusion) and the
    dict they fill (``out2d``, ``plane``, ``lifted``, ``out``): :func:`run_once` times them, and
    ``tools/count_step_ops.py --stage infer`` counts their ops. Run them in order, under ``no_grad``."""
    from nvp3d.model.fusion import fuse_batch

    g = model.geometry
    state: dict[str, Any] = {}
    image = batch["image"]

    def net2d() -> None:
        state["out2d"] = model.infer_2d(image)

    def plane() -> None:
        state["plane"] = model.plane(state["out2d"], image.shape[-2:])

    def lifting() -> None:
        state["lifted"] = model.lift(state["plane"], batch["intrinsic_reduced"], batch["frustum_mask"])

    def decoder() -> None:
        lifted, ms = state["lifted"]
        state["out"] = model.completion(lifted, state["plane"].queries, batch["frustum_mask"], ms_features=ms)
        state["out"]["plane"] = state["plane"]

    def fusion() -> None:
        fuse_batch(state["out"], grid_dims=g.grid_dims, truncation=g.truncation, stuff_ids=stuff_ids,
                   object_mask_threshold=model.object_mask_threshold)

    return [("2d", net2d), ("plane", plane), ("lifting", lifting), ("decoder", decoder), ("fusion", fusion)], state


def run_once(model, batch, stuff_ids, timer: ModuleTimer | None, device: torch.device, dtype,
             ranges: bool = False) -> dict[str, float]:
    """Seconds per phase of :func:`inference_phases` (device-synchronised around each), ``total`` and the
    finest level's voxel count. ``timer``: module hooks that were attached by the caller, if any. ``ranges``:
    wrap each phase (and its closing synchronisation) in a profiler range ``phase/<name>``."""
    from torch.profiler import record_function

    phases, state = inference_phases(model, batch, stuff_ids)
    t: dict[str, float] = {}
    with torch.no_grad(), autocast_of(device, dtype):
        _sync(device)
        start = time.perf_counter()
        for name, run in phases:
            t0 = time.perf_counter()
            with record_function(f"phase/{name}") if ranges else contextlib.nullcontext():
                run()
                _sync(device)
            t[name] = time.perf_counter() - t0
        t["total"] = time.perf_counter() - start
    t["voxels_256"] = float(state["out"]["geometry"].num_voxels)
    return t


def time_config(args, dm, model, device, dtype: str, bs: int, mode: str) -> dict | None:
    """One row: median unhooked ms/frame and a hooked breakdown (eager 2D modules only)."""
    try:
        batch = batch_of(dm, bs, device)
        t_first = time.perf_counter()
        first = run_once(model, batch, dm.stuff_ids, None, device, dtype)  # warm-up (and graph capture)
        first_s = time.perf_counter() - t_first
        totals = [run_once(model, batch, dm.stuff_ids, None, device, dtype) for _ in range(args.repeats)]
        timer = ModuleTimer(device)
        timer.attach("backbone", model.backbone)
        timer.attach("head", model.sem_seg_head)
        for group, names in DECODER_GROUPS.items():
            for n in names:
                m = getattr(model.completion, n, None)
                if m is not None:
                    timer.attach(group, m)
        if model.completion.dense_runner is not None:  # graphed: the whole dense part, L2..L4 encoders included
            timer.attach_call("decoder.level64", model.completion, "dense_runner")
        run_once(model, batch, dm.stuff_ids, timer, device, dtype)
        timer.times.clear()  # keep the second hooked pass (warm caches, like the unhooked repeats)
        hooked = run_once(model, batch, dm.stuff_ids, timer, device, dtype)
        timer.detach()
    except torch.cuda.OutOfMemoryError:
        print(f"{mode} {dtype} batch {bs}: out of memory")
        torch.cuda.empty_cache()
        return None
    med = {k: statistics.median(r[k] for r in totals) for k in totals[0]}
    dec_groups = {g: timer.times.get(g, 0.0) for g in DECODER_GROUPS}
    graphed = mode == "graphed" and device.type == "cuda"
    row = {"mode": mode, "dtype": dtype, "batch": bs, "ms_per_frame": 1000 * med["total"] / bs,
           "2d": 1000 * med["2d"] / bs,
           "backbone": None if graphed else 1000 * timer.times.get("backbone", 0.0) / bs,
           "head": None if graphed else 1000 * timer.times.get("head", 0.0) / bs,
           "plane": 1000 * med["plane"] / bs, "lifting": 1000 * med["lifting"] / bs,
           **{g: 1000 * v / bs for g, v in dec_groups.items()},
           "decoder.other": 1000 * max(0.0, hooked["decoder"] - sum(dec_groups.values())) / bs,
           "fusion": 1000 * med["fusion"] / bs, "voxels_256": med["voxels_256"] / bs,
           "first_call_ms": 1000 * first_s / bs, "first_call_pipeline_ms": 1000 * first["total"] / bs}
    g2 = model.net2d.graphed
    if g2 is not None:
        row["graph_level"] = g2.level if device.type == "cuda" else "off (cpu)"
        row["captures"] = g2.captures
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return row


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|, on entries finite in both (random depth heads can overflow)."""
    a, b = a.float(), b.float()
    ok = torch.isfinite(a) & torch.isfinite(b)
    if not ok.any():
        return 0.0
    return float((a[ok] - b[ok]).abs().max() / b[ok].abs().max().clamp_min(1e-12))


def outputs_of(model, batch, stuff_ids, device, dtype, eager_2d: bool) -> tuple[dict, list]:
    """2D outputs and fused 3D results; ``eager_2d`` bypasses the graphs for the 2D network."""
    from nvp3d.model.fusion import fuse_batch

    g = model.geometry
    with torch.no_grad(), autocast_of(device, dtype):
        out2d = model.net2d.forward_eager(batch["image"]) if eager_2d else model.infer_2d(batch["image"])
        p = model.plane(out2d, batch["image"].shape[-2:])
        lifted, ms = model.lift(p, batch["intrinsic_reduced"], batch["frustum_mask"])
        out = model.completion(lifted, p.queries, batch["frustum_mask"], ms_features=ms)
        out["plane"] = p
        fused = fuse_batch(out, grid_dims=g.grid_dims, truncation=g.truncation, stuff_ids=stuff_ids,
                           object_mask_threshold=model.object_mask_threshold)
    return out2d, fused


def compare(a: tuple[dict, list], b: tuple[dict, list]) -> dict[str, float]:
    """``a`` against the reference ``b``: 2D relative max diffs, dense TDF max diff, 3D panoptic share equal."""
    res = {f"rel_{k}": _max_rel(a[0][k], b[0][k]) for k in ("pred_logits", "pred_masks", "pred_depths")}
    tdf = [float((fa.tdf.float() - fb.tdf.float()).abs().max()) for fa, fb in zip(a[1], b[1], strict=True)]
    same = [float((fa.panoptic == fb.panoptic).float().mean()) for fa, fb in zip(a[1], b[1], strict=True)]
    sem = [float((fa.semantic == fb.semantic).float().mean()) for fa, fb in zip(a[1], b[1], strict=True)]
    return {**res, "tdf_max_abs": max(tdf), "panoptic3d_equal": min(same), "semantic3d_equal": min(sem)}


def parity(args, dm, model, device) -> list[dict]:
    """Graphed vs eager 2D network, same input, per dtype and batch (graphs must be on)."""
    rows = []
    for dtype in args.dtypes:
        for bs in sorted(set([1, *args.batches])):
            try:
                batch = batch_of(dm, bs, device)
                ref = outputs_of(model, batch, dm.stuff_ids, device, dtype, eager_2d=True)
                got = outputs_of(model, batch, dm.stuff_ids, device, dtype, eager_2d=False)
                row = {"parity": "graphed_vs_eager", "dtype": dtype, "batch": bs, **compare(got, ref)}
                if dtype == "bf16" and "fp32" in args.dtypes:  # context: today's bf16 vs fp32, both eager
                    ref32 = outputs_of(model, batch, dm.stuff_ids, device, "fp32", eager_2d=True)
                    rows.append({"parity": "bf16_eager_vs_fp32_eager", "dtype": dtype, "batch": bs,
                                 **compare(ref, ref32)})
                    print(json.dumps(rows[-1]), flush=True)
            except Exception as exc:  # noqa: BLE001 - a benchmark: report and go on
                traceback.print_exc()
                row = {"parity": "graphed_vs_eager", "dtype": dtype, "batch": bs, "error": repr(exc)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def bench_inference(args, spec, dm, model, device) -> list[dict]:
    rows = []
    model.eval()
    modes = ["eager", "graphed"] if args.graphs == "both" else ["graphed" if args.graphs == "on" else "eager"]
    if device.type != "cuda" and "graphed" in modes:
        print("CPU: CUDA graphs do not apply (inference.cuda_graphs is a no-op there); eager rows only")
        modes = ["eager"]
    for dtype in args.dtypes:  # before/after pairs side by side (a run cut short keeps complete pairs)
        for bs in sorted(set([1, *args.batches])):
            for mode in modes:
                set_graphs(model, mode == "graphed")
                if past_deadline(args):
                    return rows
                try:
                    row = time_config(args, dm, model, device, dtype, bs, mode)
                except Exception:  # noqa: BLE001 - e.g. a failing capture: keep the rows measured so far
                    traceback.print_exc()
                    row = None
                if row is not None:
                    rows.append(row)
                    save_json(args, "inference", rows)
    return rows


def table(rows: list[dict], cols: list[str] | None = None) -> str:
    cols = cols or ["mode", "dtype", "batch", "ms_per_frame", "2d", "backbone", "head", "plane", "lifting",
                    "decoder.encoder", "decoder.level64", "decoder.level128", "decoder.level256", "decoder.other",
                    "fusion", "voxels_256", "first_call_ms"]
    cols = cols + (["peak_mem_gb"] if rows and "peak_mem_gb" in rows[0] and "peak_mem_gb" not in cols else [])

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 0.1 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


RESULTS: dict[str, object] = {}


#: ATen ops after which the host waits for the device (a device-to-host copy is an ``aten::copy_`` / ``aten::to``)
SYNC_ATEN = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::_unique2", "aten::unique_dim",
             "aten::masked_select", "aten::is_nonzero", "aten::equal", "aten::repeat_interleave")

#: the first path component of this project's modules in a profiler stack frame
PROJECT_MODULES = ("nvp3d/", "frustum3d/", "maskformer_head/", "backbone_vggt/", "datasets3d/")


def _project_frames(stack: list[str], n: int = 3) -> str:
    """The innermost ``n`` frames of a profiler stack (``package/module.py(line): function``) in this project."""
    mine = [f for f in stack if f.startswith(PROJECT_MODULES) or "/packages/" in f]
    return " <- ".join(mine[:n]) or "(outside the packages)"


def _ops_by_source(prof, device: torch.device, top: int) -> list[str]:
    """Where the time and the waits come from: ATen ops grouped by their Python call site, the top ones by
    self device time (self CPU time off CUDA), and the synchronising ones by count."""
    grouped = [e for e in prof.key_averages(group_by_stack_n=6) if e.key.startswith("aten::")]

    def own_time(e) -> float:
        if device.type == "cuda":
            return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
        return float(e.self_cpu_time_total)

    unit = "device" if device.type == "cuda" else "CPU"
    lines = [f"ATen ops by call site, top {top} by self {unit} time (ms, calls, op, innermost project frames):"]
    for e in sorted(grouped, key=own_time, reverse=True)[:top]:
        lines.append(f"  {own_time(e) / 1000:8.3f} {e.count:5d}x {e.key}: {_project_frames(e.stack)}")
    syncs = sorted((e for e in grouped if e.key in SYNC_ATEN), key=lambda e: -e.count)
    lines.append(f"synchronising ATen ops by call site ({sum(e.count for e in syncs)} calls; device-to-host copies "
                 "are aten::copy_ / aten::to and are in the first table):")
    lines += [f"  {e.count:5d}x {e.key}: {_project_frames(e.stack)}" for e in syncs[:top]]
    return lines


def _union_ns(intervals: list[tuple[int, int]], lo: int, hi: int) -> int:
    """Length of the union of ``intervals`` clipped to ``[lo, hi)``, in ns."""
    total, end = 0, lo
    for a, b in sorted(intervals):
        a, b = max(a, end), min(b, hi)
        if b > a:
            total += b - a
            end = b
    return total


def device_busy_by_phase(prof) -> list[str]:
    """Per ``phase/<name>`` range of a profiled :func:`run_once` (each closes with a device synchronisation, so its
    device work lies inside it): wall time, the time the device was busy (union of kernel, copy and set
    intervals) and the busy share. A phase far below 100 % is bound by the host (launches, Python, waits on
    synchronising reads), one near 100 % by the device's own work."""
    from torch.autograd import DeviceType

    events = prof.profiler.kineto_results.events()
    phases = [(e.name()[len("phase/"):], e.start_ns(), e.start_ns() + e.duration_ns())
              for e in events if e.name().startswith("phase/") and e.device_type() == DeviceType.CPU]
    # device work only: kernels, copies, sets; not the GPU-side spans of the profiler ranges (user annotations)
    work = [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
            if e.device_type() == DeviceType.CUDA and not e.is_user_annotation() and not e.name().startswith("phase/")]
    if not work:
        return ["device busy per phase: no device events recorded (CPU run)"]
    lines = ["device busy per phase (wall ms, busy ms, busy %, device events):"]
    for name, lo, hi in sorted(phases, key=lambda p: p[1]):
        busy = _union_ns(work, lo, hi)
        count = sum(1 for a, b in work if a >= lo and b <= hi)
        lines.append(f"  {name:10s} {(hi - lo) / 1e6:8.2f} {busy / 1e6:8.2f} {100 * busy / max(hi - lo, 1):6.1f} % "
                     f"{count:6d}")
    return lines


def profile_frame(args, dm, model, device) -> str:
    """``--profile``: one frame (batch ``--profile-batch``, the first ``--dtypes`` entry, 2D graphed where CUDA) under
    ``torch.profiler``. Both the host's launches and waits and the GPU's own work bound the 3D part (stop 40, H100:
    96 ms of kernels in a 154 ms frame), so it prints the CUDA runtime calls counted (launches, syncs, copies), the
    top ops by self CPU and by self GPU time, and both again by Python call site (:func:`_ops_by_source`)."""
    from torch._C._profiler import _ExperimentalConfig
    from torch.profiler import ProfilerActivity, profile

    dtype = args.dtypes[0]
    set_graphs(model, device.type == "cuda")
    bs = args.profile_batch
    batch = batch_of(dm, bs, device)
    for _ in range(2):  # warm: captures, kernel-map caches, autotuning
        run_once(model, batch, dm.stuff_ids, None, device, dtype)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # verbose: without it this torch (2.11) records no Python stacks for the ATen events, only empty lists
    with profile(activities=acts, with_stack=True, experimental_config=_ExperimentalConfig(verbose=True)) as prof:
        t = run_once(model, batch, dm.stuff_ids, None, device, dtype, ranges=True)
    events = prof.key_averages()
    runtime = {e.key: e.count for e in events if e.key.startswith("cu")}  # cudaLaunchKernel, cuLaunchKernel, ...
    lines = [f"\n### profile: one frame, {dtype}, batch {bs} ({1000 * t['total']:.1f} ms under the profiler; "
             f"2D {1000 * t['2d']:.1f}, lifting {1000 * t['lifting']:.1f}, decoder {1000 * t['decoder']:.1f}, "
             f"fusion {1000 * t['fusion']:.1f})",
             "CUDA runtime calls: " + (", ".join(f"{k} {v}" for k, v in sorted(runtime.items(), key=lambda kv: -kv[1]))
                                       or "none (CPU)"),
             events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=50)]
    if device.type == "cuda":
        lines.append(events.table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=50))
    lines += device_busy_by_phase(prof)
    lines += _ops_by_source(prof, device, args.top)
    return "\n".join(lines)


def save_json(args, key: str, value) -> None:
    """Keep ``value`` under ``key`` and rewrite ``--json`` (so a run cut short still leaves its rows)."""
    RESULTS[key] = value
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=1, default=str))


def past_deadline(args) -> bool:
    if args.deadline and time.perf_counter() - args.t_start > args.deadline:
        print(f"--deadline {args.deadline} s reached: skipping the remaining measurements", flush=True)
        return True
    return False


def bench_predictor(spec, model, device, root: Path):
    """A :class:`~nvp3d.inference.predictor.Predictor` around the benchmark's model (random weights): nothing is
    written to disk as a checkpoint and loaded again (``root`` holds an empty stand-in file)."""
    import nvp3d.inference.predictor as predictor_module
    from nvp3d.inference.predictor import Predictor

    ckpt = root / "bench.pth"
    torch.save({}, ckpt)  # the Predictor wants a file; the weights are the benchmark model's own
    spec = spec.model_copy(deep=True)
    spec.inference.checkpoint = str(ckpt)
    spec.inference.num_gpus = 1 if device.type == "cuda" else 0

    def make(s):
        """A Predictor on ``model``: the module's network builder and weight loader stand in only meanwhile."""
        saved = predictor_module.build_net3d, predictor_module.load_stage_weights
        predictor_module.build_net3d = lambda *a, **k: model
        predictor_module.load_stage_weights = lambda *a, **k: "weights: the benchmark's model (random)"
        try:
            return Predictor(s, str(ckpt), device=device, say=lambda *_: None)
        finally:
            predictor_module.build_net3d, predictor_module.load_stage_weights = saved

    return spec, ckpt, make


#: the ways --stream runs its batches (bench_stream's docstring)
STREAM_MODES = ("sequential", "overlapped", "deferred")


def bench_stream(args, spec, data: Path, model, device) -> list[dict]:
    """``--stream N``: N batches through the Predictor one after another (``predict_prepared``) and as a stream
    with ``inference.overlap_2d`` (``predict_stream``: the next batch's 2D network on its own CUDA stream while
    this batch's 3D part runs; ``deferred``: also ``Predictor.defer_host_copy``, the results copied on a copy
    stream and collected one batch later), graphed, per dtype and batch; ms per frame over the whole stream
    (throughput, host copies of every result included) and whether each frame's outputs equal the sequential
    ones."""
    import numpy as np

    root = Path(tempfile.mkdtemp(prefix="bench_stream_"))
    spec, _, make = bench_predictor(spec, model, device, root)
    spec.inference.cuda_graphs = device.type == "cuda"
    spec.inference.compile_2d = bool(args.compile_2d)
    camera = json.loads((data / "meta" / "camera.json").read_text())
    fx, fy, cx, cy = camera["intrinsic"]
    k = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=np.float64)
    rgb = next((data / "data").rglob("rgb_*.png"))
    rows = []
    for dtype in args.dtypes:
        spec.inference.precision = dtype
        predictor = make(spec)
        frame = predictor.prepare(str(rgb), k)
        for bs in sorted(set([1, *args.batches])):
            if past_deadline(args):
                return rows
            stream = [([frame] * bs, None)] * args.stream
            row: dict[str, Any] = {"dtype": dtype, "batch": bs, "batches": args.stream}
            try:
                results: dict[str, list] = {}
                for rep in range(3):  # rep 0 warms (captures); the best of reps 1-2 per side
                    for mode in STREAM_MODES:
                        predictor.overlap_2d = mode != "sequential"
                        predictor.defer_host_copy = mode == "deferred"
                        _sync(device)
                        t = time.perf_counter()
                        if mode == "sequential":
                            out = [predictor.predict_prepared(p, m) for p, m in stream]
                        else:
                            out = list(predictor.predict_stream(stream))
                        _sync(device)
                        ms = 1000 * (time.perf_counter() - t) / (args.stream * bs)
                        if not rep:  # the warm-up: captures (and with --compile-2d the compilation) included
                            row["warmup_s"] = row.get("warmup_s", 0.0) + ms * args.stream * bs / 1000
                        if rep:
                            row[f"{mode}_ms"] = min(row.get(f"{mode}_ms", ms), ms)
                        results[mode] = [r for batch in out for r in batch]
                # every frame of both streamed modes against the same frame of the sequential run
                pairs = [(a, b) for mode in STREAM_MODES[1:]
                         for a, b in zip(results["sequential"], results[mode], strict=True)]
                row["speedup"] = row["sequential_ms"] / row["overlapped_ms"]
                row["speedup_deferred"] = row["sequential_ms"] / row["deferred_ms"]
                row["panoptic3d_equal"] = min(float((a.panoptic == b.panoptic).mean()) for a, b in pairs)
                row["semantic3d_equal"] = min(float((a.semantic == b.semantic).mean()) for a, b in pairs)
                row["tdf_max_abs"] = max(float(np.abs(a.geometry - b.geometry).max()) for a, b in pairs)
                row["panoptic2d_equal"] = min(float((a.panoptic_2d == b.panoptic_2d).mean()) for a, b in pairs)
            except Exception as exc:  # noqa: BLE001 - a benchmark: report and go on
                traceback.print_exc()
                row["error"] = repr(exc)
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            save_json(args, "stream", rows)
    return rows


def bench_folder(args, spec, data: Path, model, device) -> list[dict]:
    """``nvp3d inference`` (in-process) on ``--folder`` synthetic images per ``--folder-configs`` entry."""
    import importlib.util
    import shutil

    import numpy as np
    from nvp3d.inference.run import run_inference
    from nvp3d.inference.writers import OUTPUT_KINDS
    from PIL import Image

    root = Path(tempfile.mkdtemp(prefix="bench_folder_"))
    images = root / "images"
    images.mkdir()
    rgb = next((data / "data").rglob("rgb_*.png"))
    base = np.asarray(Image.open(rgb).convert("RGB")).astype(np.int16)
    rng = np.random.default_rng(0)
    for i in range(args.folder):
        noisy = np.clip(base + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(images / f"frame_{i:03d}.png")
    shutil.copy(data / "meta" / "camera.json", images / "camera.json")
    spec, _, make = bench_predictor(spec, model, device, root)
    spec.inference.images_dir = str(images)
    writes = importlib.util.find_spec("skimage") is not None
    if not writes:
        print("scikit-image missing: outputs are not written (marching cubes); images/s is forward + 2D post only")
    rows = []
    for config in args.folder_configs:
        if past_deadline(args):
            break
        config, _, kinds = config.partition("@")  # @volumes,preview: inference.outputs
        mode, dtype, bs, *rest = config.split(":")
        workers = int(rest[0]) if rest else spec.inference.write_workers
        if rest[1:] not in ([], ["processes"]):
            raise SystemExit(f"--folder-configs {config!r}: expected mode:dtype:batch[:write_workers[:processes]][@kinds]")
        processes = rest[1:] == ["processes"]
        spec.inference.batch_size = int(bs)
        spec.inference.write_workers = workers
        spec.inference.write_processes = processes
        spec.inference.precision = dtype
        spec.inference.cuda_graphs = mode == "graphed"
        spec.inference.compile_2d = bool(args.compile_2d)
        spec.inference.outputs = kinds.split(",") if kinds else list(OUTPUT_KINDS)
        try:
            predictor = make(spec)
            forward = {"s": 0.0}

            def timed(*a, _inner, forward=forward, sync=False, **k):
                t = time.perf_counter()
                out = _inner(*a, **k)
                if sync:  # finish ends with host copies anyway; start must not wait (inference.overlap_2d)
                    _sync(device)
                forward["s"] += time.perf_counter() - t
                return out

            predictor.start = functools.partial(timed, _inner=predictor.start)
            predictor.finish = functools.partial(timed, _inner=predictor.finish, sync=True)
            if not writes:
                import nvp3d.inference.reconstruction as rec_module

                rec_module.Reconstruction.save = lambda self, folder, name, outputs=None: {}
            # warm-up on a copy of the first batch's worth (graph capture, cuDNN autotune), not timed
            warm = root / "warm"
            warm.mkdir(exist_ok=True)
            for p in sorted(images.glob("*.png"))[: int(bs)]:
                shutil.copy(p, warm / p.name)
            shutil.copy(images / "camera.json", warm / "camera.json")
            wspec = spec.model_copy(deep=True)
            wspec.inference.images_dir = str(warm)
            run_inference(wspec, root / "warm_out", None, say=lambda *_: None, enable_progress_bar=False,
                          predictor=predictor)
            forward["s"] = 0.0
            out = root / f"out_{mode}_{dtype}_{bs}"
            lines: list[str] = []
            kpi = run_inference(spec, out, None, say=lines.append, enable_progress_bar=False, predictor=predictor)
            index = json.loads((out / "index.json").read_text())
            row = {"mode": mode, "dtype": dtype, "batch": int(bs), "write_workers": workers,
                   "writers": "processes" if processes else "threads", "outputs": index["outputs"],
                   "images": kpi["images"],
                   "images_per_second": kpi["images_per_second"], "seconds": index["seconds"],
                   "forward_seconds": round(forward["s"], 3),
                   "forward_images_per_second": round(kpi["images"] / forward["s"], 2) if forward["s"] else None,
                   "outputs_written": writes, "cuda_graphs": index.get("cuda_graphs"),
                   # each image's writing time in its writer (index.json): with writers busy for
                   # images * mean / write_workers seconds or more, they bound the run
                   "write_seconds_mean": round(float(np.mean([e["seconds"] for e in index["images"]])), 3),
                   "write_seconds_max": round(float(np.max([e["seconds"] for e in index["images"]])), 3)}
            print(lines[-1], flush=True)
        except Exception as exc:  # noqa: BLE001 - a benchmark: report and go on
            traceback.print_exc()
            row = {"mode": mode, "dtype": dtype, "batch": int(bs), "write_workers": workers, "error": repr(exc)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        save_json(args, "folder", rows)
    shutil.rmtree(root, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="full", choices=("full", "small", "tiny"))
    ap.add_argument("--grid", type=int, default=256)
    ap.add_argument("--image", default="320x240")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    ap.add_argument("--batches", type=int, nargs="+", default=[4])
    ap.add_argument("--graphs", choices=("both", "on", "off"), default="both",
                    help="2D network eager (off), from CUDA graphs (on) or both (before/after rows)")
    ap.add_argument("--folder", type=int, default=0, help="also time `nvp3d inference` on this many images")
    ap.add_argument("--folder-configs", nargs="+",
                    default=["graphed:bf16:4:8", "graphed:bf16:4:8:processes", "eager:fp32:1:0", "graphed:bf16:1:8"],
                    help="mode:dtype:batch[:write_workers[:processes]][@kinds] entries of the --folder runs "
                         "(eager:fp32:1:0 = before; ':processes' = inference.write_processes; '@volumes,preview' = "
                         "inference.outputs, default all)")
    ap.add_argument("--stream", type=int, default=0, help="also time this many batches through the Predictor, "
                    "one after another and overlapped (inference.overlap_2d), per dtype and batch")
    ap.add_argument("--stream-only", action="store_true", help="with --stream: skip the per-phase table and the "
                    "parity rows (a short A/B of the stream)")
    ap.add_argument("--compile-2d", action="store_true", help="--stream and --folder with inference.compile_2d "
                    "(the 2D network's parts torch.compile-d before its graph is captured)")
    ap.add_argument("--json", default="", help="write every row to this JSON file (rewritten as rows come)")
    ap.add_argument("--deadline", type=float, default=0.0, help="skip what is left after this many seconds")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="also profile one frame (batch --profile-batch, first "
                    "dtype): top ops by host time, CUDA runtime call counts, the sources of synchronising calls")
    ap.add_argument("--profile-batch", type=int, default=1, help="batch size of the --profile frame")
    ap.add_argument("--top", type=int, default=30, help="rows per --profile table")
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    args.t_start = time.perf_counter()
    device = prepare_run(args)
    w, h = args.image
    with tempfile.TemporaryDirectory() as tmp:
        data = make_frame(Path(tmp) / "data", args.grid, args.image)
        spec, dm, model = build(args, data, device)
        n3 = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n = sum(p.numel() for p in model.parameters())
        print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), preset "
              f"{spec.model.preset}, grid {args.grid}^3, image {w}x{h}, parameters {n / 1e6:.1f} M ({n3 / 1e6:.2f} M trainable)")
        save_json(args, "setup", {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                                   "preset": spec.model.preset, "grid": args.grid, "image": [w, h],
                                   "torch": torch.__version__, "parameters_m": round(n / 1e6, 1)})
        if not (args.stream and args.stream_only):
            rows = bench_inference(args, spec, dm, model, device)
            print("\nper-frame latency in ms (breakdown from a hooked pass; ms_per_frame = unhooked median; "
                  "mode eager = before inference.cuda_graphs, graphed = after)")
            print(table(rows))
            for mode in ("eager", "graphed"):
                for dtype in args.dtypes:
                    sel = [r for r in rows if r["dtype"] == dtype and r["mode"] == mode]
                    best = min(sel, key=lambda r: r["ms_per_frame"], default=None)
                    one = next((r for r in sel if r["batch"] == 1), None)
                    if best and one:
                        print(f"{mode} {dtype}: batch 1 {one['ms_per_frame']:.1f} ms/frame; best batch {best['batch']} "
                              f"{best['ms_per_frame']:.1f} ms/frame")
            if device.type == "cuda" and args.graphs != "off" and not past_deadline(args):
                set_graphs(model, True)
                par = parity(args, dm, model, device)
                save_json(args, "parity", par)
                print("\nparity (graphed vs eager on the same input; bf16 eager vs fp32 eager for context)")
                print(table(par, ["parity", "dtype", "batch", "rel_pred_logits", "rel_pred_masks", "rel_pred_depths",
                                  "tdf_max_abs", "panoptic3d_equal", "semantic3d_equal"]))
        if args.profile and not past_deadline(args):
            print(profile_frame(args, dm, model, device), flush=True)
        if args.stream and not past_deadline(args):
            st = bench_stream(args, spec, data, model, device)
            print(f"\nthe Predictor on a stream of {args.stream} batches (ms per frame, best of 2; sequential = "
                  "predict_prepared per batch, overlapped = predict_stream with inference.overlap_2d; deferred = also "
                  "defer_host_copy)")
            print(table(st, ["dtype", "batch", "sequential_ms", "overlapped_ms", "deferred_ms", "speedup",
                             "speedup_deferred", "panoptic3d_equal",
                             "semantic3d_equal", "tdf_max_abs", "panoptic2d_equal"]))
        if args.folder:
            fold = bench_folder(args, spec, data, model, device)
            print(f"\n`nvp3d inference` on {args.folder} images")
            print(table(fold, ["mode", "dtype", "batch", "write_workers", "writers", "images_per_second",
                               "forward_images_per_second", "seconds", "forward_seconds", "outputs_written",
                               "cuda_graphs"]))

if __name__ == "__main__":
    main()
