"""Tracing a module to ONNX with the TorchScript exporter, and checking the graph with onnxruntime.

Exporter choice: ``torch.onnx.export(..., dynamo=False)``. The dynamo exporter needs ``onnxscript``, which
is not a dependency of nvp3d; the TorchScript tracer handles every op of the model (GridSample for
deformable attention, Einsum, Resize, LayerNormalization at opset >= 17) and supports a symbolic batch axis.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nvp3d.errors import ExportInputError, OnnxMismatchError
from nvp3d.export.files import total_size, write_onnx_atomically

#: GridSample (deformable attention) entered the ONNX standard at opset 16
MIN_OPSET = 16
#: relative tolerance of the onnxruntime check (fp32): max|ort - torch| / max|torch| per output
DEFAULT_RTOL = 1e-4
BATCH_AXIS = "batch"


@dataclass
class OnnxExportResult:
    """What one export wrote and how long it took."""

    path: Path
    files: list[Path]
    bytes: int
    seconds: float
    input_names: list[str]
    output_names: list[str]
    dynamic_batch: bool
    opset: int
    external_data: bool = field(init=False)

    def __post_init__(self) -> None:
        self.external_data = len(self.files) > 1


def check_opset(opset: int, key: str = "export.opset_version") -> int:
    """Opsets below :data:`MIN_OPSET` cannot express the deformable-attention sampling (GridSample)."""
    if opset < MIN_OPSET:
        raise ExportInputError(f"{key}={opset} is too old: the graph needs GridSample (opset >= {MIN_OPSET}); "
                               "use 17")
    return opset


def dynamic_axes_for(input_names: Sequence[str], output_names: Sequence[str],
                     static_outputs: Sequence[str] = ()) -> dict[str, dict[int, str]]:
    """Axis 0 of every input and output is the symbolic ``batch`` (except outputs listed as static)."""
    names = [*input_names, *(n for n in output_names if n not in static_outputs)]
    return {name: {0: BATCH_AXIS} for name in names}


def export_onnx(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int = 17,
    dynamic_batch: bool = True,
    static_outputs: Sequence[str] = (),
    verbose: bool = False,
) -> OnnxExportResult:
    """Trace ``module`` on ``example_inputs`` and write the graph to ``path`` atomically.

    The module must be in eval mode; tracing runs under ``no_grad``. Graphs above 2 GB get one external data
    file ``<path>.data``; smaller ones are self-contained.
    """
    check_opset(opset)
    axes = dynamic_axes_for(input_names, output_names, static_outputs) if dynamic_batch else None

    def write(tmp: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(
                module, example_inputs, str(tmp), input_names=list(input_names), output_names=list(output_names),
                opset_version=opset, dynamic_axes=axes, do_constant_folding=True, dynamo=False, verbose=verbose,
            )

    start = time.perf_counter()
    files = write_onnx_atomically(path, write)
    seconds = time.perf_counter() - start
    return OnnxExportResult(path, files, total_size(files), seconds, list(input_names), list(output_names),
                            dynamic_batch, opset)


def max_relative_error(ref: np.ndarray, got: np.ndarray) -> float:
    """``max|got - ref| / max|ref|`` over the finite entries; infinite entries must match exactly.

    Returns ``inf`` on a shape mismatch or when the non-finite patterns differ.
    """
    ref = np.asarray(ref)
    got = np.asarray(got)
    if ref.shape != got.shape:
        return float("inf")
    if ref.dtype.kind in "iub":
        return 0.0 if np.array_equal(ref, got) else float("inf")
    ref = ref.astype(np.float64)
    got = got.astype(np.float64)
    finite = np.isfinite(ref)
    if not np.array_equal(finite, np.isfinite(got)) or not np.array_equal(ref[~finite], got[~finite]):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = np.abs(ref[finite]).max()
    diff = np.abs(got[finite] - ref[finite]).max()
    return float(diff / scale) if scale > 0 else float(diff)


def run_onnxruntime(path: Path, feeds: dict[str, np.ndarray], threads: int | None = None) -> dict[str, np.ndarray]:
    """Run the graph at ``path`` on onnxruntime's CPU provider; returns ``{output name: array}``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def compare_outputs(reference: dict[str, torch.Tensor | np.ndarray], got: dict[str, np.ndarray],
                    rtol: float = DEFAULT_RTOL, raise_on_mismatch: bool = True) -> dict[str, float]:
    """Per-output max relative error of ``got`` (onnxruntime) against ``reference`` (PyTorch).

    Raises :class:`OnnxMismatchError` naming the worst output when any error exceeds ``rtol``.
    """
    errors: dict[str, float] = {}
    for name, ref in reference.items():
        if name not in got:
            raise OnnxMismatchError(f"exported graph has no output {name!r} (outputs: {sorted(got)})")
        ref_np = ref.detach().cpu().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
        errors[name] = max_relative_error(ref_np, got[name])
    worst = max(errors, key=errors.get) if errors else None
    if raise_on_mismatch and worst is not None and not errors[worst] <= rtol:
        raise OnnxMismatchError(f"onnxruntime output {worst!r} differs from PyTorch by relative error "
                                f"{errors[worst]:.3g} (> {rtol:g}); the export is not faithful")
    return errors
