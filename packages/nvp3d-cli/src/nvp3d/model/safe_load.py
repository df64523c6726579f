"""Reading checkpoint files safely, with one-line errors that name the file and what is wrong with it.

Every ``.pth`` nvp3d reads goes through :func:`load_checkpoint_file`, which uses ``torch.load(weights_only=True)``:
the unpickler then only rebuilds tensors, plain containers and the few types allow-listed in
:data:`EXTRA_SAFE_GLOBALS`, so a crafted file cannot run code while it is read. Our own checkpoints (Lightning's
dict with ``state_dict``, optimizer and scheduler states, loop and callback states) need nothing more.

Failures become :class:`CheckpointReadError` (a spec error: exit code 2) with a message such as
``train.resume_training_checkpoint_path=/r/x.pth is empty (0 bytes): ...`` instead of an ``EOFError`` traceback.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nvp3d.errors import SpecError

#: Types outside torch's default weights-only allow-list that our checkpoints may hold (none today; add a
#: class here, never a function, when a checkpoint needs one).
EXTRA_SAFE_GLOBALS: list[Any] = []

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


class CheckpointReadError(SpecError):
    """A checkpoint file cannot be used: empty, truncated, not a checkpoint, unsafe, or of the other stage."""


def _label(path: Path, key: str | None) -> str:
    return f"{key}={path}" if key else str(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].strip() if text else type(exc).__name__


def load_checkpoint_file(path: str | Path, key: str | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; every failure is one :class:`CheckpointReadError` line.

    ``key`` is the spec key the path came from (named in the message). A pickle that needs anything beyond
    tensors and plain data (e.g. a call of ``os.system`` or ``open``) is refused before any of it runs.
    """
    p = Path(path)
    label = _label(p, key)
    fix = "point it at a checkpoint written by nvp3d train, or delete the file to start afresh"
    if not p.is_file():
        raise CheckpointReadError(f"{label} does not exist or is not a file: {fix}")
    size = p.stat().st_size
    if size == 0:
        raise CheckpointReadError(f"{label} is empty (0 bytes; an interrupted copy or save?): {fix}")
    try:
        with torch.serialization.safe_globals(EXTRA_SAFE_GLOBALS):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = _GLOBAL_RE.search(text)
        if found or "Unsupported global" in text or "Unsupported class" in text:
            what = f" (it wants to call or build {found.group(1)})" if found else ""
            raise CheckpointReadError(
                f"{label} was refused: it holds Python objects beyond tensors and plain data{what}, which could run "
                "code when loaded; use a checkpoint written by nvp3d train") from None
        raise CheckpointReadError(f"{label} is not a readable PyTorch checkpoint ({size} bytes; {_first_line(exc)}): {fix}"
                                  ) from None
    except Exception as exc:  # noqa: BLE001 - garbage makes the unpickler fail in many ways (IndexError, ...)
        reason = "truncated or corrupt" if isinstance(exc, EOFError | RuntimeError | zipfile.BadZipFile) else \
            "not a readable PyTorch checkpoint"
        raise CheckpointReadError(f"{label} is {reason} ({size} bytes; {type(exc).__name__}: {_first_line(exc)}): "
                                  f"{fix}") from None


def checkpoint_stage(data: Any) -> str | None:
    """``"2d"`` / ``"3d"`` when a loaded checkpoint says which stage wrote it, else None."""
    if not isinstance(data, Mapping):
        return None
    if data.get("nvp3d_stage") in ("2d", "3d"):
        return str(data["nvp3d_stage"])
    meta = data.get("nvp3d")
    if isinstance(meta, Mapping) and meta.get("stage") in ("2d", "3d"):
        return str(meta["stage"])
    return None
