"""Checkpoint files on disk: clean failure when a save cannot be written, and pruning of old step checkpoints.

* A full disk (or any ``OSError``) during a save used to end as "internal error" with a 20 MB ``.tmp`` left
  behind. :func:`checkpoint_write_error` removes the temporary file and returns a
  :class:`CheckpointWriteError` whose one line names the checkpoint, the reason and the free space there.
* Periodic checkpoints were never pruned. :func:`prune_checkpoints` keeps the newest ``train.keep_checkpoints``
  ``model_epoch_XXX_step_XXXXX.pth`` files (by step; 0 keeps all) plus whatever the latest pointer resolves
  to, like Lightning's ``save_top_k`` without a monitored metric.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from nvp3d.errors import ExitCode

log = logging.getLogger("nvp3d.train")

#: The toolkit's checkpoint file names ``model_epoch_XXX_step_XXXXX.pth`` (epoch, step).
CHECKPOINT_RE = re.compile(r"^model_epoch_(\d{3,})_step_(\d{5,})\.pth$")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); one line with the path and the free space."""

    exit_code = ExitCode.INTERNAL_ERROR


def free_space(directory: Path) -> str:
    """Human-readable free space of the file system holding ``directory``."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return "unknown free space"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if free < 1024 or unit == "TB":
            return f"{free:.1f} {unit} free" if unit != "B" else f"{free} B free"
        free /= 1024
    return f"{free:.1f} TB free"


def checkpoint_write_error(tmp: Path, final: Path, exc: OSError) -> CheckpointWriteError:
    """Remove the half-written ``tmp`` and describe the failed save of ``final`` in one line."""
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    except OSError as cleanup:  # pragma: no cover - reported, not fatal
        log.warning("could not remove %s: %s", tmp, cleanup)
    reason = exc.strerror or str(exc) or type(exc).__name__
    return CheckpointWriteError(exc.errno, f"cannot write checkpoint {final}: {reason} ({free_space(final.parent)} "
                                f"on {final.parent}); free some space or set results_dir elsewhere, then rerun to "
                                "resume from the last checkpoint")


def prune_checkpoints(directory: Path, keep: int, protected: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` step checkpoints of ``directory`` (never ``protected``); returns them."""
    if keep <= 0:
        return []
    found = []
    for path in directory.iterdir():
        m = CHECKPOINT_RE.match(path.name)
        if m and path.is_file() and not path.is_symlink():
            found.append((int(m.group(2)), int(m.group(1)), path))
    found.sort()
    keep_paths = {p for _, _, p in found[-keep:]}
    if protected is not None:
        keep_paths.add(Path(os.path.realpath(protected)))
    removed = []
    for _, _, path in found:
        if path not in keep_paths and Path(os.path.realpath(path)) not in keep_paths:
            try:
                path.unlink()
                removed.append(path)
            except OSError as exc:
                log.warning("could not prune old checkpoint %s: %s", path, exc)
    return removed
