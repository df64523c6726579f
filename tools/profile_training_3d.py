"""Where does a real 3D-stage training step spend its time? Profile steps of ``nvp3d train`` itself.

    python tools/bench_learning.py --out OUT --skip-3d ...          # any finished 2D stage with its data
    python tools/profile_training_3d.py --bench OUT --steps 60 --profile-from 40 --profile-steps 5

Builds the 3D spec as ``tools/bench_learning.py`` does (its 3D recipe over the run's 2D spec, ``--set3d``
overrides), trains ``--steps`` steps through the normal Lightning loop and records, per step, the wall time
between ``on_train_batch_start`` and ``on_train_batch_end`` (what the learning benchmark calls "in steps"),
the forward + loss, the backward and the optimizer step (module hooks), and the batch's voxel counts. Steps
``--profile-from`` .. ``+ --profile-steps`` run under ``torch.profiler``; its table (top ops by self CPU time,
and by device time on CUDA) is printed. Compare the median in-step time with ``tools/bench_training.py
--stages 3d`` (one repeated frame, no Lightning): the difference is the training loop's own cost.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", required=True, help="a tools/bench_learning.py --out folder with a 2D stage")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--profile-from", type=int, default=40)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--set3d", action="append", default=[], help="3D spec override key=value (repeatable)")
    ap.add_argument("--out", default="", help="write the per-step rows as JSON here")
    args = ap.parse_args(argv)

    import pytorch_lightning as pl
    import yaml
    from bench_learning import RECIPE_3D, dotted, merge
    from nvp3d.config import validate_spec
    from nvp3d.status import StatusLogger
    from nvp3d.training.checkpointing import latest_file
    from nvp3d.training.fit import train

    bench = Path(args.bench).resolve()
    result = json.loads((bench / "bench_learning.json").read_text())
    spec2 = validate_spec(result["stages"]["2d"]["spec"], source="bench 2D spec")
    s3 = spec2.model_copy(deep=True)
    s3.dataset.enable_3d = True
    s3.train.checkpoint_2d = str(bench / "train2d" / latest_file("2d"))
    s3.train.num_epochs = 1
    grid = int(result["args"]["grid"])  # the data's grid (the 2D spec does not use its own)
    recipe3 = yaml.safe_load(RECIPE_3D.read_text()) or {}
    d3 = merge(s3.model_dump(mode="json"), merge(recipe3, dotted(args.set3d)))
    d3["model"]["frustum3d"].update(grid_dimensions=grid, frustum_dims=grid)
    d3["train"].update(iters_per_epoch=args.steps, validation_interval=10**6, checkpoint_interval=10**6)
    scratch = bench / "profile3d"
    shutil.rmtree(scratch, ignore_errors=True)  # a fresh run, never a resume of the last profile
    d3["results_dir"] = str(scratch)
    spec3 = validate_spec(d3, source="profile 3D spec")
    cuda = torch.cuda.is_available() and int(spec3.train.num_gpus) > 0

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    rows: list[dict[str, Any]] = []
    holder: dict[str, Any] = {}

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            sync()
            holder["t0"] = time.perf_counter()
            holder["parts"] = {}
            if batch_idx == args.profile_from:
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                holder["prof"] = profile(activities=acts)
                holder["prof"].__enter__()

        def on_before_backward(self, trainer, module, loss):
            sync()
            holder["parts"]["forward_loss"] = time.perf_counter() - holder["t0"]

        def on_after_backward(self, trainer, module):
            sync()
            holder["parts"]["backward"] = time.perf_counter() - holder["t0"] - holder["parts"]["forward_loss"]

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            sync()
            total = time.perf_counter() - holder["t0"]
            p = holder["parts"]
            rows.append({"step": batch_idx, "in_step_s": total, **p,
                         "rest_s": total - p.get("forward_loss", 0.0) - p.get("backward", 0.0),
                         "batch": int(batch["image"].shape[0])})
            if batch_idx == args.profile_from + args.profile_steps - 1 and "prof" in holder:
                prof = holder.pop("prof")
                prof.__exit__(None, None, None)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top,
                                                max_name_column_width=60), flush=True)
                if cuda:
                    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.top,
                                                    max_name_column_width=60), flush=True)

    train(spec3, bench / "profile3d" / "train3d", StatusLogger(bench / "profile3d" / "status.json"),
          enable_progress_bar=False, callbacks=[Timer()], cache_data=not cuda)
    steady = [r for r in rows if r["step"] >= 10 and not (args.profile_from <= r["step"]
                                                          < args.profile_from + args.profile_steps)]
    if steady:
        med = {k: statistics.median(r[k] for r in steady if k in r) for k in ("in_step_s", "forward_loss",
                                                                              "backward", "rest_s")}
        print(f"profile_training_3d: {len(steady)} steady steps at batch {steady[0]['batch']}: median in-step "
              f"{med['in_step_s']:.3f} s = forward+loss {med['forward_loss']:.3f} + backward {med['backward']:.3f} "
              f"+ rest (optimizer, hooks, logging) {med['rest_s']:.3f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
