"""Compute backends for sparse convolution, behind one interface.

Each backend module provides ``conv_forward(feats, weight, kmap)``, ``conv_dgrad(grad_out, weight, kmap)`` and
``conv_wgrad(feats, grad_out, kmap)`` on plain tensors (no autograd); :mod:`frustum3d.sparse.functional` wires
them into autograd. ``weight`` is ``(K**3, C_in, C_out)``; ``kmap`` a :class:`~frustum3d.sparse.kernel_map.KernelMap`.

Choice: ``FRUSTUM3D_SPARSE_BACKEND=torch|triton`` if set, else ``triton`` when the features are on CUDA and
Triton imports, else ``torch``. The Triton backend also runs CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before import), which the tests use.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch

__all__ = ["BACKENDS", "get_backend", "resolve_backend_name", "triton_available", "use_backend"]

BACKENDS = ("torch", "triton")
_override: list[str] = []
_triton_ok: bool | None = None


def triton_available() -> bool:
    """True when ``triton`` imports (it ships with CUDA builds of torch on Linux)."""
    global _triton_ok
    if _triton_ok is None:
        try:
            importlib.import_module("triton")
            _triton_ok = True
        except Exception:  # pragma: no cover - depends on the install
            _triton_ok = False
    return _triton_ok


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend_name(device: torch.device) -> str:
    """Backend for tensors on ``device``: override > env var > automatic choice."""
    if _override:
        name = _override[-1]
    else:
        name = os.environ.get("FRUSTUM3D_SPARSE_BACKEND", "").strip().lower()
        if name and name not in BACKENDS:
            raise ValueError(f"FRUSTUM3D_SPARSE_BACKEND must be one of {BACKENDS}, got {name!r}")
        if not name:
            name = "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("sparse backend 'triton' requested but triton is not importable")
        if device.type != "cuda" and not _interpreting():
            # Triton cannot run CPU tensors outside the interpreter: the torch backend is the CPU path.
            name = "torch"
    return name


def get_backend(device: torch.device) -> ModuleType:
    """The backend module for tensors on ``device``."""
    name = resolve_backend_name(device)
    if name == "triton":
        from . import triton_backend

        return triton_backend
    from . import torch_backend

    return torch_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (tests, benchmarks)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()
