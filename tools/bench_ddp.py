"""Multi-GPU (DDP over NCCL) training of both stages through ``nvp3d train``, measured against one GPU.

Run on a machine with 2 GPUs (the coordinator runs it on 2 x H200); each phase fits one device call:

    NCCL_NVLS_ENABLE=0 python tools/bench_ddp.py --work /tmp/ddp --out $OUT --phase 2d
    NCCL_NVLS_ENABLE=0 python tools/bench_ddp.py --work /tmp/ddp --out $OUT --phase 3d
    python tools/bench_ddp.py --work /tmp/ddp --out /tmp/ddp_out --phase all --preset tiny --grid 32 \\
        --image 64x48 --frames 8 --steps 2 --cpu                                  # CPU smoke run (gloo)

What it does (full preset, 320 x 240 images, 256^3 grid unless told otherwise):

1. generates ``--frames`` synthetic 3D-FRONT-format frames on this host (``datasets3d.synth``, one process
   per chunk), all of them in the train split, the first ``--eval-frames`` also in the test split;
2. phase ``2d``: ``nvp3d train`` (2D stage) three times, ``--epochs`` epochs of ``--steps`` steps each:
   1 GPU at batch 1 and 1 GPU at batch 2 (side by side, one GPU each), then 2 GPUs at batch 1 per GPU
   (global batch 2, the same frames per step as the 1-GPU batch-2 run);
3. phase ``3d``: the same three runs of the 3D stage (on top of the 1-GPU batch-2 2D checkpoint, or random
   2D weights when it is not there), then ``nvp3d evaluate`` of the 1-GPU batch-1 3D checkpoint on 1 GPU
   and on 2 GPUs over the same ``--eval-frames`` test frames.

Per run it reports: exit code, wall time, samples/s of the last epoch (``samples_per_s`` of the progress log:
global batch / median step time, so the epoch-end checkpoint is not counted), the peak allocated memory (``gpu_mem_peak_gib``, max over ranks) and the largest
``nvidia-smi`` memory.used per GPU, the per-step ``train_loss`` (the mean over ranks), the STARTED/SUCCESS
record counts in status.json, the checkpoint files and the "finished successfully" lines on stdout (one
each: only rank 0 writes). Then it compares the 2-GPU loss curve with the 1-GPU batch-2 one and the PRQ
statistics of the two evaluations. Results: ``<out>/ddp_<phase>.json`` and ``<out>/ddp_<phase>.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ data
def _generate_chunk(args: tuple[str, int, int, int, tuple[int, int]]) -> dict:
    from datasets3d.synth import generate

    out, seed, frames, grid, image = args
    return generate(out, scenes=1, frames_per_scene=frames, grid=grid, image_size=image, seed=seed, check=False)


def make_data(root: Path, frames: int, eval_frames: int, grid: int, image: tuple[int, int], chunks: int) -> dict:
    """``frames`` frames in ``chunks`` scenes generated in parallel, merged into one dataset root."""
    meta = root / "meta"
    if (meta / "train.json").is_file() and len(json.loads((meta / "train.json").read_text())) >= frames:
        return json.loads((meta / "camera.json").read_text())
    chunks = max(1, min(chunks, frames))
    per = [frames // chunks + (1 if i < frames % chunks else 0) for i in range(chunks)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(chunks) as pool:
        list(pool.map(_generate_chunk, [(str(root / f"chunk{i}"), 100 + i, n, grid, image) for i, n in enumerate(per)]))
    (root / "data").mkdir(parents=True, exist_ok=True)
    meta.mkdir(exist_ok=True)
    entries = []
    for i in range(chunks):
        chunk = root / f"chunk{i}"
        for scene in sorted((chunk / "data").iterdir()):
            link = root / "data" / scene.name
            if not link.exists():
                link.symlink_to(scene.resolve())
        for name in ("train", "val", "test"):
            entries += json.loads((chunk / "meta" / f"{name}.json").read_text())
    for name in ("frustum_mask.npz", "colormap.json", "camera.json"):
        shutil.copy(root / "chunk0" / "meta" / name, meta / name)
    unique = {(e["scene_id"], e["image_id"]): e for e in entries}  # a 1-scene chunk lists it in every split
    entries = [unique[k] for k in sorted(unique)]
    (meta / "train.json").write_text(json.dumps(entries))
    (meta / "val.json").write_text(json.dumps(entries[:eval_frames]))
    (meta / "test.json").write_text(json.dumps(entries[:eval_frames]))
    print(f"data: {len(entries)} frames at {grid}^3 / {image[0]}x{image[1]} in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return json.loads((meta / "camera.json").read_text())


# ------------------------------------------------------------------------------------------------ specs
def spec_2d(args: argparse.Namespace, data: Path, camera: dict, results: Path, gpus: int, batch: int) -> Any:
    from nvp3d.config.loading import validate_spec
    from nvp3d.demo.specs import demo_spec_dict

    w, h = args.image
    d = demo_spec_dict(data, results, image_size=(w, h), voxel_size=camera["voxel_size"], epochs=args.epochs,
                       batch_size=batch, lr=1e-4, num_gpus=gpus,
                       min_instance_pixels=args.min_instance_pixels, checkpoint_interval=args.epochs,
                       num_workers=args.workers)
    d["model"]["preset"] = args.preset
    d["train"].update(iters_per_epoch=args.steps, validation_interval=args.epochs + 1, precision=args.precision)
    d["evaluate"] = {"num_gpus": gpus}
    return validate_spec(d, source="bench_ddp")


def spec_3d(args: argparse.Namespace, s2: Any, checkpoint_2d: Path, results: Path, gpus: int, batch: int) -> Any:
    from nvp3d.demo.specs import spec_3d_from_2d

    s3 = spec_3d_from_2d(s2, checkpoint_2d, grid=args.grid, epochs=args.epochs, unet_features=args.unet_features)
    s3.results_dir = str(results)
    s3.dataset.train.batch_size = batch
    s3.dataset.test.batch_size = 1
    s3.train.validation_interval = args.epochs + 1
    s3.train.checkpoint_interval = args.epochs
    s3.train.iters_per_epoch = args.steps
    s3.train.num_gpus = gpus
    s3.evaluate.num_gpus = gpus
    return s3


def random_checkpoint_2d(s2: Any, path: Path) -> Path:
    """Random 2D weights of the preset (the 3D phase's fallback when the 2D phase did not run on this host)."""
    import torch
    from nvp3d.model.build import build_net2d

    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_net2d(s2).state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------------ runs
class GpuMemoryPoll:
    """Largest ``nvidia-smi`` memory.used (MiB) per GPU while a run is in flight."""

    def __init__(self) -> None:
        self.peak: dict[int, int] = {}
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> GpuMemoryPoll:
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits", "-lms", "250"],
                stdout=subprocess.PIPE, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                idx, used = (int(x) for x in line.strip().split(","))
            except ValueError:
                continue
            self.peak[idx] = max(self.peak.get(idx, 0), used)

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def launch(action: str, spec: Any, results: Path, visible: str | None, cpu: bool) -> dict[str, Any]:
    """Start ``python -m nvp3d.cli <action> -e spec.yaml`` (its own results dir); returns the handle."""
    from nvp3d.config import dump_spec

    results.mkdir(parents=True, exist_ok=True)
    spec = spec.model_copy(deep=True)
    getattr(spec, action).results_dir = str(results)
    spec_path = results.parent / f"{results.name}.yaml"
    dump_spec(spec, spec_path)
    env = dict(os.environ)
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "RANK"):
        env.pop(key, None)
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env["PYTHONUNBUFFERED"] = "1"
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["OMP_NUM_THREADS"] = "1"
    elif visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    log = (results.parent / f"{results.name}.log").open("w")
    cmd = [sys.executable, "-m", "nvp3d.cli", action, "-e", str(spec_path)]
    return {"proc": subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(results.parent)),
            "log": log, "results": results, "t0": time.perf_counter(), "action": action}


