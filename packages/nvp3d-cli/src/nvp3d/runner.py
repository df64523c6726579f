"""Run one spec-driven action end to end, independent of the command-line layer.

``run_action`` = load spec -> resolve and create results dir -> write ``experiment.yaml`` -> STARTED in
``status.json`` -> the action's implementation (:mod:`nvp3d.actions`) -> SUCCESS/FAILURE; returns the process exit code. All
user-facing output is one line per event on the given streams, so the CLI stays a thin shell.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from nvp3d.actions import get_action
from nvp3d.config import ExperimentSpec, dump_spec, load_spec, resolve_results_dir
from nvp3d.distributed import global_rank, is_rank_zero
from nvp3d.errors import ExitCode, SpecError
from nvp3d.runlock import RunLock
from nvp3d.status import STATUS_FILENAME, StatusLogger, status_run
from nvp3d.worker_errors import unwrap_worker_error

log = logging.getLogger("nvp3d")

EXPERIMENT_FILENAME = "experiment.yaml"


def exit_code_for(exc: BaseException) -> ExitCode:
    """Map an exception raised while running an action to the documented exit code."""
    if isinstance(getattr(exc, "exit_code", None), ExitCode):  # errors that carry their own code (e.g. 5)
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    if isinstance(exc, SpecError):
        return ExitCode.BAD_INPUT
    if isinstance(exc, FileNotFoundError | ValueError):
        return ExitCode.DATA_ERROR
    return ExitCode.INTERNAL_ERROR


def report_error(prefix: str, exc: BaseException, *, verbose: bool, err: TextIO) -> ExitCode:
    """Print the one-line error (plus details and traceback with ``verbose``); return its exit code."""
    unwrap_worker_error(exc)  # a DataLoader worker's error reads as it would in the main process
    code = exit_code_for(exc)
    if isinstance(getattr(exc, "exit_code", None), ExitCode):  # its own one-line message (step, file, fix)
        message = str(exc)
    elif code == ExitCode.INTERRUPTED:
        message = "interrupted"
    elif code == ExitCode.INTERNAL_ERROR:
        message = f"internal error: {type(exc).__name__}: {exc}"
        if not verbose:
            message += " (run with --verbose for the traceback)"
    elif code == ExitCode.DATA_ERROR:
        message = f"data error: {exc}"
    else:
        message = str(exc)
    print(f"{prefix}: error: {message}", file=err)
    if verbose:
        for detail in getattr(exc, "details", [])[1:]:
            print(f"{prefix}:   also: {detail}", file=err)
        traceback.print_exception(exc, file=err)
    return code


def prepare_results_dir(spec: ExperimentSpec, action: str, write_spec: bool = True) -> Path:
    """Create the action's results dir and write the resolved ``experiment.yaml`` into it (``write_spec``)."""
    results_dir = resolve_results_dir(spec, action)
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpecError(
            f"cannot create results dir {results_dir} ({exc.strerror or exc}); set results_dir or "
            f"{action}.results_dir to a writable folder"
        ) from exc
    if write_spec:
        dump_spec(spec, results_dir / EXPERIMENT_FILENAME)
    return results_dir


def execute(action: str, spec: ExperimentSpec, results_dir: Path, status: StatusLogger) -> None:
    """Call the action's implementation; a returned mapping becomes the KPI of the SUCCESS record."""
    kpi = get_action(action)(spec, results_dir, status)
    if not status.finished:
        status.success(f"{action} finished successfully.", kpi=kpi or None)


def run_action(
    action: str,
    spec_path: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    verbose: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run ``action`` with the spec at ``spec_path`` plus overrides; return the exit code (0 = success).

    Spec problems exit with 2 before anything is written; once the results dir exists every outcome is
    recorded in its status.json (SUCCESS, or FAILURE with the reason). In a multi-process run (DDP ranks
    spawned by Lightning, torchrun or SLURM) only rank 0 writes ``experiment.yaml`` and ``status.json`` and
    prints; the other ranks run the same action silently and still exit with its code.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    prefix = f"nvp3d {action}"
    rank_zero = is_rank_zero()
    if not rank_zero:
        prefix = f"{prefix} [rank {global_rank()}]"
    lock: RunLock | None = None
    try:
        spec = load_spec(spec_path, overrides)
        from nvp3d.model.provenance import apply_sources  # imports torch: only once an action runs

        # values the dataset and the checkpoint define, unless the spec sets them (experiment.yaml records them)
        apply_sources(spec, action, say=(lambda m: print(f"{prefix}: {m}", file=out)) if rank_zero else None)
        results_dir = prepare_results_dir(spec, action, write_spec=False)
        # one run per results folder, locked before anything is written into it (rank 0 / the launcher only)
        lock = RunLock(results_dir, action, enabled=rank_zero, warn=lambda m: print(f"{prefix}: warning: {m}", file=err))
        lock.acquire()
        from nvp3d.training.preflight import preflight  # torch: not imported by the CLI until an action runs

        preflight(action, spec, results_dir)  # e.g. a resume checkpoint of other sizes: before experiment.yaml
        if rank_zero:
            dump_spec(spec, results_dir / EXPERIMENT_FILENAME)
    except SpecError as exc:
        if lock is not None:
            lock.release()
        return int(report_error(prefix, exc, verbose=verbose, err=err))
    if rank_zero:
        print(f"{prefix}: results dir {results_dir} (resolved spec in {EXPERIMENT_FILENAME})", file=out)
    try:
        with status_run(
            results_dir / STATUS_FILENAME, f"Starting {action}.", f"{action} finished successfully.",
            enabled=rank_zero,
        ) as status:
            execute(action, spec, results_dir, status)
    except BaseException as exc:  # noqa: BLE001 - every outcome must map to an exit code
        if isinstance(exc, SystemExit):
            raise
        return int(report_error(prefix, exc, verbose=verbose, err=err))
    finally:
        lock.release()
    if rank_zero:
        print(f"{prefix}: finished successfully", file=out)
    return int(ExitCode.OK)
