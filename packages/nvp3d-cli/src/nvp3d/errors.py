"""Exception types of nvp3d and the exit codes they map to.

Every error a user can cause (bad spec, bad override, missing data, an unusable export input) is a
``ValueError`` or ``FileNotFoundError`` subclass whose message is one readable line naming the file or key
and the fix. The CLI turns them into that one line on stderr plus a distinct exit code, so scripts can tell
"your spec is wrong" from "your data is wrong" from "nvp3d crashed".
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of ``nvp3d`` (documented in the package README)."""

    OK = 0
    INTERNAL_ERROR = 1  # an unexpected exception inside an action (traceback with --verbose)
    BAD_INPUT = 2  # spec file / YAML / key / type / range / override / CLI usage error
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


# ------------------------------------------------------------------ export / gen_trt_engine


class ExportInputError(ValueError):
    """A spec value of the export/gen_trt_engine section cannot be used (message names the key)."""


class ExportFileNotFoundError(FileNotFoundError):
    """``export.checkpoint`` or ``gen_trt_engine.onnx_file`` names a file that does not exist."""


class WrongStageCheckpointError(ExportInputError):
    """The checkpoint holds the other stage's weights (a 2D checkpoint where 3D weights are needed, a bare
    3D decoder or VGGT backbone file where the 2D model is needed)."""


class UnwritableOutputError(ExportInputError):
    """An output path cannot be written (missing permission, a folder in the way, read-only file system)."""


class TensorRTUnavailableError(ExportInputError):
    """The optional ``tensorrt`` package (or a CUDA GPU) is missing, so no engine can be built."""


class TensorRTBuildError(RuntimeError):
    """TensorRT is installed but could not parse the graph or build the engine (its log has the details)."""


class OnnxMismatchError(ValueError):
    """The exported graph run in onnxruntime disagrees with PyTorch beyond the tolerance."""
