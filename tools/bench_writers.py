"""Benchmark the output writers of ``nvp3d inference`` (CPU only): what one image's files cost to write.

A device run of ``tools/bench_inference.py --folder`` showed the writers, not the network, bound
``nvp3d inference``: 0.46 images/s against about 4 images/s of forward passes. This tool builds one
reconstruction of the released size (a 256^3 room with furniture-sized boxes and spheres, 320x240 image; no
model, no GPU) and times each part of ``save_reconstruction``: the 2D overlays, the ``_panoptic3d.npz``, the
marching-cubes mesh, the PLY and the preview PNG, plus the whole call, as the median of ``--repeats``, and the
images/s of ``--workers`` threads saving at once (``inference.write_workers``; a part that holds the GIL does not
get faster with more of them: the preview's former per-triangle Pillow loop did not).

``--launcher OPS``: how much one writer slows the thread that launches the GPU work. A device run showed the
forward passes of ``nvp3d inference`` slowing from 4 to 1.75 images/s while 8 write threads ran. The proxy for
the launching thread is a loop of ``OPS`` one-element torch additions (interpreter and dispatcher work, as a
kernel launch is), timed alone, beside one writer *thread* saving without pause, and beside one writer
*process* doing the same. On a machine with a free core for each, a slowdown beside the thread and not beside
the process is the writer's hold on the GIL; a slowdown beside both is CPU or memory contention.

    uv run --frozen --no-sync python tools/bench_writers.py --repeats 3
    uv run --frozen --no-sync python tools/bench_writers.py --outputs volumes volumes,preview   # inference.outputs
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_reconstruction(grid: int = 256, size: tuple[int, int] = (320, 240), seed: int = 0):
    """A :class:`~nvp3d.inference.reconstruction.Reconstruction` of a room: floor and two walls (stuff) and
    twelve boxes and spheres (things), TDF in voxels clipped at the truncation, labels on the surface band."""
    from nvp3d.inference.reconstruction import Reconstruction

    rng = np.random.default_rng(seed)
    trunc = 3.0
    idx = np.arange(grid, dtype=np.float32)
    x, y, z = idx[:, None, None], idx[None, :, None], idx[None, None, :]
    floor_y, wall_z, wall_x = 0.8 * grid, 0.9 * grid, 0.1 * grid
    dist = {10: np.abs(y - floor_y) + 0 * x + 0 * z, 11: np.abs(z - wall_z) + 0 * x + 0 * y,
            12: np.abs(x - wall_x) + 0 * y + 0 * z}
    for k in range(12):
        c = rng.uniform(0.25 * grid, 0.75 * grid, 3)
        r = rng.uniform(0.04 * grid, 0.1 * grid)
        if k % 2:
            d = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) - r
        else:
            d = np.maximum(np.maximum(np.abs(x - c[0]), np.abs(y - c[1])), np.abs(z - c[2])) - r
        dist[100 + k] = np.abs(d)
    ids = list(dist)
    geometry = np.full((grid,) * 3, trunc, np.float32)
    panoptic = np.zeros((grid,) * 3, np.int32)
    for sid in ids:
        d = np.broadcast_to(dist[sid], geometry.shape)
        closer = d < geometry
        geometry[closer] = d[closer]
        panoptic[closer & (d < 1.5)] = sid
    mapping = {sid: (1 + sid % 9 if sid >= 100 else sid) for sid in ids}
    semantic = np.zeros_like(panoptic)
    for sid, cls in mapping.items():
        semantic[panoptic == sid] = cls
    classes = {c: (f"class{c}", c < 10) for c in range(1, 13)}
    colors = np.array([[0, 0, 0]] + [[(37 * c) % 256, (91 * c) % 256, (173 * c) % 256] for c in range(1, 13)],
                      np.uint8)
    w, h = size
    plane = (w // 2, h // 2)
    seg2d = rng.integers(0, 4, (plane[1], plane[0])).astype(np.int32)
    meta = {"grid_dims": [grid] * 3, "voxel_size": 0.03, "depth_range": [0.4, 6.0], "truncation": trunc,
            "iso_value": 1.0, "plane_intrinsic": np.eye(4), "plane_size": list(plane), "image_size": [w, h],
            "grid_to_camera": np.diag([0.03, 0.03, 0.03, 1.0])}
    return Reconstruction(
        image=rng.integers(0, 255, (h, w, 3), dtype=np.uint8), depth=np.full((plane[1], plane[0]), 2.0, np.float32),
        panoptic_2d=seg2d, segments_2d=[{"id": i, "category_id": i + 9, "isthing": False} for i in range(1, 4)],
        semantic_2d=seg2d, geometry=geometry, semantic=semantic, panoptic=panoptic, mapping=mapping,
        frustum_mask=np.ones((grid,) * 3, bool), classes=classes, colors=colors, meta=meta)


def time_parts(rec, out: Path, repeats: int, subsets: list[str] = ()) -> dict[str, float]:
    """Median seconds of each writer part, of the whole ``save_reconstruction`` and of it with each of
    ``subsets`` (comma-separated ``inference.outputs`` kinds) only."""
    from nvp3d.inference.preview import render_preview
    from nvp3d.inference.writers import save_reconstruction, write_npz, write_ply

    mesh = rec.to_mesh()
    parts = {
        "overlays": lambda: rec.overlays(),
        "npz": lambda: write_npz(out / "v_panoptic3d.npz", rec.arrays()),
        "mesh": lambda: rec.to_mesh(),
        "ply": lambda: write_ply(out / "v.ply", mesh.vertices, mesh.faces, mesh.colors),
        "preview": lambda: render_preview(mesh),
        "save_reconstruction": lambda: save_reconstruction(rec, out, "all"),
        **{f"save_reconstruction[{kinds}]": (lambda kinds=kinds: save_reconstruction(rec, out, "sub", kinds.split(",")))
           for kinds in subsets},
    }
    times: dict[str, float] = {"faces": float(mesh.num_faces)}
    for name, fn in parts.items():
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t)
        times[name] = statistics.median(runs)
    times["npz_mb"] = (out / "v_panoptic3d.npz").stat().st_size / 2**20
    return times


def threaded_images_per_second(rec, out: Path, workers: int, images: int) -> float:
    """Images/s of ``images`` whole saves on ``workers`` threads (the ``nvp3d inference`` write pool)."""
    from concurrent.futures import ThreadPoolExecutor

    from nvp3d.inference.writers import save_reconstruction

    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda i: save_reconstruction(rec, out, f"t{i}"), range(images)))
    return images / (time.perf_counter() - t)


def launcher_seconds(ops: int) -> float:
    """Seconds of ``ops`` one-element torch additions in this thread (the launching thread's proxy)."""
    import torch

    a = torch.zeros(1)
    t = time.perf_counter()
    for _ in range(ops):
        a = a + 1
    return time.perf_counter() - t


def _save_until(grid: int, out: str, ready, stop) -> None:
    """A writer (thread or process): build the reconstruction, signal ``ready``, save it until ``stop`` is set."""
    from nvp3d.inference.writers import save_reconstruction

    rec = synthetic_reconstruction(grid)
    ready.set()
    i = 0
    while not stop.is_set():
        save_reconstruction(rec, Path(out), f"w{i % 2}")
        i += 1


def launcher_slowdown(out: Path, grid: int, ops: int, repeats: int) -> dict[str, float]:
    """Median launcher-loop seconds alone, beside one writer thread and beside one writer process."""
    import multiprocessing
    import threading

    import torch

    torch.set_num_threads(1)
    launcher_seconds(ops)  # warm-up
    row = {"launcher_alone_s": statistics.median(launcher_seconds(ops) for _ in range(repeats))}
    spawn = multiprocessing.get_context("spawn")
    for kind, start, event in (("thread", threading.Thread, threading.Event),
                               ("process", spawn.Process, spawn.Event)):
        ready, stop = event(), event()
        writer = start(target=_save_until, args=(grid, str(out / kind), ready, stop), daemon=True)
        (out / kind).mkdir(exist_ok=True)
        writer.start()
        try:
            if not ready.wait(300):
                raise RuntimeError(f"bench_writers: the writer {kind} did not start within 300 s")
            time.sleep(0.2)
            row[f"launcher_beside_{kind}_s"] = statistics.median(launcher_seconds(ops) for _ in range(repeats))
        finally:
            stop.set()
            writer.join(120)
    row["slowdown_thread"] = row["launcher_beside_thread_s"] / row["launcher_alone_s"]
    row["slowdown_process"] = row["launcher_beside_process_s"] / row["launcher_alone_s"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="threads saving at once (0: skip)")
    ap.add_argument("--launcher", type=int, default=0, metavar="OPS",
                    help="also time a launching thread's proxy loop of OPS torch ops beside a writer (0: skip)")
    ap.add_argument("--outputs", nargs="*", default=[], metavar="KINDS",
                    help="also time save_reconstruction writing only these inference.outputs kinds, one row per "
                         "comma-separated list (e.g. volumes volumes,preview)")
    ap.add_argument("--json", default="", help="also write the row here")
    args = ap.parse_args(argv)
    rec = synthetic_reconstruction(args.grid)
    with tempfile.TemporaryDirectory() as tmp:
        row = time_parts(rec, Path(tmp), args.repeats, args.outputs)
        if args.workers:
            row[f"images_per_s_{args.workers}_threads"] = threaded_images_per_second(
                rec, Path(tmp), args.workers, 3 * args.workers)
        if args.launcher:
            row.update(launcher_slowdown(Path(tmp), args.grid, args.launcher, args.repeats))
    print("| part | seconds |\n|---|---|")
    for k, v in row.items():
        print(f"| {k} | {v:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
