"""Evaluate finished ``nvp3d demo`` runs on extra held-out synthetic scenes, the same scenes for every run.

Until nvp3d-cli 0.3.14 the demo held out one scene (4 frames, 10-13 GT things), so its held-out things PQ/PRQ moved
by tens of points with the seed or any recipe change (docs/learning.md, stops 35-38); it now holds out 32 rooms of
its own seed (one view each, since 0.3.15). This tool scores the demo's checkpoints on unseen rooms that are the
*same for every run*, generated once with a seed no demo trains on, so that recipes and seeds are compared on one
test set without changing the demo:

    python tools/demo_heldout.py RUN_DIR [RUN_DIR ...] --scenes 8 --data /tmp/heldout [--json OUT.json]

``RUN_DIR`` is a demo ``--out`` folder (``train/`` and, when the 3D stage ran, ``train3d/``). The held-out data is
generated into ``--data`` with the run's grid, image size, class tint and voxel size (read from
``RUN_DIR/data/meta/camera.json``), unless it is already there; its camera must equal the run's. Each run's latest
2D and 3D checkpoints are evaluated with the demo's evaluation spec, the model taken from the checkpoint's record and
``dataset.test`` pointed at every frame of the held-out scenes. Prints one line per run (both stages); ``--json``
also writes them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

HELDOUT_SEED = 7919  # no demo or test trains on this seed's scenes


def _camera(data: Path) -> dict[str, Any]:
    return json.loads((data / "meta" / "camera.json").read_text())


def heldout_data(run: Path, data: Path, scenes: int, frames: int, seed: int) -> Path:
    """Generate (once) the held-out scenes for ``run``'s camera; return the json listing all their frames."""
    from datasets3d.synth import generate
    from nvp3d.fileio import write_json

    cam = _camera(run / "data")
    if not (data / "meta" / "camera.json").is_file():
        w, h = cam["image_size"]
        generate(data, scenes=scenes, frames_per_scene=frames, grid=int(cam["grid"][0]), image_size=(w, h), seed=seed,
                 check=False, class_tint=float(cam.get("class_tint", 0.0)))
    mine = _camera(data)
    same = ("intrinsic", "image_size", "reduced_size", "grid", "voxel_size", "depth_range", "truncation", "class_tint")
    diff = [k for k in same if mine.get(k) != cam.get(k)]
    if diff:
        raise SystemExit(f"demo_heldout: {data} was generated for another camera ({', '.join(diff)} differ from "
                         f"{run / 'data/meta/camera.json'}); give another --data folder")
    listing = data / "meta" / "heldout.json"
    if not listing.is_file():
        frames_all: dict[tuple[str, str], dict] = {}  # every frame once (with < 3 scenes each split holds all)
        for split in ("train", "val", "test"):
            for f in json.loads((data / "meta" / f"{split}.json").read_text()):
                frames_all.setdefault((f["scene_id"], f["image_id"]), f)
        write_json(listing, list(frames_all.values()))
    return listing


def _spec_for(ckpt: Path, stage: str, data: Path, listing: Path, out: Path, sets: list[str] = ()) -> Any:
    """An evaluate spec as the demo's, on the held-out frames; the model comes from the checkpoint's record.
    ``sets``: ``dotted.key=value`` (YAML value) for a run trained with other dataset keys than the demo's."""
    import torch
    from nvp3d.config import validate_spec
    from nvp3d.config.loading import apply_overrides
    from nvp3d.demo.specs import demo_spec_dict
    from nvp3d.model.provenance import apply_sources

    cam = _camera(data)
    raw = demo_spec_dict(data, out, image_size=tuple(cam["image_size"]), voxel_size=float(cam["voxel_size"]))
    raw["model"] = {"preset": raw["model"]["preset"]}  # the checkpoint's record sets the rest (queries, ...)
    raw["dataset"]["test"]["json_path"] = listing.as_posix()
    raw["dataset"]["enable_3d"] = stage == "3d"
    raw["evaluate"] = {"checkpoint": str(ckpt), "num_gpus": 1 if torch.cuda.is_available() else 0}
    raw = apply_overrides(raw, sets)  # the CLI's own dotted key=value rule and errors
    return apply_sources(validate_spec(raw, source=f"demo_heldout ({ckpt})"), "evaluate")


def _num(kpi: dict[str, Any], key: str) -> float:
    v = kpi.get(key, math.nan)
    return 0.0 if not isinstance(v, float) or math.isnan(v) else v


def evaluate_run(run: Path, data: Path, listing: Path, out: Path, sets: list[str] = ()) -> dict[str, Any]:
    """Held-out KPIs of the run's latest 2D and (when present) 3D checkpoints."""
    from nvp3d.evaluation.evaluate import evaluate
    from nvp3d.training.checkpointing import latest_file

    row: dict[str, Any] = {"run": str(run)}
    for stage, sub in (("2d", "train"), ("3d", "train3d")):
        ckpt = run / sub / latest_file(stage)
        if not ckpt.is_file():
            continue
        t0 = time.perf_counter()
        folder = out / f"{run.name}_{stage}"
        kpi = evaluate(_spec_for(ckpt, stage, data, listing, folder, sets), folder, None, say=lambda *_: None)
        keys = ("PQ", "PQ_th", "PQ_st") if stage == "2d" else ("PRQ", "PRQ_th", "PRQ_st", "RSQ", "RRQ")
        row[stage] = {k: _num(kpi, k) for k in keys} | {"seconds": time.perf_counter() - t0}
        metrics = folder / f"metrics_{stage}.json"
        if metrics.is_file():  # where the GT things went (matched, covered by stuff, ...)
            row[stage]["things"] = json.loads(metrics.read_text()).get("things")
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="demo --out folders")
    ap.add_argument("--data", type=Path, required=True, help="folder of the held-out scenes (generated once)")
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--frames-per-scene", type=int, default=4)
    ap.add_argument("--seed", type=int, default=HELDOUT_SEED)
    ap.add_argument("--out", type=Path, default=None, help="evaluation folders (default: <data>/evaluations)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="spec key of the evaluation (e.g. dataset.truncation_range=[0,3] for a run trained so)")
    args = ap.parse_args(argv)
    import torch
    from nvp3d.fileio import write_json

    torch.set_num_threads(args.threads)
    rows = []
    for run in args.runs:
        listing = heldout_data(run, args.data, args.scenes, args.frames_per_scene, args.seed)
        row = evaluate_run(run, args.data, listing, args.out or args.data / "evaluations", args.set)
        rows.append(row)
        two = row.get("2d", {})
        three = row.get("3d", {})
        rooms = len({f["scene_id"] for f in json.loads(listing.read_text())})  # an existing --data may hold others
        print(f"{run}: held-out ({rooms} scenes) 2D PQ {two.get('PQ', math.nan):.1f} "
              f"(things {two.get('PQ_th', math.nan):.1f}, stuff {two.get('PQ_st', math.nan):.1f}); "
              f"3D PRQ {three.get('PRQ', math.nan):.1f} (things {three.get('PRQ_th', math.nan):.1f}, "
              f"stuff {three.get('PRQ_st', math.nan):.1f})", flush=True)
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
