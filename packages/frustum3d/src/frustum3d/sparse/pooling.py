"""Sparse max pooling."""

from __future__ import annotations

from torch import nn

from .functional import sparse_max_pool3d
from .tensor import SparseVoxels

__all__ = ["SparseMaxPool3d"]


class SparseMaxPool3d(nn.Module):
    """Max pooling over a ``kernel_size^3`` window (MinkowskiEngine offsets); ``stride`` > 1 floor-downsamples.

    Defaults follow MinkowskiEngine (``stride=1``), not ``torch.nn.MaxPool3d`` (``stride=kernel_size``).
    """

    def __init__(self, kernel_size: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.dilation = int(kernel_size), int(stride), int(dilation)

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        return sparse_max_pool3d(x, self.kernel_size, self.stride, self.dilation)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"
