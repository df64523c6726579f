"""Pointwise layers on sparse features: linear and activation wrappers."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .tensor import SparseVoxels

__all__ = [
    "SparseActivation",
    "SparseELU",
    "SparseLeakyReLU",
    "SparseLinear",
    "SparseReLU",
    "SparseSigmoid",
    "SparseSoftmax",
]


class SparseLinear(nn.Module):
    """``torch.nn.Linear`` on every voxel's features (attribute ``linear`` as in MinkowskiEngine)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        return x.replace_feats(self.linear(x.feats))


class SparseActivation(nn.Module):
    """Apply a feature-wise module or function (``nn.ReLU()``, ``torch.tanh``, ...) to a sparse tensor."""

    def __init__(self, fn: nn.Module | Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        return x.replace_feats(self.fn(x.feats))


class SparseReLU(SparseActivation):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__(nn.ReLU(inplace=inplace))


class SparseLeakyReLU(SparseActivation):
    def __init__(self, negative_slope: float = 0.01, inplace: bool = False) -> None:
        super().__init__(nn.LeakyReLU(negative_slope, inplace=inplace))


class SparseELU(SparseActivation):
    def __init__(self, alpha: float = 1.0, inplace: bool = False) -> None:
        super().__init__(nn.ELU(alpha, inplace=inplace))


class SparseSigmoid(SparseActivation):
    def __init__(self) -> None:
        super().__init__(nn.Sigmoid())


class SparseSoftmax(SparseActivation):
    """Softmax over channels of each voxel (MinkowskiEngine ``MinkowskiSoftmax(dim=1)``)."""

    def __init__(self) -> None:
        super().__init__(nn.Softmax(dim=1))