def finish(handle: dict[str, Any], gpus: int, batch: int, visible: str | None, mem: dict[int, int]) -> dict:
    """Wait for a launched run and collect what it wrote."""
    rc = handle["proc"].wait()
    handle["log"].close()
    wall = time.perf_counter() - handle["t0"]
    results: Path = handle["results"]
    text = (results.parent / f"{results.name}.log").read_text(errors="replace")
    records = [json.loads(line) for line in (results / "status.json").read_text().splitlines() if line.strip()] \
        if (results / "status.json").is_file() else []
    epochs = [r for r in records if "epoch" in r]
    out: dict[str, Any] = {
        "name": results.name, "action": handle["action"], "gpus": gpus, "batch_per_gpu": batch,
        "global_batch": gpus * batch, "rc": rc, "wall_s": round(wall, 1),
        "status_counts": {s: sum(r["status"] == s for r in records) for s in ("STARTED", "RUNNING", "SUCCESS",
                                                                              "FAILURE")},
        "final_status": records[-1]["status"] if records else None,
        "finished_lines": text.count("finished successfully"),
        "checkpoints": sorted(p.name for p in results.glob("*.pth")),
        "stray_files": sorted(p.name for p in results.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"),
        "epoch_records": len(epochs),
    }
    if rc != 0:
        out["log_tail"] = text[-3000:]
    if epochs:
        out["last_epoch_s"] = _seconds(epochs[-1]["time_per_epoch"])  # includes the epoch-end checkpoint
    curve, epoch_rows = read_metrics(results)
    out["train_loss_steps"] = curve
    peaks = [r["gpu_mem_peak_gib"] for r in epoch_rows if "gpu_mem_peak_gib" in r]
    out["gpu_mem_peak_gib"] = round(max(peaks), 2) if peaks else None
    timed = [r for r in epoch_rows if "samples_per_s" in r]
    if timed:  # the last epoch's median step (warm: compilation and caches happen in the first)
        out["samples_per_s"] = round(timed[-1]["samples_per_s"], 3)
        out["time_per_step_s"] = round(timed[-1]["step_time_s"], 3)
    ids = [int(x) for x in visible.split(",")] if visible else list(range(gpus))
    out["nvidia_smi_peak_mib"] = {str(i): mem.get(i) for i in ids} if mem else {}
    metrics_3d = results / "metrics_3d.json"
    if metrics_3d.is_file():
        m = json.loads(metrics_3d.read_text())
        out["kpi"] = m["kpi"]
        out["stats"] = m["stats"]["rows"]
        out["frames"] = m["frames"]
    return out


def _seconds(hms: str) -> float:
    h, m, s = hms.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def read_metrics(results: Path) -> tuple[list[float], list[dict[str, float]]]:
    """Per-step ``train_loss_step`` and the per-epoch monitor rows (``gpu_mem_peak_gib``, ``samples_per_s``,
    ``step_time_s``) from the CSV progress log."""
    curve: list[float] = []
    rows: list[dict[str, float]] = []
    for path in sorted(results.glob("lightning_logs/version_*/metrics.csv")):
        with path.open() as fh:
            for row in csv.DictReader(fh):
                if row.get("train_loss_step"):
                    curve.append(float(row["train_loss_step"]))
                epoch_values = {k: float(row[k]) for k in ("gpu_mem_peak_gib", "samples_per_s", "step_time_s")
                                if row.get(k)}
                if epoch_values:
                    rows.append(epoch_values)
    return curve, rows


def run_group(jobs: list[tuple[str, Any, Path, str | None, int, int]], cpu: bool) -> list[dict]:
    """Run ``(action, spec, results, visible GPUs, gpus, batch)`` jobs side by side; collect each."""
    with GpuMemoryPoll() as poll:
        handles = [(launch(a, s, r, v, cpu), g, b, v) for a, s, r, v, g, b in jobs]
        outs = [finish(h, g, b, v, poll.peak) for h, g, b, v in handles]
    for o in outs:
        print(f"{o['name']}: rc {o['rc']} wall {o['wall_s']} s, samples/s {o.get('samples_per_s')}, "
              f"peak {o.get('gpu_mem_peak_gib')} GiB, smi {o.get('nvidia_smi_peak_mib')}", flush=True)
    return outs


def compare_curves(a: list[float], b: list[float]) -> dict[str, Any]:
    n = min(len(a), len(b))
    if n == 0:
        return {"steps": 0}
    diffs = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a[:n], b[:n], strict=True)]
    return {"steps": n, "first_rel_diff": diffs[0], "max_rel_diff": max(diffs),
            "mean_rel_diff": sum(diffs) / n, "mean_a": sum(a[:n]) / n, "mean_b": sum(b[:n]) / n}


