"""Does nvp3d learn panoptic 3D reconstruction on scenes it never saw? Train both stages, measure held-out scenes.

One command (GPU: about 8.5 minutes with the defaults, 464 s of them training (one H100, stop 40: 501 s); CPU: a
smoke run with a tiny budget):

    python tools/bench_learning.py --out $OUT --class-tint 0.6                  # GPU, recipe files in references/
    python tools/bench_learning.py --out /tmp/bl --cpu --scenes 3 --held-out 1 --frames-per-scene 2 \\
        --budget-2d 20 --budget-3d 10 --set2d model.preset=tiny --image 64x48 --grid 32          # CPU smoke
    python tools/bench_learning.py --out /tmp/of --cpu --overfit ...            # one scene, test = train

What it does:

1. ``datasets3d.synth.generate`` writes ``--scenes`` scenes of ``--frames-per-scene`` frames (default 400 rooms of
   one view: 360 training frames from 360 rooms, 40 held-out rooms; until stop 40 it was 100 rooms of 4 views,
   whose 360 training frames came from 90 rooms and which generalised worse); the last
   ``--held-out`` whole scenes form the val and test splits, the others the train split (``--overfit``: one
   scene, all splits the same frames: training-frame PQ/PRQ prove that targets and losses are right);
2. the 2D stage trains with the recipe ``references/bench_learning_2d.yaml`` (merged over the data keys;
   ``--set2d key=value`` overrides) until ``--epochs-2d`` or the ``--budget-2d`` seconds run out (a WarmupPoly
   schedule's ``max_steps`` follows the measured step rate so that its decay ends with the budget), validating
   on the held-out scenes every ``train.validation_interval`` epochs (the PQ curve);
3. the 3D stage trains on top of it with ``references/bench_learning_3d.yaml`` (``--set3d``) within
   ``--budget-3d`` seconds (the PRQ curve);
4. ``nvp3d evaluate`` of both final checkpoints on the held-out test split: 2D PQ/SQ/RQ and depth-aware PQ,
   3D PRQ/RSQ/RRQ, all / things / stuff and per class.

``--steps-2d N`` / ``--steps-3d N`` make a stage's budget a step count instead of seconds: its WarmupPoly schedule
ends at step N (fixed, not moved by the clock) and it stops there; the seconds budget is then only a safety cap.
Runs on different machines (or on one machine at different speeds) then train the same number of steps. Why: the
2D stage's held-out things appear only after about 300 steps and its final things PQ falls steeply under about
450 (H200: 3.4 at 380 steps, 17.5 at 417, 34-41 at 459-506), while the same 240 s budget gave 380-506 steps, so
time-budgeted 2D stages were not comparable between runs.

``--deadline S`` bounds the whole run (for a machine lent with a hard time limit): before each stage its seconds
budget is cut so that its evaluation (``--deadline-reserve``) and the stages after it still fit, the 3D stage
first; a 3D stage left with under 10 s is skipped with a message. Two H200 calls of one session lost their 3D
stage to a shell ``timeout`` that the sum of the stage budgets, set by hand, overran. The 3D stage's reserve counts
each of its evaluations (the held-out one, ``--eval-train``, every ``--eval-3d``), and ``--variant-3d`` processes
share the parent's deadline (the absolute time, so their own start-up counts) and write their JSON after every
evaluation: in stop 56 an H100 call's three variants each lost their whole JSON to the shell ``timeout`` during
evaluations that the reserve had not counted (and ``--eval-3d`` was not passed to the variants at all).

``--variant-3d NAME:key=value,...`` (repeatable) replaces step 3 by one 3D stage per variant, run side by side
in separate processes on the same 2D stage (and GPU), each in ``<out>/variant3d_<NAME>``; the results go to
``variants_3d`` in the JSON. An A/B comparison in one run (a device call that ends at 10 minutes cannot be
followed by another that reuses its 2D stage): both stages are host-bound at these sizes, but each variant still
makes fewer steps than a run alone, so compare variants with each other only.

Writes ``<out>/bench_learning.json`` (recipe, data summary, timings, curves, final metrics) and
``<out>/bench_learning.png`` (train loss and held-out PQ / PRQ against optimizer steps).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE_2D = ROOT / "references" / "bench_learning_2d.yaml"
RECIPE_3D = ROOT / "references" / "bench_learning_3d.yaml"


def _generate_chunk(job: tuple[str, int, int, int, tuple[int, int], int, float]) -> dict:
    from datasets3d.synth import generate

    out, scenes, frames, grid, size, seed, tint = job
    return generate(out, scenes=scenes, frames_per_scene=frames, grid=grid, image_size=size, seed=seed, check=False,
                    class_tint=tint)


def generate_parallel(data_dir: Path, scenes: int, frames: int, grid: int, size: tuple[int, int], seed: int,
                      processes: int, class_tint: float = 0.0) -> dict:
    """``datasets3d.synth.generate`` in ``processes`` chunks (seeds ``seed .. seed+processes-1``, so scene ids
    differ), merged into one dataset folder: scene folders moved, split lists concatenated; the meta files
    (camera, frustum mask, colour map) depend on grid and image size only and are taken from the first chunk."""
    import shutil
    from multiprocessing import get_context

    processes = max(1, min(processes, scenes))
    if processes == 1:
        return _generate_chunk((str(data_dir), scenes, frames, grid, size, seed, class_tint))
    counts = [scenes // processes + (i < scenes % processes) for i in range(processes)]
    parts = [data_dir.parent / f"{data_dir.name}_part{i}" for i in range(processes)]
    jobs = [(str(p), n, frames, grid, size, seed + i, class_tint) for i, (p, n) in enumerate(zip(parts, counts))]
    with get_context("spawn").Pool(processes) as pool:
        summaries = pool.map(_generate_chunk, jobs)
    (data_dir / "data").mkdir(parents=True, exist_ok=True)
    shutil.copytree(parts[0] / "meta", data_dir / "meta", dirs_exist_ok=True)
    for name in ("train", "val", "test"):
        rows = []
        for p in parts:
            rows += json.loads((p / "meta" / f"{name}.json").read_text())
        (data_dir / "meta" / f"{name}.json").write_text(json.dumps(rows))
    for p in parts:
        for scene in (p / "data").iterdir():
            shutil.move(str(scene), str(data_dir / "data" / scene.name))
        shutil.rmtree(p)
    return {**summaries[0], "scenes": scenes, "frames": scenes * frames}


def split_by_scene(data_dir: Path, held_out: int, overfit: bool) -> dict[str, int]:
    """Rewrite ``meta/{train,val,test}.json``: the last ``held_out`` scenes are val = test, the rest train."""
    meta = data_dir / "meta"
    frames: dict[str, dict] = {}
    for name in ("train", "val", "test"):
        for e in json.loads((meta / f"{name}.json").read_text()):
            frames[f"{e['scene_id']}/{e['image_id']}"] = e
    scenes = sorted({e["scene_id"] for e in frames.values()})
    entries = sorted(frames.values(), key=lambda e: (e["scene_id"], e["image_id"]))
    if overfit:
        train = test = entries
    else:
        if not 1 <= held_out < len(scenes):
            raise SystemExit(f"--held-out must be in 1..{len(scenes) - 1} for {len(scenes)} scenes")
        keep = set(scenes[len(scenes) - held_out:])
        train = [e for e in entries if e["scene_id"] not in keep]
        test = [e for e in entries if e["scene_id"] in keep]
    for name, rows in (("train", train), ("val", test), ("test", test)):
        (meta / f"{name}.json").write_text(json.dumps(rows))
    return {"train_frames": len(train), "test_frames": len(test), "scenes": len(scenes),
            "held_out_scenes": 0 if overfit else held_out}


def base_spec_2d(data: Path, out: Path, image_size: tuple[int, int], voxel_size: float, gpus: int) -> dict[str, Any]:
    """The 2D spec keys the benchmark writes under its recipe: the synthetic dataset at ``image_size`` (lifting
    plane and depth at half size), its voxel size, the results folder and the GPU count."""
    from nvp3d.demo.specs import dataset_section

    w, h = image_size
    ds = dataset_section(data, batch_size=2, num_workers=0)
    ds.update({"target_size": [w, h], "reduced_target_size": [w // 2, h // 2], "depth_size": [h // 2, w // 2]})
    return {"results_dir": str(out), "dataset": ds, "model": {"projection": {"voxel_size": float(voxel_size)}},
            "train": {"num_gpus": gpus}, "evaluate": {"num_gpus": gpus}}


def cpu_loaders(cpu: bool) -> dict[str, Any]:
    """``--cpu``: every split loads in the main process. The recipes' loader workers (10 for the 2D train split)
    are sized for a GPU host; on a few CPU cores they compete with the training itself. ``--set2d`` /
    ``--set3d`` still override it."""
    return {"dataset": {split: {"num_workers": 0} for split in ("train", "val", "test")}} if cpu else {}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (``extra`` wins)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dotted(pairs: list[str]) -> dict[str, Any]:
    """``["a.b=1", ...]`` -> ``{"a": {"b": 1}}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def _number(value: Any) -> float:
    """A KPI as a float: NaN, which JSON stores as null, comes back as NaN."""
    return float(value) if isinstance(value, (int, float)) else math.nan


