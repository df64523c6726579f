"""Dense references for the sparse tests: random sparse inputs and torch.nn.functional conv/pool on grids.

Imported by the test_sparse_* files (they put this folder on sys.path). Independent of frustum3d's kernel
maps: everything here goes through dense grids and torch's own conv3d / conv_transpose3d / max_pool3d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_mask(batch: int, grid: int, density: float, gen: torch.Generator) -> Tensor:
    """Random occupancy ``bool[B, G, G, G]`` with at least one voxel per batch item."""
    mask = torch.rand(batch, grid, grid, grid, generator=gen) < density
    mask[:, 0, 0, 0] = True
    return mask


def scatter_dense(coords: Tensor, feats: Tensor, stride: int, batch: int, grid: int, fill: float = 0.0) -> Tensor:
    """Differentiable ``(B, C, G, G, G)`` grid of ``feats`` at ``coords // stride`` (independent of to_dense)."""
    c = feats.shape[1]
    dense = feats.new_full((batch, grid, grid, grid, c), fill)
    xyz = coords[:, 1:] // stride
    dense = dense.index_put((coords[:, 0], xyz[:, 0], xyz[:, 1], xyz[:, 2]), feats)
    return dense.permute(0, 4, 1, 2, 3)


def gather_dense(dense: Tensor, coords: Tensor, stride: int, shift: int = 0) -> Tensor:
    """Rows ``dense[b, :, x/s + shift, ...]`` for each coordinate; cells beyond the grid read zero."""
    xyz = coords[:, 1:] // stride + shift
    need = int(xyz.max()) + 1 if xyz.numel() else 0
    size = dense.shape[2]
    if need > size:
        pad = need - size
        dense = F.pad(dense, (0, pad, 0, pad, 0, pad))
    return dense.permute(0, 2, 3, 4, 1)[coords[:, 0], xyz[:, 0], xyz[:, 1], xyz[:, 2]]


def me_padding(kernel_size: int, dilation: int) -> tuple[int, int]:
    """(left, right) padding that makes F.conv3d read MinkowskiEngine offsets (odd centred, even one-sided)."""
    left = dilation * (kernel_size // 2) if kernel_size % 2 == 1 else 0
    return left, dilation * (kernel_size - 1) - left


def dense_conv_weight(weight: Tensor, k: int) -> Tensor:
    """(K^3, Cin, Cout) with x fastest -> conv3d layout (Cout, Cin, Kx, Ky, Kz), written out tap by tap."""
    _, cin, cout = weight.shape
    taps = [weight[ix + k * iy + k * k * iz] for ix in range(k) for iy in range(k) for iz in range(k)]
    w = torch.stack(taps, 0)  # row-major (Kx, Ky, Kz)
    return w.permute(2, 1, 0).reshape(cout, cin, k, k, k)


def dense_conv(dense_in: Tensor, weight: Tensor, k: int, stride: int, dilation: int) -> Tensor:
    left, right = me_padding(k, dilation)
    x = F.pad(dense_in, (left, right, left, right, left, right))
    return F.conv3d(x, dense_conv_weight(weight, k), stride=stride, dilation=dilation)


def dense_conv_transpose(dense_in: Tensor, weight: Tensor, k: int, stride: int) -> tuple[Tensor, int]:
    """conv_transpose3d with padding 0; returns (out, shift) where dense index = fine coord + shift."""
    w = dense_conv_weight(weight, k).transpose(0, 1)  # (Cin, Cout, Kx, Ky, Kz)
    out = F.conv_transpose3d(dense_in, w, stride=stride)
    shift = k // 2 if k % 2 == 1 else 0
    return out, shift


def dense_max_pool(dense_in: Tensor, k: int, stride: int, dilation: int) -> Tensor:
    left, right = me_padding(k, dilation)
    x = F.pad(dense_in, (left, right, left, right, left, right), value=float("-inf"))
    return F.max_pool3d(x, k, stride=stride, dilation=dilation)


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / max(den, 1e-300)