def compare_eval(one: dict, two: dict) -> dict[str, Any]:
    if "stats" not in one or "stats" not in two:
        return {"compared": False}
    diff = max((abs(x - y) for r1, r2 in zip(one["stats"], two["stats"], strict=True)
                for x, y in zip(r1, r2, strict=True)), default=0.0)
    counts_equal = all(r1[1:] == r2[1:] for r1, r2 in zip(one["stats"], two["stats"], strict=True))
    kpi_diff = {k: abs(one["kpi"][k] - two["kpi"][k]) for k in ("PRQ", "RSQ", "RRQ")
                if isinstance(one["kpi"].get(k), float) and math.isfinite(one["kpi"][k])}
    return {"compared": True, "frames": [one.get("frames"), two.get("frames")], "max_stats_abs_diff": diff,
            "counts_equal": counts_equal, "kpi_1gpu": {k: one["kpi"][k] for k in ("PRQ", "RSQ", "RRQ")},
            "kpi_2gpu": {k: two["kpi"][k] for k in ("PRQ", "RSQ", "RRQ")}, "kpi_abs_diff": kpi_diff}


# ------------------------------------------------------------------------------------------------ report
def table(runs: list[dict]) -> str:
    lines = ["| run | GPUs | batch/GPU | global batch | samples/s | s/step | peak alloc GiB (max over ranks) | "
             "nvidia-smi peak MiB per GPU | wall s | rc |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['name']} | {r['gpus']} | {r['batch_per_gpu']} | {r['global_batch']} | "
                     f"{r.get('samples_per_s')} | {r.get('time_per_step_s')} | {r.get('gpu_mem_peak_gib')} | "
                     f"{r.get('nvidia_smi_peak_mib')} | {r['wall_s']} | {r['rc']} |")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import torch

    env = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "python": sys.version.split()[0],
           "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE")}
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["nccl"] = ".".join(str(x) for x in torch.cuda.nccl.version())
    return env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="data and run folders (kept between phases)")
    p.add_argument("--out", type=Path, required=True, help="where the JSON and markdown results go")
    p.add_argument("--phase", choices=("2d", "3d", "all"), default="all")
    p.add_argument("--preset", default="full")
    p.add_argument("--grid", type=int, default=256)
    p.add_argument("--image", type=lambda s: tuple(int(x) for x in s.split("x")), default=(320, 240))
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--eval-frames", type=int, default=5)
    p.add_argument("--steps", type=int, default=6, help="steps per epoch (global batch 2 for the compared runs)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--unet-features", type=int, default=16)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--min-instance-pixels", type=int, default=200)
    p.add_argument("--chunks", type=int, default=8, help="parallel data generation processes")
    p.add_argument("--cpu", action="store_true", help="CPU processes (gloo) instead of GPUs: a smoke run")
    args = p.parse_args()
    if args.frames < 2 * args.steps:
        p.error(f"--frames {args.frames} < 2 x --steps {args.steps}: the global-batch-2 runs need that many")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.work / "data"
    camera = make_data(data, args.frames, args.eval_frames, args.grid, args.image, args.chunks)
    runs = args.work / "runs"
    s2 = {key: spec_2d(args, data, camera, runs / f"2d_{key}", g, b)
          for key, (g, b) in {"1gpu_bs1": (1, 1), "1gpu_bs2": (1, 2), "2gpu_bs1": (2, 1)}.items()}
    phases = ["2d", "3d"] if args.phase == "all" else [args.phase]
    side = (None, None) if args.cpu else ("0", "1")
    for phase in phases:
        report: dict[str, Any] = {"phase": phase, "environment": environment(), "args": {
            k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
        t0 = time.perf_counter()
        if phase == "2d":
            one = run_group([("train", s2["1gpu_bs1"], runs / "2d_1gpu_bs1", side[0], 1, 1),
                             ("train", s2["1gpu_bs2"], runs / "2d_1gpu_bs2", side[1], 1, 2)], args.cpu)
            two = run_group([("train", s2["2gpu_bs1"], runs / "2d_2gpu_bs1", None if args.cpu else "0,1", 2, 1)],
                            args.cpu)
            report["runs"] = one + two
            report["loss_curve_2gpu_vs_1gpu_bs2"] = compare_curves(one[1]["train_loss_steps"], two[0]["train_loss_steps"])
            for name in ("2d_1gpu_bs1", "2d_2gpu_bs1"):  # keep the disk for the 3D phase: 2D checkpoints are large
                for ckpt in (runs / name).glob("*.pth"):
                    ckpt.unlink()
        else:
            ckpt2d = runs / "2d_1gpu_bs2" / "panoptic_recon_3d_model_latest.pth"
            if not ckpt2d.is_file():
                ckpt2d = random_checkpoint_2d(s2["1gpu_bs2"], args.work / "random_2d.pth")
                report["checkpoint_2d"] = "random 2D weights (the 2D phase's checkpoint was not on this host)"
            else:
                report["checkpoint_2d"] = str(ckpt2d)
            s3 = {key: spec_3d(args, s2["1gpu_bs1"], ckpt2d, runs / f"3d_{key}", g, b)
                  for key, (g, b) in {"1gpu_bs1": (1, 1), "1gpu_bs2": (1, 2), "2gpu_bs1": (2, 1)}.items()}
            one = run_group([("train", s3["1gpu_bs1"], runs / "3d_1gpu_bs1", side[0], 1, 1),
                             ("train", s3["1gpu_bs2"], runs / "3d_1gpu_bs2", side[1], 1, 2)], args.cpu)
            two = run_group([("train", s3["2gpu_bs1"], runs / "3d_2gpu_bs1", None if args.cpu else "0,1", 2, 1)],
                            args.cpu)
            report["loss_curve_2gpu_vs_1gpu_bs2"] = compare_curves(one[1]["train_loss_steps"], two[0]["train_loss_steps"])
            ckpt3d = runs / "3d_1gpu_bs1" / "nvpanoptix3d_model_latest.pth"
            evals = []
            for gpus in (1, 2):
                se = s3["1gpu_bs1"].model_copy(deep=True)
                se.evaluate.checkpoint = str(ckpt3d)
                se.evaluate.num_gpus = gpus
                se.evaluate.gpu_ids = list(range(gpus))
                visible = None if args.cpu else ("0" if gpus == 1 else "0,1")
                evals += run_group([("evaluate", se, runs / f"eval3d_{gpus}gpu", visible, gpus, 1)], args.cpu)
            report["runs"] = one + two + evals
            report["prq_2gpu_vs_1gpu"] = compare_eval(evals[0], evals[1])
        report["phase_seconds"] = round(time.perf_counter() - t0, 1)
        (args.out / f"ddp_{phase}.json").write_text(json.dumps(report, indent=1))
        md = [f"## phase {phase}", table(report["runs"]), "",
              "loss curve 2 GPUs x batch 1 vs 1 GPU x batch 2: " + json.dumps(report["loss_curve_2gpu_vs_1gpu_bs2"])]
        if "prq_2gpu_vs_1gpu" in report:
            md.append("evaluate 2 GPUs vs 1 GPU: " + json.dumps(report["prq_2gpu_vs_1gpu"]))
        (args.out / f"ddp_{phase}.md").write_text("\n".join(md) + "\n")
        print("\n".join(md), flush=True)


if __name__ == "__main__":
    main()