def prq_text(kpi: dict[str, Any]) -> str:
    """``PRQ 10.4 (things 6.0, stuff 23.6), RSQ 30.4, RRQ 25.6`` of a 3D KPI dict."""
    return (f"PRQ {kpi['PRQ']:.1f} (things {kpi.get('PRQ_th', math.nan):.1f}, stuff {kpi.get('PRQ_st', math.nan):.1f}), "
            f"RSQ {kpi['RSQ']:.1f}, RRQ {kpi['RRQ']:.1f}")


def parse_variant(text: str, flag: str = "--variant-3d") -> tuple[str, list[str]]:
    """``"name:key=value,key=value"`` -> ``("name", ["key=value", ...])`` (``"name:"``: no overrides)."""
    name, sep, rest = text.partition(":")
    if not sep or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise SystemExit(f"{flag} {text!r}: expected NAME:key=value[,key=value...] with a plain NAME")
    sets = [kv for kv in rest.split(",") if kv]
    bad = [kv for kv in sets if "=" not in kv]
    if bad:
        raise SystemExit(f"{flag} {text!r}: {bad[0]!r} is not key=value")
    return name, sets


#: what the 2D stage records at every in-run validation and at its final evaluation: PQ, depth-aware PQ and the
#: held-out depth error (metres), along which the 3D stage lifts its features
KEYS_2D = ("PQ", "PQ_th", "PQ_st", "val_dpq_0.1", "val_depth_mae", "val_depth_abs_rel", "val_depth_abs_rel_scaled",
           "val_depth_log_scale")


