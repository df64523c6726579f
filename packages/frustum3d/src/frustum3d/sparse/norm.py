"""Normalisation on sparse features: per-batch-item instance norm and batch norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tensor import SparseVoxels

__all__ = ["SparseBatchNorm", "SparseInstanceNorm", "instance_norm_rows", "sparse_instance_norm"]


def _block_means(x: Tensor, counts: list[int]) -> Tensor:
    """``[B, C]`` column means of the contiguous row blocks of ``x`` with ``counts`` rows each (0 for an empty one).

    One plain reduction per block, sized by the host-side counts (no device tensor built from them: that would be
    a blocking copy). No atomics (an ``index_add_`` of N rows into B rows serialises on a GPU) and no TF32 (a
    one-hot matmul would round the inputs to 10 mantissa bits under ``allow_tf32``)."""
    blocks = zip(torch.split(x, counts), counts, strict=True)
    return torch.stack([blk.mean(dim=0) if n else x.new_zeros(x.shape[1]) for blk, n in blocks])


class _BatchedInstanceNorm(torch.autograd.Function):
    """Instance norm of the row blocks of several batch items with a hand-written backward.

    Autograd through per-block ``mean / sub / mul / mean / rsqrt / mul`` records about 7 ops per block and per
    direction; this Function launches two reductions per block and two or three element-wise ops per block,
    forward and backward (the 3D training step is bound by kernel launches: 36 norm calls per step). The
    statistics reach the rows of their block by broadcasting over the block's slice, written in place into one
    output: no gather by batch index, which cost 1.1 ms per call on the 14M candidate rows of a batch-4 256^3
    frame (an ``index_select`` of the ``[B, C]`` statistics, H100, stop 46), and no accumulating ``index_put``
    in the backward, which CUDA runs nearly serially (pytorch/pytorch#41162).

    ``dx = inv * (g - mean_b(g) - xhat * mean_b(g * xhat))`` with ``xhat = (x - mean_b) * inv``.
    """

    @staticmethod
    def forward(ctx, f: Tensor, counts: list[int], eps: float) -> Tensor:  # type: ignore[override]
        means = _block_means(f, counts)
        xhat = torch.empty_like(f)
        for b, (src, dst) in enumerate(zip(torch.split(f, counts), torch.split(xhat, counts), strict=True)):
            torch.sub(src, means[b], out=dst)
        inv = torch.rsqrt(_block_means(xhat * xhat, counts) + eps)  # [B, C]
        for b, dst in enumerate(torch.split(xhat, counts)):
            dst.mul_(inv[b])
        ctx.save_for_backward(xhat, inv)
        ctx.counts = counts
        return xhat

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        xhat, inv = ctx.saved_tensors
        counts = ctx.counts
        mg, mgx = _block_means(g, counts), _block_means(g * xhat, counts)
        dx = torch.empty_like(g)
        for b, (gb, xb, dst) in enumerate(zip(torch.split(g, counts), torch.split(xhat, counts),
                                              torch.split(dx, counts), strict=True)):
            torch.sub(gb, mg[b], out=dst)
            dst.addcmul_(xb, mgx[b], value=-1.0)
            dst.mul_(inv[b])
        return dx, None, None


def instance_norm_rows(f: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Instance norm of one batch item's ``(N, C)`` voxel features (N > 1) as a training-mode batch norm over its
    rows, the same maths (biased variance, per channel), in one fused statistics pass and one apply pass with
    float32 accumulation, and a fused backward; without running statistics.

    The explicit form (cast to float32, mean, centre, square, mean, rsqrt, scale, affine, cast back) takes about
    ten passes over the features and as many autograd nodes: 1.5 ms per norm on the 3.6M candidate voxels of the
    256^3 level (H100, bf16, stop 44). Used on CUDA for batch size 1; the CPU path keeps the explicit form (the
    CPU tests' and demo's trajectories are unchanged by it)."""
    return F.batch_norm(f, None, None, weight, bias, training=True, eps=eps).to(f.dtype)


def sparse_instance_norm(
    x: SparseVoxels, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-8
) -> SparseVoxels:
    """``(f - mean_b) / sqrt(var_b + eps)`` per batch item b over its voxels (biased variance), then affine.

    Half-precision features are normalised in float32 and cast back.
    """
    f = x.feats
    if x.num_voxels == 0:
        return x
    if x.batch_size == 1 and f.is_cuda and x.num_voxels > 1:
        return x.replace_feats(instance_norm_rows(f, weight, bias, eps))
    acc = torch.float32 if f.dtype in (torch.float16, torch.bfloat16) else f.dtype
    fa = f.to(acc)
    # Rows are sorted by batch index, so every batch item is one contiguous block of rows. Statistics are
    # reduced per block; several items go through _BatchedInstanceNorm, whose explicit backward avoids both the
    # per-block autograd ops and the accumulating index_put of a ``stats[batch]`` gather's autograd backward
    # (which made the 256^3 decoder training step about 30x slower on an H100).
    if x.batch_size == 1:
        mean = fa.mean(dim=0, keepdim=True)
        d = fa - mean
        y = d * torch.rsqrt((d * d).mean(dim=0, keepdim=True) + eps)
    else:
        counts = x.coordinate_set.batch_counts()  # one host read per coordinate set, shared by its layers
        y = _BatchedInstanceNorm.apply(fa, counts, float(eps))
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return x.replace_feats(y.to(f.dtype))


class SparseInstanceNorm(nn.Module):
    """Instance norm per batch item (MinkowskiEngine ``MinkowskiInstanceNorm``; eps 1e-8, biased variance)."""

    def __init__(self, num_features: int, eps: float = 1e-8, affine: bool = True) -> None:
        super().__init__()
        self.num_features, self.eps = int(num_features), float(eps)
        if affine:
            self.weight = nn.Parameter(torch.ones(self.num_features))
            self.bias = nn.Parameter(torch.zeros(self.num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        if x.num_channels != self.num_features:
            raise ValueError(f"SparseInstanceNorm: input has {x.num_channels} channels, expected {self.num_features}")
        return sparse_instance_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}"


class SparseBatchNorm(nn.Module):
    """``torch.nn.BatchNorm1d`` over all voxels of the batch (attribute ``bn`` as in MinkowskiEngine)."""

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, eps=eps, momentum=momentum, affine=affine,
                                 track_running_stats=track_running_stats)

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        return x.replace_feats(self.bn(x.feats))
