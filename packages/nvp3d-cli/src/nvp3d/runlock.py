"""One run at a time per results folder: the ``.nvp3d.lock`` file of an action's results dir.

Two trainings into one ``results_dir`` used to both exit 0 while overwriting each other's checkpoints, latest
pointer, status.json and experiment.yaml. :class:`RunLock` creates the lock file exclusively (``O_EXCL``) with
the holder's pid, host, action and start time, before anything is written into the folder; a second run
fails with exit code 2 naming the holder. A lock left by a process that no longer exists on this host (killed
with SIGKILL, a crashed node) is taken over with a warning; a lock from another host cannot be checked and
is respected (the message says which file to delete if that run is gone).

Only the launching process takes the lock (rank 0 of a torchrun/SLURM job, the parent of Lightning-spawned
DDP processes): the runner passes ``enabled=is_rank_zero()``, so there is one lock per run, not per rank.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nvp3d.errors import SpecError

LOCK_NAME = ".nvp3d.lock"


class ResultsDirBusyError(SpecError):
    """Another nvp3d run holds the results folder (exit code 2)."""


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(path: Path) -> dict[str, Any] | None:
    """The holder record of a lock file, or None when it is unreadable (half-written or corrupt)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class RunLock:
    """Exclusive lock of ``results_dir`` for ``action``; ``acquire()`` before writing, ``release()`` at the end."""

    def __init__(self, results_dir: Path, action: str, *, enabled: bool = True,
                 warn: Callable[[str], None] = print) -> None:
        self.path = Path(results_dir) / LOCK_NAME
        self.action = action
        self.enabled = enabled
        self.warn = warn
        self.held = False

    def _record(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "action": self.action,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def _is_stale(self, holder: dict[str, Any] | None) -> bool:
        if holder is None:  # unreadable: stale unless it is being written right now
            try:
                return time.time() - self.path.stat().st_mtime > 5.0
            except FileNotFoundError:
                return True
        if holder.get("host") != socket.gethostname():
            return False
        return not pid_alive(int(holder.get("pid", -1)))

    def acquire(self) -> None:
        """Create the lock file; take over a stale one; ResultsDirBusyError when a live run holds it."""
        if not self.enabled:
            return
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except OSError as exc:
                if not isinstance(exc, FileExistsError):  # read-only folder or file system: one line, exit 2
                    raise SpecError(f"cannot write in results dir {self.path.parent} ({exc.strerror or exc}); set "
                                    f"results_dir or {self.action}.results_dir to a writable folder") from None
                holder = read_lock(self.path)
                if not self._is_stale(holder):
                    h = holder or {}
                    raise ResultsDirBusyError(
                        f"results dir {self.path.parent} is in use by nvp3d {h.get('action', '?')} (pid "
                        f"{h.get('pid', '?')} on host {h.get('host', '?')}, since {h.get('started', '?')}): wait for "
                        f"it to finish or set another results_dir (if that run is gone, delete {self.path})") from None
                h = holder or {}
                self.warn(f"taking over the stale lock {self.path} of pid {h.get('pid', '?')} on host "
                          f"{h.get('host', '?')} (that process no longer exists)")
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._record(), f)
            self.held = True
            return
        raise ResultsDirBusyError(f"could not lock results dir {self.path.parent} ({self.path} keeps reappearing): "
                                  "another run is starting there; set another results_dir")

    def release(self) -> None:
        """Remove the lock file when this process still holds it."""
        if not self.held:
            return
        self.held = False
        holder = read_lock(self.path)
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
