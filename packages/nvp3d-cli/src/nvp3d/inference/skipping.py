"""Unreadable images in ``nvp3d inference``: skipped with ``dataset.skip_bad: true``, else a clean stop.

Before, one unreadable image among good ones stopped the run with no ``index.json`` at all. Now each bad image
is either skipped (listed under ``skipped`` in index.json and in the summary line; exit 0) or, without
``skip_bad``, stops the run after ``index.json`` records what was done and which image failed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Per-image errors that concern that image (its file, its pixels, its intrinsic), not the run.
IMAGE_ERRORS = (ValueError, OSError)


def skip_or_raise(spec: Any, path: Path, exc: BaseException, skipped: list[dict[str, str]], say=print) -> None:
    """Record ``path`` as skipped when ``dataset.skip_bad``; otherwise re-raise ``exc`` (caller writes the index)."""
    if not spec.dataset.skip_bad:
        raise exc
    reason = " ".join(str(exc).split()) or type(exc).__name__
    skipped.append({"image": str(path), "error": reason})
    say(f"inference: skipped {path}: {reason}")


def partial_index(images_dir: Path, entries: list[dict[str, Any]], skipped: list[dict[str, str]],
                  failed: dict[str, str] | None = None) -> dict[str, Any]:
    """The index of an interrupted run: what was written, what was skipped, and the image that failed."""
    index: dict[str, Any] = {"images_dir": str(images_dir), "num_images": len(entries), "complete": False,
                             "images": entries, "skipped": skipped}
    if failed is not None:
        index["failed"] = failed
    return index
