"""TF32 matrix products for one run or call, restored afterwards (``train.allow_tf32``, ``inference.allow_tf32``).

``torch.backends.cuda.matmul.allow_tf32`` is process-wide; a training run or a prediction sets it only while it
runs, so that code importing nvp3d (and tests) keeps its own setting. The fp32 sparse convolutions of frustum3d's
Triton backend read the same flag.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["tf32_matmul"]


@contextlib.contextmanager
def tf32_matmul(enabled: bool) -> Iterator[None]:
    """fp32 matrix products on TF32 tensor cores (10-bit mantissa products) inside the block when ``enabled``,
    exact fp32 products otherwise; the previous setting comes back on exit."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