def _kpi_text(key: str, value: Any) -> str:
    """One KPI for the console: depth errors to the millimetre, PQ-like scores to a tenth."""
    number = value if isinstance(value, float) else math.nan
    return f"{number:.3f}" if "depth" in key else f"{number:.1f}"


def run_variants_3d(args: Any, source: Path, out: Path, variants: list[tuple[str, list[str]]]) -> dict[str, Any]:
    """Train and evaluate the 3D stage of every variant at once, each in its own process (``--from-2d source``:
    the folder holding the data and the 2D checkpoint) writing to ``out/variant3d_<name>``, and collect their
    results. Side by side they share the machine, so each makes
    fewer steps than a run alone: compare the variants with each other, not with solo runs."""
    import subprocess

    common = ["--budget-3d", str(args.budget_3d), "--steps-3d", str(args.steps_3d), "--epochs-3d", str(args.epochs_3d),
              "--recipe-3d", args.recipe_3d, "--grid", str(args.grid), "--image", args.image,
              "--eval-train", str(args.eval_train)]
    common += [f for kv in args.set3d for f in ("--set3d", kv)]
    common += (["--cpu"] if args.cpu else []) + (["--fixed-schedule"] if args.fixed_schedule else [])
    common += ["--threads", str(args.threads)] if args.threads else []
    common += [f for ev in args.eval_3d for f in ("--eval-3d", ev)]
    if args.deadline > 0:  # the parent's end, as a wall-clock time: a variant's own start-up counts against it
        common += ["--deadline-at", repr(args.deadline_at), "--deadline-reserve", str(args.deadline_reserve)]
    procs = {}
    for name, sets in variants:
        folder = out / f"variant3d_{name}"
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(folder), "--from-2d", str(source), *common,
               *[f for kv in sets for f in ("--set3d", kv)]]
        log = (folder / "log.txt").open("w")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, folder, sets)
    results = {}
    for name, (proc, log, folder, sets) in procs.items():
        code = proc.wait()
        log.close()
        found = folder / "bench_learning.json"
        if code != 0 or not found.is_file():
            results[name] = {"set3d": sets, "error": f"exit {code}; see {folder / 'log.txt'}"}
            continue
        stage = json.loads(found.read_text())["stages"]["3d"]
        results[name] = {"set3d": sets, "steps": stage["steps"], "kpi": stage["kpi"],
                         "train_frames": stage.get("train_frames"), "per_class": stage["per_class"],
                         "things": stage.get("things"), "seconds_train": stage["seconds_train"]}
        print(f"bench_learning: variant {name} ({', '.join(sets) or 'recipe'}): {stage['steps']} steps; held-out "
              f"{prq_text(stage['kpi'])}", flush=True)
    return results


def apply_step_budget(spec: Any, steps: int) -> None:
    """Make a stage spec train exactly ``steps`` optimizer steps (``--steps-2d`` / ``--steps-3d``), in place (the
    stage's later evaluations read the same spec): the WarmupPoly schedule decays to 0 at ``steps``
    (``train.optim.max_steps``, which also sets the trainer's step limit) and the epoch count cannot end the fit
    first."""
    if steps <= 0:
        raise ValueError(f"a step budget must be positive, got {steps}")
    spec.train.optim.max_steps = int(steps)
    if spec.train.optim.warmup_iters >= steps:
        raise SystemExit(f"step budget {steps} is not past the recipe's warmup_iters ({spec.train.optim.warmup_iters})")
    spec.train.num_epochs = max(int(spec.train.num_epochs), int(steps))


def stage_budget(budget: float, deadline: float, elapsed: float, reserve: float, later: float = 0.0) -> float:
    """A stage's seconds under a whole-run ``deadline`` (0: none): its own ``budget``, cut so that ``reserve``
    seconds (its evaluation) and ``later`` seconds (the stages after it) still fit after ``elapsed`` seconds.
    May be <= 0: no time is left for the stage."""
    if deadline <= 0:
        return budget
    return min(budget, deadline - elapsed - reserve - later)


