"""Errors raised inside DataLoader worker processes, reported like the same error in the main process.

PyTorch re-raises a worker's exception in the main process as the same type, but with the message
``Caught X in DataLoader worker process 0.\\nOriginal Traceback ...`` (the whole worker traceback), so a
bad image gave a 40-line "data error" with ``num_workers > 0`` and one clean line with ``num_workers: 0``.
:func:`unwrap_worker_error` puts the original one-line message back into the exception (same type, so the
same exit code), before the runner prints it and status.json records it.
"""

from __future__ import annotations

import re

_WRAPPED = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.")


def worker_error_text(exc: BaseException) -> str | None:
    """The worker's original message when ``exc`` is a re-raised DataLoader worker error, else None."""
    text = str(exc)
    if not _WRAPPED.match(text) or "Original Traceback" not in text:
        return None
    pattern = re.compile(rf"^(?:[\w.]+\.)?{re.escape(type(exc).__name__)}: (.*)$")
    for line in reversed(text.splitlines()):
        m = pattern.match(line.strip())
        if m:
            return m.group(1)
    return None


def unwrap_worker_error(exc: BaseException) -> BaseException:
    """Replace the wrapped worker message of ``exc`` by the original one-line message (in place); returns ``exc``."""
    original = worker_error_text(exc)
    if original is not None:
        exc.args = (original,)
    return exc
