"""Benchmark datasets3d: synthetic frame generation and DataLoader throughput at the released 256^3 size.

Generates (or reuses) a synthetic set at grid 256 / 320x240 in the exact 3D-FRONT format, then measures

* generation time per frame (wall and CPU),
* single-process sample time split into file reading and target building,
* DataLoader throughput (frames/s) with ``--workers`` worker processes (default 2), batch size 1,
  for 2D-only, ``enable_3d`` and ``enable_3d + eval_targets`` samples.

Prints a Markdown table. CPU only (no GPU needed); run on an otherwise idle machine for honest numbers:

    uv run --frozen --no-sync python tools/bench_datasets.py                      # 8 frames, 2 workers
    uv run --frozen --no-sync python tools/bench_datasets.py --data /tmp/synth256 --frames 16 --workers 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import time
from pathlib import Path

import torch
from datasets3d import DatasetConfig, PanopticReconstructionDataset, collate_samples
from datasets3d.sample import build_sample
from datasets3d.synth import generate
from torch.utils.data import DataLoader


def ensure_data(root: Path, frames: int, seed: int) -> dict | None:
    """Generate ``frames`` frames (one scene per 4 frames) unless ``root`` already holds a set."""
    if (root / "meta" / "train.json").is_file():
        return None
    scenes = max(1, frames // 4)
    return generate(root, scenes=scenes, frames_per_scene=max(1, frames // scenes), grid=256,
                    image_size=(320, 240), seed=seed)


def single_process(ds: PanopticReconstructionDataset, n: int) -> dict:
    """Mean seconds (wall and CPU) per sample for reading and for building targets, in this process."""
    read_w = build_w = read_c = build_c = 0.0
    for i in range(n):
        t, c = time.perf_counter(), time.process_time()
        frame = ds.read_frame(i % len(ds), reuse_buffers=True)
        t1, c1 = time.perf_counter(), time.process_time()
        build_sample(frame, ds.config, ds.labels, i)
        read_w += t1 - t
        read_c += c1 - c
        build_w += time.perf_counter() - t1
        build_c += time.process_time() - c1
    return {"read_s": read_w / n, "build_s": build_w / n, "read_cpu_s": read_c / n, "build_cpu_s": build_c / n}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def loader_throughput(ds: PanopticReconstructionDataset, workers: int, samples: int) -> tuple[float, float]:
    """(measured frames/s, CPU seconds per frame) through a DataLoader (batch 1, ``workers`` processes).

    CPU per frame sums the workers' CPU (collected when they exit) and the main process's CPU over the
    whole run divided by the frames loaded; on an idle machine with ``workers`` free cores the loader
    cannot be faster than about ``workers / cpu_per_frame`` frames/s, nor much slower.
    """
    loader = DataLoader(ds, batch_size=1, shuffle=False, num_workers=workers, collate_fn=collate_samples,
                        persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None)
    warmup = 2
    seen = 0
    t0 = None
    child0, main0 = _children_cpu(), time.process_time()
    while seen < samples + warmup:
        for _batch in loader:
            seen += 1
            if seen == warmup:
                t0 = time.perf_counter()
            if seen >= samples + warmup:
                break
    assert t0 is not None
    fps = samples / (time.perf_counter() - t0)
    main_cpu = time.process_time() - main0
    del loader, _batch  # joins the persistent workers so that their CPU time is accounted
    gc.collect()
    time.sleep(0.5)
    cpu = (_children_cpu() - child0) + main_cpu
    loaded = seen + (2 * workers if workers else 0)  # prefetched frames were loaded too
    return fps, cpu / loaded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/datasets3d_bench_256", help="synthetic set (generated if absent)")
    p.add_argument("--frames", type=int, default=8, help="frames to generate")
    p.add_argument("--samples", type=int, default=16, help="samples timed per loader run (after 2 warm-up)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1, like workers)")
    p.add_argument("--repeat", type=int, default=1, help="loader runs per config; best is reported")
    p.add_argument("--configs", default="", help="comma list of: '2D + mp_occ', 'enable_3d', "
                   "'enable_3d + eval_targets' (default all)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.data)
    summary = ensure_data(root, args.frames, args.seed)
    rows = []
    if summary is not None:
        rows.append(("generate 256^3 / 320x240 frame", f"{summary['seconds_per_frame']:.2f} s wall, "
                     f"{summary['cpu_seconds_per_frame']:.2f} s CPU; geometry checks: df<1.5 "
                     f"{summary['min_frac_df_below_1.5']:.4f} (min), 2D/3D classes "
                     f"{summary['min_semantic_agreement']:.4f} (min)"))
    configs = {
        "2D + mp_occ": dict(enable_3d=False),
        "enable_3d": dict(enable_3d=True),
        "enable_3d + eval_targets": dict(enable_3d=True, eval_targets=True),
    }
    wanted = [c.strip() for c in args.configs.split(",")] if args.configs else list(configs)
    for name in wanted:
        kw = configs[name]
        ds = PanopticReconstructionDataset(DatasetConfig(name="synthetic", root=root, json_path="meta/train.json",
                                                         **kw))
        sp = single_process(ds, min(4, len(ds)))
        runs = [loader_throughput(ds, args.workers, args.samples) for _ in range(args.repeat)]
        fps = max(r[0] for r in runs)
        cpu = min(r[1] for r in runs)  # least disturbed run: CPU time is inflated by other load too
        rows.append((f"{name}: read / build per sample (1 process)",
                     f"{sp['read_s']:.3f} / {sp['build_s']:.3f} s wall, "
                     f"{sp['read_cpu_s']:.3f} / {sp['build_cpu_s']:.3f} s CPU"))
        rows.append((f"{name}: DataLoader {args.workers} workers", f"**{fps:.2f} frames/s** measured; "
                     f"{cpu:.3f} CPU s/frame in total -> ~{args.workers / cpu:.1f} frames/s on {args.workers} "
                     "free cores"))
    print(f"\n### datasets3d throughput ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"torch threads {args.threads})\n")
    print("| measurement | result |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    print()
    print(json.dumps({k: v for k, v in rows}, indent=1))


if __name__ == "__main__":
    main()
