"""Output folders given on the command line: refuse to clobber existing data, and say clearly when a folder
cannot be used (a path under a regular file, no write permission) instead of a traceback."""

from __future__ import annotations

import os
from pathlib import Path


def blocking_file(path: Path) -> Path | None:
    """The first existing non-directory among ``path`` and its parents, else None."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return None if p.is_dir() else p
    return None


def output_folder_problem(path: Path, *, overwrite: bool = False, what: str = "--out") -> str | None:
    """Why ``path`` cannot be a fresh output folder (one line with the fix), or None when it can.

    Refused: a path that is or lies under a regular file, a non-empty folder unless ``overwrite``, a folder
    (or the nearest existing parent) this process cannot write to.
    """
    blocker = blocking_file(path)
    if blocker is not None:
        where = "is a file" if blocker == path else f"lies under the file {blocker}"
        return f"{what} {path} {where}: give a folder path"
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        return f"{what} {path} is not empty: choose a new folder, or pass --overwrite to replace what it holds"
    existing = next((p for p in (path, *path.parents) if p.is_dir()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return f"{what} {path}: no write permission in {existing}: choose a writable folder"
    return None
