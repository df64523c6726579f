"""``status.json`` of an action: one JSON object per line, appended as the run progresses.

Format (toolkit-compatible, reference sheet section 7): every record has ``date`` ("M/D/YYYY"),
``time`` ("H:M:S"), ``status`` (STARTED | RUNNING | SUCCESS | FAILURE), ``verbosity`` and ``message``;
``kpi`` appears once known and is repeated on every later record; epoch progress fields (``epoch``,
``step``, ``max_epoch``, ``max_step``, ``time_per_epoch``, ``time_per_step``, ``eta``) may be added.

Unlike the toolkit (whose training ends on a RUNNING record), :func:`status_run` guarantees that a
run always ends with a SUCCESS or FAILURE record.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from nvp3d.worker_errors import unwrap_worker_error

STATUS_FILENAME = "status.json"

#: Progress fields the toolkit writes at each training epoch end.
EPOCH_FIELDS = ("epoch", "step", "max_epoch", "max_step", "time_per_epoch", "time_per_step", "eta")

_RESERVED = ("date", "time", "status", "verbosity", "message", "kpi")


class Status(StrEnum):
    """Values of the ``status`` field."""

    STARTED = "STARTED"
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"


FINAL_STATUSES = frozenset({Status.SUCCESS, Status.FAILURE})


def _json_safe(value: Any) -> Any:
    """Plain JSON types only: numpy/torch scalars become floats/ints, NaN/inf become null (a KPI that is not
    defined, e.g. PQ of a class never predicted, must read as a missing number, not as the string "nan")."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):  # numpy / torch scalar
        return _json_safe(value.item())
    return str(value)


class StatusLogger:
    """Appends status records to ``<results_dir>/status.json``.

    Each record is written with a single ``write`` on a file opened in append mode and then fsync'ed,
    so concurrent readers never see a partial line and earlier records are never rewritten.
    ``enabled=False`` (e.g. on non-zero distributed ranks) turns every call into a no-op.
    """

    def __init__(self, path: str | os.PathLike[str], *, enabled: bool = True, verbosity: str = "INFO") -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.verbosity = verbosity
        self.kpi: dict[str, Any] = {}
        self.last_status: Status | None = None
        self._lock = threading.Lock()
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def finished(self) -> bool:
        """True once a SUCCESS or FAILURE record has been written."""
        return self.last_status in FINAL_STATUSES

    def write(
        self,
        status: Status | str,
        message: str = "",
        *,
        kpi: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Append one record and return it. ``kpi`` entries are merged into the persistent KPI dict."""
        status = Status(str(status).upper())
        clash = [k for k in fields if k in _RESERVED]
        if clash:
            raise ValueError(f"status field {clash[0]!r} is reserved; pass it as an argument instead")
        now = datetime.now()
        record: dict[str, Any] = {
            "date": f"{now.month}/{now.day}/{now.year}",
            "time": f"{now.hour}:{now.minute}:{now.second}",
            "status": status.value,
            "verbosity": self.verbosity,
            "message": message,
        }
        with self._lock:
            if kpi:
                self.kpi.update(_json_safe(dict(kpi)))
            if self.kpi:
                record["kpi"] = dict(self.kpi)
            record.update(_json_safe(fields))
            self.last_status = status
            if self.enabled:
                line = (json.dumps(record, sort_keys=False) + "\n").encode("utf-8")
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        return record

    def started(self, message: str = "Starting.", **fields: Any) -> dict[str, Any]:
        return self.write(Status.STARTED, message, **fields)

    def running(self, message: str = "", *, kpi: Mapping[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        return self.write(Status.RUNNING, message, kpi=kpi, **fields)

    def success(self, message: str = "Finished.", *, kpi: Mapping[str, Any] | None = None, **fields: Any) -> dict:
        return self.write(Status.SUCCESS, message, kpi=kpi, **fields)

    def failure(self, message: str, **fields: Any) -> dict[str, Any]:
        return self.write(Status.FAILURE, message, **fields)

    def epoch_end(self, epoch: int, max_epoch: int, step: int, max_step: int, **extra: Any) -> dict[str, Any]:
        """RUNNING record with the toolkit's epoch progress fields (plus e.g. time_per_epoch, eta)."""
        return self.running(
            f"Epoch {epoch} of {max_epoch} finished.", epoch=epoch, max_epoch=max_epoch, step=step,
            max_step=max_step, **extra,
        )


def read_status(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Parse a status.json (JSON lines) into a list of records."""
    text = Path(path).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _failure_message(exc: BaseException) -> str:
    unwrap_worker_error(exc)  # the worker's own one-line message, not its traceback
    if isinstance(exc, KeyboardInterrupt):
        return "Interrupted by the user."
    if isinstance(exc, SystemExit):
        return f"Exited with code {exc.code}."
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def status_run(
    path: str | os.PathLike[str],
    start_message: str = "Starting.",
    success_message: str = "Finished successfully.",
    *,
    enabled: bool = True,
) -> Iterator[StatusLogger]:
    """Write STARTED, yield the logger, and guarantee a final SUCCESS or FAILURE record.

    - body returns normally (or ``SystemExit(0)``) and wrote no final record: SUCCESS ``success_message``;
    - body raises (including KeyboardInterrupt): FAILURE naming the exception, then the exception propagates;
    - body already wrote SUCCESS/FAILURE itself: nothing more is written unless it raises afterwards.
    """
    logger = StatusLogger(path, enabled=enabled)
    logger.started(start_message)
    try:
        yield logger
    except SystemExit as exc:
        if exc.code in (0, None):
            if not logger.finished:
                logger.success(success_message)
        else:
            logger.failure(_failure_message(exc))
        raise
    except BaseException as exc:
        logger.failure(_failure_message(exc), **dict(getattr(exc, "status_fields", None) or {}))  # e.g. step
        raise
    else:
        if not logger.finished:
            logger.success(success_message)
