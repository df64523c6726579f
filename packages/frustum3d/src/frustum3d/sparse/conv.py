"""Convolution modules: ``SparseConv3d`` (submanifold / strided) and ``SparseConvTranspose3d`` (incl. generative)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .coords import CoordinateSet
from .functional import sparse_conv3d, sparse_conv_transpose3d
from .tensor import SparseVoxels

__all__ = ["SparseConv3d", "SparseConvTranspose3d"]


class _SparseConvBase(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, bias: bool) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("kernel_size", kernel_size),
                        ("stride", stride)):
            if int(v) < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be >= 1, got {v}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = int(kernel_size)
        self.stride = int(stride)
        # (K^3, C_in, C_out), offset index with x fastest (MinkowskiEngine kernel layout).
        self.weight = nn.Parameter(torch.empty(self.kernel_size**3, self.in_channels, self.out_channels))
        self.bias = nn.Parameter(torch.empty(self.out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform init with bound ``1 / sqrt(C_in * K^3)`` (fan-in of one output)."""
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size**3)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def _check(self, x: SparseVoxels) -> None:
        if not isinstance(x, SparseVoxels):
            raise TypeError(f"{type(self).__name__} expects SparseVoxels, got {type(x).__name__}")
        if x.num_channels != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: input has {x.num_channels} channels, expected {self.in_channels}"
            )


class SparseConv3d(_SparseConvBase):
    """Sparse 3D convolution, MinkowskiEngine semantics.

    ``stride == 1``: submanifold (output coordinates = input coordinates). ``stride > 1``: output coordinates are
    the input coordinates floored to multiples of ``x.stride * stride``. Output q reads inputs at
    ``q + offset_k * x.stride`` with centred offsets for odd K and one-sided ``0..K-1`` for even K.
    ``out_coords`` (optional, at stride ``x.stride * stride``) picks the output set explicitly.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = False,
    ) -> None:
        if int(dilation) < 1:
            raise ValueError(f"SparseConv3d: dilation must be >= 1, got {dilation}")
        self.dilation = int(dilation)
        super().__init__(in_channels, out_channels, kernel_size, stride, bias)

    def forward(self, x: SparseVoxels, out_coords: SparseVoxels | CoordinateSet | None = None) -> SparseVoxels:
        self._check(x)
        return sparse_conv3d(x, self.weight, self.bias, self.stride, self.dilation, out_coords)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"dilation={self.dilation}, bias={self.bias is not None}")


class SparseConvTranspose3d(_SparseConvBase):
    """Sparse transposed 3D convolution from stride ``s`` to ``s / stride``: ``out[p + off_k * s_out] += x[p] @ W[k]``.

    Output coordinates: ``out_coords`` when given (a SparseVoxels / CoordinateSet at the finer stride); else
    with ``generative=True`` every reachable fine voxel (k4/s2: 64 children per voxel, MinkowskiEngine's
    ``expand_coordinates=True``); else the finer coordinates the input was downsampled from (cached link).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 2,
        bias: bool = False,
        generative: bool = False,
    ) -> None:
        self.generative = bool(generative)
        super().__init__(in_channels, out_channels, kernel_size, stride, bias)

    def forward(self, x: SparseVoxels, out_coords: SparseVoxels | CoordinateSet | None = None) -> SparseVoxels:
        self._check(x)
        return sparse_conv_transpose3d(x, self.weight, self.bias, self.stride, self.generative, out_coords)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"bias={self.bias is not None}, generative={self.generative}")


def dense_weight(weight: Tensor, kernel_size: int) -> Tensor:
    """Convert ``(K^3, C_in, C_out)`` (x fastest) to ``torch.nn.functional.conv3d`` layout ``(C_out, C_in, Kx, Ky, Kz)``."""
    k = kernel_size
    return weight.reshape(k, k, k, weight.shape[1], weight.shape[2]).permute(4, 3, 2, 1, 0).contiguous()
