"""Exception types of the nvp3d CLI and the exit codes they map to.

Every error a user can cause (bad spec, bad override, missing data) is a ``ValueError`` or
``FileNotFoundError`` subclass whose message is one readable line naming the file or key and the fix.
The CLI turns them into that one line on stderr plus a distinct exit code, so scripts can tell
"your input is wrong" from "this part of nvp3d does not exist yet" from "nvp3d crashed".
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of ``nvp3d`` (documented in the package README)."""

    OK = 0
    INTERNAL_ERROR = 1  # an unexpected exception inside an action (traceback with --verbose)
    BAD_INPUT = 2  # spec file / YAML / key / type / range / override / CLI usage error
    NOT_BUILT_YET = 3  # the action (or a library it needs) is not implemented yet
    DATA_ERROR = 4  # the spec is valid but the data or files it points to are missing or malformed
    NON_FINITE = 5  # training produced a NaN/inf loss or gradient (lower train.optim.lr)
    INTERRUPTED = 130  # Ctrl-C
    TERMINATED = 143  # SIGTERM (training saves a checkpoint first)


class SpecError(ValueError):
    """The experiment spec (file or command-line override) is invalid; message is one line."""


class SpecFileNotFoundError(SpecError, FileNotFoundError):
    """The spec file given with ``-e/--spec`` does not exist or is not a file."""


class OverrideError(SpecError):
    """A command-line override is not of the form ``dotted.key=value`` or cannot be applied."""


class NotBuiltYetError(NotImplementedError):
    """Raised by an action whose implementation (or a library it needs) does not exist yet.

    The message names what is missing, e.g. ``not built yet: training (nvp3d.train)``.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"not built yet: {what}")
