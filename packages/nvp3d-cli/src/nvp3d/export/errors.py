"""Errors of ``nvp3d export`` / ``nvp3d gen_trt_engine``.

Each is a ``ValueError`` or ``FileNotFoundError`` subclass whose message is one line naming the spec key
and the fix, so the CLI prints it as a data error (exit code 4) instead of a traceback.
"""

from __future__ import annotations


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
