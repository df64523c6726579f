"""One rung of one trial: ``nvp3d train`` in a subprocess with a given epoch budget, and what it produced.

The trial's ``train/`` folder persists between rungs, so a larger budget *resumes* from the folder's
``*_latest.pth`` (nvp3d train's exact resume) instead of starting over. The metric is read from the run's
``status.json``: a value is *fresh* when the records written after this run's STARTED record carry it; when
a resume trains nothing new (the budget was already reached) there is no fresh value, and the caller carries
the previous rung's value forward and records that it did.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nvp3d.status import STATUS_FILENAME, read_status

#: Environment variables of a surrounding distributed launch that must not leak into a trial.
_LAUNCH_VARS = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "RANK", "TORCHELASTIC_RUN_ID",
                "LOCAL_WORLD_SIZE", "GROUP_RANK")
_CKPT_NAME = re.compile(r"model_epoch_(\d+)_step_(\d+)\.pth$")

# Runs the train command with PR_SET_PDEATHSIG=SIGKILL, so a trial dies with the search process (kill -9
# included) instead of training on, unsupervised, in a folder the resumed search will use again.
_LAUNCHER = (
    "import ctypes, os, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, 9)\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(137)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


@dataclass
class RungResult:
    """Outcome of one ``nvp3d train`` run of a trial."""

    epochs: int
    returncode: int
    seconds: float
    value: float | None = None
    fresh: bool = False
    step: int | None = None
    checkpoint: str | None = None
    error: str | None = None
    last_epoch: int | None = None
    warning: str | None = None
    log: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready record (Optuna user attribute, results file)."""
        return asdict(self)


def train_command(spec_path: Path, overrides: Sequence[str]) -> list[str]:
    """``python -m nvp3d.cli train -e spec overrides...`` with this interpreter (works without the script)."""
    return [sys.executable, "-m", "nvp3d.cli", "train", "-e", str(spec_path), *overrides]


def trial_env(cuda_visible: str | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The parent's environment without launcher variables, with the trial's CUDA_VISIBLE_DEVICES."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    if cuda_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def latest_checkpoint(train_dir: Path) -> tuple[str | None, int | None]:
    """(path, global step) of the checkpoint the ``*_latest.pth`` pointer resolves to."""
    pointers = sorted(train_dir.glob("*_latest.pth"))
    if not pointers:
        return None, None
    target = pointers[0].resolve()
    match = _CKPT_NAME.search(target.name)
    return str(target), int(match.group(2)) if match else None


def last_epoch(status_path: Path) -> int | None:
    """Index of the last finished epoch recorded in ``status.json`` (any run), or None."""
    if not status_path.is_file():
        return None
    epochs = [int(r["epoch"]) for r in read_status(status_path) if "epoch" in r]
    return epochs[-1] if epochs else None


def read_metric(status_path: Path, metric: str) -> tuple[float | None, bool]:
    """(value, fresh): the last ``kpi[metric]`` written after the last STARTED record of ``status.json``."""
    if not status_path.is_file():
        return None, False
    records = read_status(status_path)
    starts = [i for i, r in enumerate(records) if r.get("status") == "STARTED"]
    run = records[starts[-1]:] if starts else records
    values = [r["kpi"][metric] for r in run if isinstance(r.get("kpi"), dict) and metric in r["kpi"]]
    if not values:
        return None, False
    try:
        return float(values[-1]), True
    except (TypeError, ValueError):
        return math.nan, True


def failure_reason(log_text: str, returncode: int) -> str:
    """One line saying why a train run failed (its ``error:`` line, OOM, or the exit code)."""
    lines = [line.strip() for line in log_text.replace("\r", "\n").splitlines() if line.strip()]
    if any("out of memory" in line.lower() for line in lines):
        return "out of memory (OOM): lower dataset.train.batch_size or the model size"
    errors = [line for line in lines if "error:" in line]
    if errors:
        last = errors[-1]
        start = last.find("nvp3d train")  # a progress bar may share the line (no newline before the error)
        return last[start if start >= 0 else 0:][:400]
    if returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    return f"nvp3d train exited with code {returncode}" + (f": {lines[-1][:300]}" if lines else "")


def run_rung(trial_dir: Path, spec_path: Path, epochs: int, metric: str, *, cuda_visible: str | None,
             timeout_s: float | None = None, extra_overrides: Sequence[str] = ()) -> RungResult:
    """Train the trial in ``<trial_dir>/train`` up to ``epochs`` (resuming its latest checkpoint) and read
    the metric; the output goes to ``<trial_dir>/rung_<epochs>.log``. A non-zero exit, a timeout or a
    non-finite metric gives a result with ``error`` set."""
    log_path = trial_dir / f"rung_{epochs:03d}.log"
    cmd = [sys.executable, "-c", _LAUNCHER, str(os.getpid()),
           *train_command(spec_path, [f"train.num_epochs={epochs}", *extra_overrides])]
    start = time.monotonic()
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=trial_env(cuda_visible),
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s or None)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
            timed_out = True
        except BaseException:  # interrupted search: take the whole train process group down with it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    result = RungResult(epochs=epochs, returncode=returncode, seconds=round(time.monotonic() - start, 2),
                        log=str(log_path))
    train_dir = trial_dir / "train"
    result.checkpoint, result.step = latest_checkpoint(train_dir)
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if timed_out:
        result.error = f"timed out after {timeout_s:g} s (automl.trial_timeout_s)"
    elif returncode != 0:
        result.error = failure_reason(text, returncode)
    else:
        result.value, result.fresh = read_metric(train_dir / STATUS_FILENAME, metric)
        result.last_epoch = last_epoch(train_dir / STATUS_FILENAME)
        if result.last_epoch is not None and result.last_epoch != epochs - 1:
            result.warning = f"trained to epoch index {result.last_epoch}, expected {epochs - 1}"
        if result.value is not None and not math.isfinite(result.value):
            result.error = f"{metric} is not finite ({result.value}): diverged; the learning rate may be too high"
    return result
