"""TensorRT engines (FP32 / FP16) from the exported ONNX graphs, when the optional ``tensorrt`` package exists.

Install with the extra ``nvp3d-cli[tensorrt]`` (TensorRT >= 10) on a machine with a CUDA GPU. The graphs use
standard ONNX ops only (no plugin). Engines are built with one optimisation profile over the symbolic batch
axis (``min/opt/max_batch_size``); a static-batch graph ignores the profile. This builder is NOT tested in
nvp3d's CI (TensorRT is not installed there); only the missing-TensorRT message is.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from nvp3d.errors import TensorRTBuildError, TensorRTUnavailableError
from nvp3d.fileio import atomic_write_bytes

INSTALL_HINT = "install the optional extra (pip install 'nvp3d-cli[tensorrt]') on a machine with a CUDA GPU"


def import_tensorrt(key: str = "gen_trt_engine") -> ModuleType:
    """The ``tensorrt`` module, or :class:`TensorRTUnavailableError` with the install hint."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise TensorRTUnavailableError(
            f"{key} needs the 'tensorrt' Python package, which is not installed ({exc}); {INSTALL_HINT}, or use "
            "the ONNX file with onnxruntime (export.format: onnx)") from None


def tensorrt_available() -> bool:
    """Whether ``import tensorrt`` works here."""
    try:
        import_tensorrt()
    except TensorRTUnavailableError:
        return False
    return True


@dataclass
class EngineSettings:
    """Builder settings (the spec's ``gen_trt_engine.tensorrt`` section)."""

    fp16: bool = False
    workspace_mib: int = 1024
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 1
    timing_cache: str = ""


@dataclass
class EngineResult:
    path: Path
    bytes: int
    seconds: float
    precision: str


def build_engine(onnx_path: Path, engine_path: Path, settings: EngineSettings, key: str = "gen_trt_engine"
                 ) -> EngineResult:
    """Parse ``onnx_path`` (external data next to it is found by the parser) and write a serialized engine."""
    trt = import_tensorrt(key)
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailableError(f"{key}: building a TensorRT engine needs a CUDA GPU and none is visible")
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"{key}: TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_mib) << 20)
    if settings.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if shape and shape[0] == -1:
            dynamic = True
            rest = shape[1:]
            profile.set_shape(tensor.name, (settings.min_batch, *rest), (settings.opt_batch, *rest),
                              (settings.max_batch, *rest))
    if dynamic:
        config.add_optimization_profile(profile)
    cache_path = Path(settings.timing_cache) if settings.timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(f"{key}: TensorRT failed to build an engine from {onnx_path} (see its log)")
    atomic_write_bytes(engine_path, memoryview(serialized))
    if cache_path is not None:
        atomic_write_bytes(cache_path, memoryview(config.get_timing_cache().serialize()))
    return EngineResult(engine_path, engine_path.stat().st_size, time.perf_counter() - start,
                        "FP16" if settings.fp16 else "FP32")