def stage_reserve(per_evaluation: float, eval_train: bool, extra_evaluations: int = 0) -> float:
    """Seconds a stage keeps under ``--deadline`` for its set-up and evaluations: ``per_evaluation`` for the
    held-out one, once more for the training frames (``--eval-train``) and for each extra one (the 3D stage's
    ``--eval-3d``)."""
    return per_evaluation * (1 + int(eval_train) + int(extra_evaluations))


def make_callbacks(budget_s: float, kpi_keys: tuple[str, ...], clock_schedule: bool = True
                   ) -> tuple[Any, dict[str, Any]]:
    """A callback that records (step, train loss), (step, held-out KPIs), every 25th step's wall clock and the
    seconds spent inside steps against between them (loader waits, validation), and stops after ``budget_s``.

    ``clock_schedule``: a WarmupPoly schedule's ``max_steps`` follows the time budget -- before every step it is
    set to the current step plus the steps the remaining seconds hold at the rate of the last 50 steps -- so the
    poly decay reaches 0 when the budget ends on any machine (a fixed ``max_steps`` ends early on a fast one and
    never decays on a slow one). The recipe's ``max_steps`` is then only the first estimate, and it no longer stops
    the run: the trainer's :class:`~nvp3d.training.step_limit.StepLimit` is lifted at the start (the time budget
    is the stopping rule: one H200 run stopped its 2D stage at the estimate, 400 steps, after 222 of its 240 s).
    """
    import collections

    import pytorch_lightning as pl
    from nvp3d.training.optim import WarmupPolyLR
    from nvp3d.training.step_limit import StepLimit

    curves: dict[str, Any] = {"loss": [], "heldout": [], "clock": [], "max_steps": [], "terms": [],
                              "seconds_in_steps": 0.0, "seconds_between_steps": 0.0}

    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.recent: collections.deque = collections.deque(maxlen=50)
            self.started = self.ended = None

        def on_train_start(self, trainer, pl_module) -> None:
            if clock_schedule:
                for cb in trainer.callbacks:
                    if isinstance(cb, StepLimit):
                        curves["step_limit_lifted"] = cb.max_steps
                        cb.max_steps = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            now, step = time.perf_counter() - self.t0, int(trainer.global_step)
            # between the last step's end and this start: waiting for the loader (and validation, checkpoints)
            if self.ended is not None:
                curves["seconds_between_steps"] += now - self.ended
            self.started = now
            self.recent.append((step, now))
            if not clock_schedule or len(self.recent) < 10:
                return
            (s0, t0), (s1, t1) = self.recent[0], self.recent[-1]
            if s1 <= s0 or t1 <= t0:
                return
            rate = (s1 - s0) / (t1 - t0)
            projected = step + max(1, int(rate * max(0.0, budget_s - now)))
            for cfg in trainer.lr_scheduler_configs:
                if isinstance(cfg.scheduler, WarmupPolyLR) and step >= cfg.scheduler.warmup_iters:
                    cfg.scheduler.max_steps = projected
                    if step % 25 == 0:
                        curves["max_steps"].append([step, projected])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if loss is not None:
                curves["loss"].append([int(trainer.global_step), float(loss)])
            elapsed = time.perf_counter() - self.t0  # float(loss) above waited for the step's kernels
            if self.started is not None:
                curves["seconds_in_steps"] += elapsed - self.started
            self.ended = elapsed
            if trainer.global_step % 25 == 0:  # (step, seconds since fit start): the step rate over time
                curves["clock"].append([int(trainer.global_step), elapsed])
            if trainer.global_step % 25 == 0 or trainer.global_step == 1:
                # the unweighted loss terms the module logs (loss_ce, loss_mask, ...): which one falls, which not
                terms = {k: float(v) for k, v in trainer.callback_metrics.items()
                         if k.startswith("loss_") and getattr(v, "numel", lambda: 1)() == 1}
                curves["terms"].append([int(trainer.global_step), terms])
            if elapsed > budget_s:
                trainer.should_stop = True

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking:
                return
            kpi = pl_module.last_metrics.get("kpi", {})
            row = {"step": int(trainer.global_step), "seconds": time.perf_counter() - self.t0}
            row.update({k: float(kpi[k]) for k in kpi_keys if k in kpi})
            curves["heldout"].append(row)
            # one console line per validation: a run cut short (a lent machine's hard limit) still shows its curve
            print(f"bench_learning: validation at step {row['step']} ({row['seconds']:.0f} s): "
                  + ", ".join(f"{k} {_kpi_text(k, row.get(k))}" for k in kpi_keys), flush=True)

    return Recorder(), curves


