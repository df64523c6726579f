"""Residual building blocks."""

from __future__ import annotations

from typing import Literal

from torch import nn

from .conv import SparseConv3d
from .norm import SparseBatchNorm, SparseInstanceNorm
from .tensor import SparseVoxels

__all__ = ["SparseBasicBlock3D", "make_norm"]


def make_norm(norm: str, channels: int) -> nn.Module:
    """``"instance"`` (eps 1e-8, MinkowskiEngine) or ``"batch"`` normalisation for ``channels``."""
    if norm == "instance":
        return SparseInstanceNorm(channels)
    if norm == "batch":
        return SparseBatchNorm(channels)
    raise ValueError(f"norm must be 'instance' or 'batch', got {norm!r}")


class SparseBasicBlock3D(nn.Module):
    """ResNet basic block (MinkowskiEngine ``BasicBlock``): conv(k, stride) -> norm -> ReLU -> conv(k) -> norm,
    plus the residual, then ReLU.

    The residual is the input itself when shapes agree; otherwise ``downsample`` (a module taking and returning
    SparseVoxels) or, when that is None, a default projection: ``SparseConv3d(k=1)`` + norm at stride 1 and
    ``SparseConv3d(k=downsample_kernel_size, stride)`` + norm when strided (the reference networks use k1 and k4).
    Strided conv1 and the strided projection land on the same cached coordinate set, so they add row by row.
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        norm: Literal["instance", "batch"] = "instance",
        kernel_size: int = 3,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        downsample_kernel_size: int = 4,
        downsample_bias: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = SparseConv3d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation)
        self.norm1 = make_norm(norm, out_channels)
        self.conv2 = SparseConv3d(out_channels, out_channels, kernel_size, stride=1, dilation=dilation)
        self.norm2 = make_norm(norm, out_channels)
        self.relu = nn.ReLU()
        if downsample is None and (in_channels != out_channels or stride != 1):
            k = 1 if stride == 1 else downsample_kernel_size
            downsample = nn.Sequential(
                SparseConv3d(in_channels, out_channels, k, stride=stride, bias=downsample_bias),
                make_norm(norm, out_channels),
            )
        self.downsample = downsample

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        out = self.conv1(x)
        out = self.norm1(out)
        out = out.replace_feats(self.relu(out.feats))
        out = self.conv2(out)
        out = self.norm2(out)
        residual = x if self.downsample is None else self.downsample(x)
        out = out + residual
        return out.replace_feats(self.relu(out.feats))
