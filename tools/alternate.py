"""Time a change fairly: run one command with the old and the new package sources in alternation.

    git archive REV packages/frustum3d/src packages/maskformer-head/src | tar -x -C .before    # the old sources
    python tools/alternate.py --before .before --rounds 2 -- python tools/profile_training_3d.py --bench B ...

Why: a before/after pair run once, always in the same order, measured the order and the machine's drift as well as
the change. On one H200, graphed inference of the same input moved by +-15 % between processes in both directions
(124.6 / 155.2 ms "before", 152.1 / 140.6 ms "after"), and a single profile pair of the 3D step (0.315 against
0.425 s) could not tell a regression from noise until the cause was found separately.

What it does: ``--before DIR`` is a tree with ``packages/<name>/src`` folders (any subset of the workspace
packages); each round runs the command twice, once with those folders first on ``PYTHONPATH`` ("before") and
once as it is ("after"), alternating which goes first from round to round (after/before, then before/after,
...). It prints each run's last ``--tail`` lines under a header, and ``--json`` writes every run's label, order,
exit status, seconds and output. The command's own numbers are the measurement; this tool only fixes the order.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def source_paths(before: Path) -> list[str]:
    """The ``packages/*/src`` folders of a ``--before`` tree (one-line error when there are none)."""
    paths = sorted(str(p.resolve()) for p in before.glob("packages/*/src") if p.is_dir())
    if not paths:
        raise SystemExit(f"--before {before}: no packages/<name>/src folder in it; extract one with "
                         "`git archive REV packages/<name>/src | tar -x -C DIR`")
    return paths


def schedule(rounds: int) -> list[str]:
    """Labels in run order: rounds alternate which variant goes first (after, before, before, after, ...)."""
    order: list[str] = []
    for r in range(rounds):
        order += ["after", "before"] if r % 2 == 0 else ["before", "after"]
    return order


def run_once(command: list[str], label: str, before_paths: list[str], timeout: float | None) -> dict:
    """Run ``command`` as ``label`` ("before": the old sources first on PYTHONPATH); capture its output."""
    env = dict(os.environ)
    if label == "before":
        env["PYTHONPATH"] = os.pathsep.join(before_paths + [p for p in [env.get("PYTHONPATH", "")] if p])
    t = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:  # its captured output may come as bytes even with text=True
        parts = [p.decode(errors="replace") if isinstance(p, bytes) else p for p in (exc.stdout, exc.stderr) if p]
        code, output = 124, "".join(parts)
    return {"label": label, "exit": code, "seconds": time.perf_counter() - t, "output": output}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, type=Path, help="tree with the old packages/<name>/src folders")
    ap.add_argument("--rounds", type=int, default=2, help="pairs to run (the order alternates between them)")
    ap.add_argument("--tail", type=int, default=8, help="output lines shown per run")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per run (a run past it shows exit 124)")
    ap.add_argument("--json", default="", help="write every run's output and timing here")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to time")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SystemExit("no command given: put it after --, e.g. -- python tools/bench_inference.py ...")
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    paths = source_paths(args.before)
    runs = []
    for i, label in enumerate(schedule(args.rounds)):
        row = run_once(command, label, paths, args.timeout)
        row["order"] = i
        runs.append(row)
        tail = "\n".join(row["output"].rstrip().splitlines()[-args.tail:])
        print(f"== run {i} ({label}): exit {row['exit']}, {row['seconds']:.1f} s\n{tail}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "before": paths, "runs": runs}, indent=1))
    return max(r["exit"] for r in runs)


if __name__ == "__main__":
    sys.exit(main())