COLOURS = {"PQ": (31, 119, 180), "PQ_th": (214, 39, 40), "PQ_st": (44, 160, 44),
           "PRQ": (31, 119, 180), "PRQ_th": (214, 39, 40), "PRQ_st": (44, 160, 44)}


def _panel(draw: Any, box: tuple[int, int, int, int], title: str, loss: list, heldout: list[dict],
           keys: tuple[str, ...]) -> None:
    """One panel: train loss (grey, log scale, left axis) and held-out KPIs (colours, 0..100, right axis)."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((x0 + 4, y0 - 14), title, fill=(0, 0, 0))
    steps = [s for s, _ in loss] + [r["step"] for r in heldout]
    smax = max(steps) if steps else 1
    sx = lambda s: x0 + (x1 - x0) * s / max(1, smax)  # noqa: E731
    vals = [v for _, v in loss if v > 0 and math.isfinite(v)]
    if vals:
        lo, hi = math.log10(min(vals)), math.log10(max(vals))
        hi = hi if hi > lo else lo + 1
        sy = lambda v: y1 - (y1 - y0) * (math.log10(v) - lo) / (hi - lo)  # noqa: E731
        pts = [(sx(s), sy(v)) for s, v in loss if v > 0 and math.isfinite(v)]
        if len(pts) > 1:
            draw.line(pts, fill=(150, 150, 150), width=1)
        draw.text((x0 + 4, y0 + 2), f"loss {max(vals):.3g} .. {min(vals):.3g} (log)", fill=(110, 110, 110))
    for i, k in enumerate(keys):
        pts = [(sx(r["step"]), y1 - (y1 - y0) * _number(r[k]) / 100.0) for r in heldout
               if k in r and math.isfinite(_number(r[k]))]
        colour = COLOURS.get(k, (0, 0, 0))
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for px, py in pts:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        last = f" {_number(heldout[-1][k]):.1f}" if heldout and k in heldout[-1] else ""
        draw.text((x0 + 4, y0 + 16 + 12 * i), f"held-out {k}{last}", fill=colour)
    draw.text((x0, y1 + 4), "0", fill=(0, 0, 0))
    draw.text((x1 - 60, y1 + 4), f"step {smax}", fill=(0, 0, 0))
    draw.text((x1 + 4, y0), "100", fill=(0, 0, 0))
    draw.text((x1 + 4, y1 - 10), "0", fill=(0, 0, 0))


def plot(result: dict[str, Any], path: Path) -> None:
    """Train loss and held-out PQ (2D) / PRQ (3D) against optimizer steps, one panel per stage (Pillow only:
    the GPU machine has no plotting library)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (960, 360), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, (stage, keys) in enumerate((("2d", ("PQ", "PQ_th", "PQ_st")), ("3d", ("PRQ", "PRQ_th", "PRQ_st")))):
        c = result["stages"].get(stage, {}).get("curves", {})
        _panel(draw, (40 + 480 * i, 30, 440 + 480 * i, 320), f"{stage.upper()} stage: train loss, held-out scenes",
               c.get("loss", []), c.get("heldout", []), keys)
    img.save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    # 400 rooms of one view (360 training frames, 40 held-out rooms): the same frames and steps as 100 rooms of 4
    # views, but 4x the rooms; one H100 run: held-out 2D things PQ 44.2, 3D PRQ 14.9 (docs/learning.md, stop 40)
    ap.add_argument("--scenes", type=int, default=400)
    ap.add_argument("--held-out", type=int, default=40)
    ap.add_argument("--frames-per-scene", type=int, default=1)
    ap.add_argument("--grid", type=int, default=64)
    ap.add_argument("--image", default="320x240")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--class-tint", type=float, default=0.0,
                    help="datasets3d.synth class_tint: 0 = class shows in the shape only (default)")
    ap.add_argument("--epochs-2d", type=int, default=1000)
    ap.add_argument("--epochs-3d", type=int, default=1000)
    ap.add_argument("--budget-2d", type=float, default=240.0, help="seconds of 2D training")
    ap.add_argument("--budget-3d", type=float, default=215.0, help="seconds of 3D training")
    ap.add_argument("--steps-2d", type=int, default=0, help="a step budget for the 2D stage: its schedule ends and "
                    "it stops at this step (0: the seconds budget decides; with a step budget it is only a cap)")
    ap.add_argument("--steps-3d", type=int, default=0, help="the same for the 3D stage")
    ap.add_argument("--recipe-2d", default=str(RECIPE_2D))
    ap.add_argument("--recipe-3d", default=str(RECIPE_3D))
    ap.add_argument("--set2d", action="append", default=[], help="2D spec override key=value (repeatable)")
    ap.add_argument("--set3d", action="append", default=[], help="3D spec override key=value (repeatable)")
    ap.add_argument("--overfit", action="store_true", help="one scene; train, val and test are the same frames")
    ap.add_argument("--skip-3d", action="store_true")
    ap.add_argument("--from-2d", default="", help="a finished run's --out: reuse its data, 2D spec and 2D "
                    "checkpoint, train only the 3D stage")
    ap.add_argument("--fixed-schedule", action="store_true",
                    help="keep the recipes' WarmupPoly max_steps (default: it follows the time budget)")
    ap.add_argument("--eval-train", type=int, default=40,
                    help="also evaluate both stages on this many training frames (seen scenes; 0: skip): "
                         "tells underfitting (low there too) from overfitting")
    ap.add_argument("--variant-3d", action="append", default=[], metavar="NAME:key=value,...",
                    help="instead of one 3D stage, train one per variant side by side (separate processes on the "
                         "same 2D stage and GPU; repeatable; 'NAME:' = the recipe): an A/B comparison within one "
                         "run, each variant with fewer steps than a run alone")
    ap.add_argument("--eval-3d", action="append", default=[], metavar="NAME:key=value,...",
                    help="after the 3D stage, evaluate its final checkpoint on the held-out frames again with these "
                         "overrides (evaluation-time keys such as model.frustum3d.coarse_mask_weight; repeatable)")
    ap.add_argument("--deadline", type=float, default=0.0, help="seconds for the whole run (data, both stages and "
                    "their evaluations; 0: none): a stage's time budget shrinks so that the run ends in time, the 3D "
                    "stage first (it is skipped, with a message, when under 10 s are left for it); for machines "
                    "lent with a hard time limit")
    ap.add_argument("--deadline-reserve", type=float, default=45.0, help="seconds kept per stage for its set-up "
                    "and evaluation under --deadline (once more for --eval-train and, in the 3D stage, for every "
                    "--eval-3d)")
    ap.add_argument("--deadline-at", type=float, default=0.0, help="instead of --deadline: the run ends at this "
                    "time.time() (how --variant-3d hands its deadline to the variants' processes)")
    ap.add_argument("--cpu", action="store_true", help="train on the CPU; every split loads in the main process "
                    "(num_workers 0, unless --set2d/--set3d says otherwise)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--gen-processes", type=int, default=8, help="processes generating the synthetic data")
    args = ap.parse_args(argv)
    if args.deadline_at > 0:
        args.deadline = max(args.deadline_at - time.time(), 1e-3)
    elif args.deadline > 0:
        args.deadline_at = time.time() + args.deadline
    variants = [parse_variant(v) for v in args.variant_3d]  # a typo fails here, not after the 2D stage
    if len({n for n, _ in variants}) != len(variants):
        raise SystemExit("--variant-3d: every variant needs its own NAME")
    evals_3d = [parse_variant(v, "--eval-3d") for v in args.eval_3d]
    if len({n for n, _ in evals_3d}) != len(evals_3d):
        raise SystemExit("--eval-3d: every evaluation needs its own NAME")

    import torch
    from nvp3d.config import validate_spec
    from nvp3d.demo.specs import parse_image_size
    from nvp3d.evaluation.evaluate import evaluate
    from nvp3d.fileio import write_json
    from nvp3d.status import StatusLogger
    from nvp3d.training.checkpointing import latest_file
    from nvp3d.training.fit import train

    if args.threads:
        torch.set_num_threads(args.threads)
    gpus = 0 if args.cpu or not torch.cuda.is_available() else 1
    out = Path(args.out).resolve()
    data = out / "data"
    w, h = parse_image_size(args.image)
    t0 = time.perf_counter()
    scenes = 1 if args.overfit else args.scenes
    if args.from_2d:
        prev = json.loads((Path(args.from_2d) / "bench_learning.json").read_text())
        data = Path(args.from_2d).resolve() / "data"
        summary, split = {"voxel_size": prev["data"]["voxel_size"]}, {k: prev["data"][k] for k in (
            "train_frames", "test_frames", "scenes", "held_out_scenes")}
    else:
        summary = generate_parallel(data, scenes, args.frames_per_scene, args.grid, (w, h), args.seed,
                                    1 if args.overfit else args.gen_processes, args.class_tint)
        split = split_by_scene(data, args.held_out, args.overfit)
    t_data = time.perf_counter() - t0
    print(f"bench_learning: data {split} in {t_data:.0f} s", flush=True)

    recipe2 = yaml.safe_load(Path(args.recipe_2d).read_text()) or {}
    recipe3 = yaml.safe_load(Path(args.recipe_3d).read_text()) or {}
    base2 = merge(base_spec_2d(data, out, (w, h), float(summary["voxel_size"]), gpus),
                  {"train": {"num_epochs": args.epochs_2d}})
    if args.from_2d:  # the 2D network as that run trained it (its preset and --set2d), not as given now
        spec2 = validate_spec(merge(prev["stages"]["2d"]["spec"], {"results_dir": str(out)}),
                              source=f"2D spec of {args.from_2d}")
        recipe2 = prev["recipe_2d"]
    else:
        spec2 = validate_spec(merge(merge(merge(base2, recipe2), cpu_loaders(args.cpu)), dotted(args.set2d)),
                              source="bench 2D spec")
    result: dict[str, Any] = {"args": vars(args), "device": torch.cuda.get_device_name(0) if gpus else "cpu",
                              "data": {**split, "seconds": t_data, "voxel_size": summary["voxel_size"]},
                              "recipe_2d": recipe2, "recipe_3d": recipe3, "stages": {}}

    def run_stage(stage: str, spec: Any, budget: float, keys: tuple[str, ...], steps: int = 0) -> dict[str, Any]:
        if steps > 0:  # a step budget: the schedule ends there and the trainer's step limit stops the fit
            apply_step_budget(spec, steps)
        rec, curves = make_callbacks(budget, keys, clock_schedule=not args.fixed_schedule and steps <= 0)
        t = time.perf_counter()
        status = StatusLogger(out / f"train{stage}" / "status.json")
        # CPU: decoded samples cached in memory (no workers); GPU: loader workers build them in parallel
        train(spec, out / f"train{stage}", status, enable_progress_bar=False, callbacks=[rec], cache_data=gpus == 0)
        t_train = time.perf_counter() - t
        spec.evaluate.checkpoint = str(out / f"train{stage}" / latest_file(stage))
        t = time.perf_counter()
        kpi = evaluate(spec, out / f"evaluate{stage}", None, say=lambda *_: None)
        metrics_file = out / f"evaluate{stage}" / ("metrics_2d.json" if stage == "2d" else "metrics_3d.json")
        metrics = json.loads(metrics_file.read_text())
        steps = curves["loss"][-1][0] if curves["loss"] else 0
        final = {"step": steps, "seconds": t_train, "final": True}
        # the in-run validations name the toolkit's KPIs val_*, the final evaluation test_*
        final_kpi = {k: kpi.get("test_" + k[4:] if k.startswith("val_") else k) for k in keys}
        final.update({k: float(v) for k, v in final_kpi.items() if isinstance(v, float)})
        curves["heldout"].append(final)  # the evaluation of the last checkpoint ends each curve
        print(f"bench_learning: {stage} trained {t_train:.0f} s, {steps} steps ({curves['seconds_in_steps']:.0f} s in "
              f"steps, {curves['seconds_between_steps']:.0f} s between them); held-out "
              + ", ".join(f"{k} {_kpi_text(k, v)}" for k, v in final_kpi.items()),
              flush=True)
        return {"seconds_train": t_train, "seconds_eval": time.perf_counter() - t, "steps": steps,
                "kpi": kpi, "per_class": metrics.get("per_class"), "things": metrics.get("things"),
                "semantic": metrics.get("semantic"), "curves": curves,
                "spec": spec.model_dump(mode="json")}

    def eval_training_frames(stage: str, spec: Any, stage_result: dict[str, Any]) -> None:
        """The stage's KPIs (2D PQ, 3D PRQ) on the first ``--eval-train`` training frames, final checkpoint: a
        held-out score near it means the network underfits, far below it means it does not generalise."""
        rows = json.loads((data / "meta" / "train.json").read_text())[:args.eval_train]
        # in this run's own folder, whole or not at all: --variant-3d runs share the 2D run's data folder and
        # evaluate side by side (one read the other's half-written file in a CI run)
        subset = out / f"train_eval_{stage}.json"
        write_json(subset, rows)
        spec = spec.model_copy(deep=True)
        spec.dataset.test.json_path = str(subset)
        t = time.perf_counter()
        kpi = evaluate(spec, out / f"evaluate{stage}_train", None, say=lambda *_: None)
        keys = (("PQ", "PQ_th", "PQ_st", "test_depth_mae", "test_depth_abs_rel", "test_depth_abs_rel_scaled",
                 "test_depth_log_scale") if stage == "2d"
                else ("PRQ", "PRQ_th", "PRQ_st", "RSQ", "RRQ"))
        stage_result["train_frames"] = {"frames": len(rows), "seconds": time.perf_counter() - t,
                                        **{k: float(kpi[k]) for k in keys if isinstance(kpi.get(k), float)}}
        print(f"bench_learning: {stage} on training frames: "
              + ", ".join(f"{k} {kpi.get(k, math.nan):.{3 if 'depth' in k else 1}f}" for k in keys), flush=True)

    def eval_again(spec: Any, name: str, sets: list[str], stage_result: dict[str, Any]) -> None:
        """The final 3D checkpoint on the held-out frames with evaluation-time overrides (``--eval-3d``)."""
        again = validate_spec(merge(spec.model_dump(mode="json"), dotted(sets)), source=f"--eval-3d {name}")
        t = time.perf_counter()
        kpi = evaluate(again, out / f"evaluate3d_{name}", None, say=lambda *_: None)
        keys = ("PRQ", "PRQ_th", "PRQ_st", "RSQ", "RRQ")
        stage_result.setdefault("evals", {})[name] = {"set": sets, "seconds": time.perf_counter() - t,
                                                      **{k: float(kpi[k]) for k in keys if isinstance(kpi.get(k), float)}}
        print(f"bench_learning: 3d evaluated again as {name} ({', '.join(sets)}): {prq_text(kpi)}", flush=True)

    eval_train = bool(args.eval_train and not args.overfit)
    reserve = stage_reserve(args.deadline_reserve, eval_train)
    reserve_3d = stage_reserve(args.deadline_reserve, eval_train, len(evals_3d))

    def budget_now(stage: str, budget: float, later: float) -> float:
        left = stage_budget(budget, args.deadline, time.perf_counter() - t0, reserve_3d if stage == "3d" else reserve,
                            later)
        if args.deadline > 0 and left < budget:
            print(f"bench_learning: --deadline {args.deadline:g} s: the {stage} stage gets {max(0.0, left):.0f} s "
                  f"instead of {budget:g} s", flush=True)
        return left

    if args.from_2d:
        result["stages"]["2d"] = prev["stages"]["2d"]
        checkpoint_2d = Path(args.from_2d).resolve() / "train2d" / latest_file("2d")
    else:
        budget_2d = budget_now("2d", args.budget_2d, 0.0 if args.skip_3d else reserve_3d + 10.0)
        if budget_2d <= 0:
            raise SystemExit(f"--deadline {args.deadline:g}: no time is left for the 2D stage after the data "
                             f"({time.perf_counter() - t0:.0f} s); raise --deadline or lower --deadline-reserve")
        result["stages"]["2d"] = run_stage("2d", spec2, budget_2d, KEYS_2D, args.steps_2d)
        checkpoint_2d = out / "train2d" / latest_file("2d")
        if eval_train:
            eval_training_frames("2d", spec2, result["stages"]["2d"])
    if not args.skip_3d:
        args.budget_3d = budget_now("3d", args.budget_3d, 0.0)
        if args.budget_3d < 10.0:
            result["skipped_3d"] = f"--deadline {args.deadline:g} s: {max(0.0, args.budget_3d):.0f} s were left"
            print(f"bench_learning: 3D stage skipped: {result['skipped_3d']}", flush=True)
            args.skip_3d = True
    if variants and not args.skip_3d:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "bench_learning.json", result)
        source = Path(args.from_2d).resolve() if args.from_2d else out  # where the data and the 2D stage are
        result["variants_3d"] = run_variants_3d(args, source, out, variants)
    elif not args.skip_3d:
        s3 = spec2.model_copy(deep=True)
        s3.dataset.enable_3d = True
        s3.train.checkpoint_2d = str(checkpoint_2d)
        s3.train.num_epochs = args.epochs_3d
        d3 = merge(s3.model_dump(mode="json"), merge(merge(recipe3, cpu_loaders(args.cpu)), dotted(args.set3d)))
        d3["model"]["frustum3d"].update(grid_dimensions=args.grid, frustum_dims=args.grid)
        spec3 = validate_spec(d3, source="bench 3D spec")
        write_json(out / "bench_learning.json", result)  # the 2D results survive a failing 3D stage
        try:
            result["stages"]["3d"] = run_stage("3d", spec3, args.budget_3d,
                                               ("PRQ", "PRQ_th", "PRQ_st", "RSQ", "RRQ"), args.steps_3d)
            write_json(out / "bench_learning.json", result)  # each evaluation's result survives a later timeout
            if eval_train:
                eval_training_frames("3d", spec3, result["stages"]["3d"])
                write_json(out / "bench_learning.json", result)
            for name, sets in evals_3d:
                eval_again(spec3, name, sets, result["stages"]["3d"])
                write_json(out / "bench_learning.json", result)
        except Exception as exc:  # noqa: BLE001 - reported in the JSON, the 2D numbers are still written
            result["error_3d"] = f"{type(exc).__name__}: {exc}"
            print(f"bench_learning: 3D stage failed: {result['error_3d']}", flush=True)
    result["seconds_total"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench_learning.json", result)
    plot(result, out / "bench_learning.png")
    k2 = {k: _number(v) for k, v in result["stages"]["2d"]["kpi"].items()}  # --from-2d: read back from JSON
    line = f"held-out 2D PQ {k2['PQ']:.1f} (things {k2['PQ_th']:.1f}, stuff {k2['PQ_st']:.1f})"
    if "3d" in result["stages"]:
        line += f"; 3D {prq_text(result['stages']['3d']['kpi'])}"
    print(f"bench_learning: {line}; total {result['seconds_total']:.0f} s -> {out / 'bench_learning.json'}")
    failed = [n for n, v in result.get("variants_3d", {}).items() if "error" in v]
    if failed:
        print(f"bench_learning: variants failed: {', '.join(failed)} (their log.txt says why)", flush=True)
    return 1 if "error_3d" in result or failed else 0


if __name__ == "__main__":
    sys.exit(main())
