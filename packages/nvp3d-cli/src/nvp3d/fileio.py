"""The one atomic writer of nvp3d: a crash or a concurrent reader never sees a half-written file.

:func:`atomic_path_write` runs any writer on a temporary file in the target's folder and renames it onto the
target; text, bytes, JSON, PNG, NPZ, PLY and ONNX outputs all go through it. (Checkpoints are the one
exception: Lightning writes them collectively over DDP ranks, see :mod:`nvp3d.training.checkpointing`.)
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_path_write", "atomic_write_bytes", "atomic_write_text", "finite_or_none", "write_json"]


def atomic_path_write(path: str | os.PathLike[str], write: Callable[[Path], None], suffix: str = "") -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it onto ``path``.

    Parent folders are created. ``suffix`` is kept on the temporary name (some writers, e.g. ``np.savez``,
    append an extension when the name lacks it). The temporary file is removed when ``write`` fails.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _write_synced(tmp: Path, payload: bytes) -> None:
    with open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], payload: bytes | memoryview) -> Path:
    """Write ``payload`` to ``path`` atomically (fsync'ed before the rename)."""
    return atomic_path_write(path, lambda tmp: _write_synced(tmp, bytes(payload)))


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; readers see either the old file or the complete new one."""
    return atomic_write_bytes(path, text.encode(encoding))


def finite_or_none(value: Any) -> Any:
    """NaN/inf floats -> None (recursively through dicts and lists), so that the JSON is strict."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Pretty, strict JSON (NaN/inf written as null) written atomically."""
    return atomic_write_text(path, json.dumps(finite_or_none(data), indent=1, allow_nan=False) + "\n")
