"""Error types raised for bad user data.

Every error names the offending file (and, where known, the frame) and says how to fix it, so that a
corrupt frame deep inside a 100k-frame split is found from one line of the traceback.
"""

from __future__ import annotations

from collections.abc import Sequence


class DatasetFormatError(ValueError):
    """A file exists but its content does not match the on-disk format (key, shape, dtype, values)."""


class MissingDataError(FileNotFoundError):
    """A file that the format or the configuration requires is absent."""


class BadFramesError(ValueError):
    """One or more frames of a split cannot be loaded; ``problems`` lists ``(frame_key, message)``."""

    def __init__(self, split: str, problems: Sequence[tuple[str, str]], total: int):
        self.split = split
        self.problems = list(problems)
        self.total = total
        shown = "\n".join(f"  {key}: {msg}" for key, msg in self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(
            f"{len(self.problems)} of {total} frames in split {split!r} are bad:\n{shown}{more}\n"
            "Fix or remove these frames, or set skip_bad=True to skip them (they are then counted in "
            "dataset.skipped)."
        )


class UnsupportedURLError(ValueError):
    """A dataset path is a URL whose protocol fsspec does not know."""


class RemoteSupportError(ImportError):
    """Reading a URL needs an optional package that is not installed (the message says what to install)."""


class RemoteAccessError(PermissionError):
    """The object store refused the request or no credentials were found (the message names the variables)."""


class UnsafeArchiveError(DatasetFormatError):
    """An archive holds a member that would land outside its target folder (absolute path, ``..``, link)."""
