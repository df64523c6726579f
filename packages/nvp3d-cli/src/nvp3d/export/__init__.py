"""ONNX export of NVPanoptix3D (2D model, dense and sparse 3D completion levels) and TensorRT engine building.

Public API:

* :func:`run_export` / :func:`run_gen_trt_engine` -- the ``export`` and ``gen_trt_engine`` actions
  (``fn(spec, results_dir, status) -> kpi``, in :mod:`nvp3d.export.run`);
* :func:`export_2d` / :func:`export_3d_dense` -- export an in-memory model and check it with onnxruntime;
* :class:`Export2DWrapper` (:data:`OUTPUT_NAMES_2D`), :class:`DenseCompletion64` (:data:`OUTPUT_NAMES_3D`);
* :func:`export_3d_sparse` -- the four sparse-level graphs (``max_voxels`` rows); :func:`run_exported_3d`
  -- ``FrustumDecoder.forward`` through the graphs (:func:`onnxruntime_runners` / :func:`torch_runners`);
* :func:`build_engine` -- TensorRT engine from an ONNX file (optional ``tensorrt`` package).

See ``README.md`` in this folder for the graph contracts and what runs where.
"""

from frustum3d.decoder_graphs import GRAPH_PARTS, build_sparse_graphs

from nvp3d.errors import (  # re-exported: the errors a caller of this package catches
    ExportFileNotFoundError,
    ExportInputError,
    OnnxMismatchError,
    TensorRTBuildError,
    TensorRTUnavailableError,
    UnwritableOutputError,
    WrongStageCheckpointError,
)
from nvp3d.export.model2d import INPUT_NAME_2D, OUTPUT_NAMES_2D, Export2DWrapper
from nvp3d.export.model3d import INPUT_NAMES_3D, OUTPUT_NAMES_3D, DenseCompletion64
from nvp3d.export.onnx_export import compare_outputs, export_onnx, max_relative_error, run_onnxruntime
from nvp3d.export.run import export_2d, export_3d_dense, run_export, run_gen_trt_engine
from nvp3d.export.sparse_driver import (
    DecoderSettings,
    VoxelBudgetError,
    onnxruntime_runners,
    run_exported_3d,
    torch_runners,
)
from nvp3d.export.sparse_export import export_3d_sparse, sparse_graph_paths
from nvp3d.export.tensorrt_engine import build_engine, tensorrt_available

__all__ = [
    "DecoderSettings",
    "DenseCompletion64",
    "Export2DWrapper",
    "ExportFileNotFoundError",
    "ExportInputError",
    "GRAPH_PARTS",
    "INPUT_NAMES_3D",
    "INPUT_NAME_2D",
    "OUTPUT_NAMES_2D",
    "OUTPUT_NAMES_3D",
    "OnnxMismatchError",
    "TensorRTBuildError",
    "TensorRTUnavailableError",
    "UnwritableOutputError",
    "VoxelBudgetError",
    "WrongStageCheckpointError",
    "build_engine",
    "build_sparse_graphs",
    "compare_outputs",
    "export_2d",
    "export_3d_dense",
    "export_3d_sparse",
    "export_onnx",
    "max_relative_error",
    "onnxruntime_runners",
    "run_export",
    "run_exported_3d",
    "run_gen_trt_engine",
    "run_onnxruntime",
    "sparse_graph_paths",
    "tensorrt_available",
    "torch_runners",
]
