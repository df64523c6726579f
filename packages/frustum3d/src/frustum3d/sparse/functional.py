"""Functional sparse ops: convolution, transposed convolution and max pooling on :class:`SparseVoxels`.

Coordinates are data: only features (and weights) carry gradients. The convolution autograd function calls
the selected backend (``torch`` or ``triton``, see :mod:`frustum3d.sparse.backends`) for the forward pass,
the input gradient and the weight gradient.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from .backends import get_backend
from .coords import CoordinateSet, SparseCoordinateError, generative_key
from .kernel_map import KernelMap, get_kernel_map, kernel_offsets
from .tensor import SparseVoxels

__all__ = [
    "apply_kernel_map",
    "conv_output_set",
    "sparse_conv3d",
    "sparse_conv_transpose3d",
    "sparse_max_pool3d",
    "transposed_output_set",
]


class _SparseConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feats: Tensor, weight: Tensor, kmap: KernelMap, backend: ModuleType) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(feats, weight)
        ctx.kmap = kmap
        ctx.backend = backend
        return backend.conv_forward(feats.contiguous(), weight.contiguous(), kmap)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        feats, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        need_feats, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        both = getattr(ctx.backend, "conv_backward", None)  # a backend may share work between the two gradients
        if both is not None:
            grad_feats, grad_weight = both(feats.contiguous(), grad_out, weight.contiguous(), ctx.kmap,
                                           need_feats, need_weight)
            return grad_feats, grad_weight, None, None
        grad_feats = grad_weight = None
        if need_feats:
            grad_feats = ctx.backend.conv_dgrad(grad_out, weight.contiguous(), ctx.kmap)
        if need_weight:
            grad_weight = ctx.backend.conv_wgrad(feats.contiguous(), grad_out, ctx.kmap)
        return grad_feats, grad_weight, None, None


def apply_kernel_map(feats: Tensor, weight: Tensor, kmap: KernelMap, backend: ModuleType | None = None) -> Tensor:
    """``out[q] = sum_k feats[kmap.nbr[q, k]] @ weight[k]`` (differentiable w.r.t. feats and weight)."""
    if weight.dim() != 3 or weight.shape[0] != kmap.kernel_volume or weight.shape[1] != feats.shape[1]:
        raise ValueError(
            f"weight must be (K^3={kmap.kernel_volume}, C_in={feats.shape[1]}, C_out), got {tuple(weight.shape)}"
        )
    dev = feats.device.type
    if torch.is_autocast_enabled(dev):
        # Under autocast the conv runs in the autocast dtype, like torch's own conv / matmul ops.
        feats = feats.to(torch.get_autocast_dtype(dev))
    if weight.dtype != feats.dtype:
        weight = weight.to(feats.dtype)
    be = backend if backend is not None else get_backend(feats.device)
    return _SparseConvFunction.apply(feats, weight, kmap, be)


def _kernel_size_of(weight: Tensor) -> int:
    kv = int(weight.shape[0])
    k = round(kv ** (1.0 / 3.0))
    for cand in (k - 1, k, k + 1):
        if cand > 0 and cand**3 == kv:
            return cand
    raise ValueError(f"weight.shape[0]={kv} is not a cube K^3")


def conv_output_set(x: CoordinateSet, stride: int) -> CoordinateSet:
    """Output coordinates of a conv: the input set (stride 1) or its floor-downsampled set (cached)."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return x if stride == 1 else x.downsample(stride)


def transposed_output_set(
    x: CoordinateSet,
    kernel_size: int,
    stride: int,
    generative: bool,
    out_coords: CoordinateSet | None = None,
) -> CoordinateSet:
    """Output coordinates of a transposed conv at stride ``x.stride // stride``.

    Explicit ``out_coords`` win; else generative mode makes every voxel ``p + offset_k * s_out``; else the finer
    set this one was downsampled from (cached link) is reused, as MinkowskiEngine does.
    """
    if stride < 1 or x.stride % stride != 0:
        raise SparseCoordinateError(
            f"transposed conv stride {stride} must divide the input tensor stride {x.stride}"
        )
    out_stride = x.stride // stride
    if out_coords is not None:
        if out_coords.stride != out_stride:
            raise SparseCoordinateError(
                f"out_coords has stride {out_coords.stride}, expected {out_stride} (= {x.stride} / {stride})"
            )
        return out_coords
    if generative:
        return x.generate(kernel_offsets(kernel_size, 1), out_stride, generative_key(kernel_size, stride))
    if stride == 1:
        return x
    fine = x.finer.get(out_stride)
    if fine is None:
        raise SparseCoordinateError(
            f"no cached stride-{out_stride} coordinates for this stride-{x.stride} tensor; pass out_coords=... "
            "or use generative=True"
        )
    return fine


def sparse_conv3d(
    x: SparseVoxels,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int = 1,
    dilation: int = 1,
    out_coords: SparseVoxels | CoordinateSet | None = None,
) -> SparseVoxels:
    """Sparse convolution (MinkowskiEngine semantics): submanifold at stride 1, floor-downsampled otherwise.

    ``out[q] = bias + sum_k x[q + offset_k * x.stride] @ weight[k]``; ``weight`` is ``(K^3, C_in, C_out)``.
    """
    k = _kernel_size_of(weight)
    cin = x.coordinate_set
    if out_coords is not None:
        cout = out_coords.coordinate_set if isinstance(out_coords, SparseVoxels) else out_coords
        if cout.stride != x.stride * stride:
            raise SparseCoordinateError(f"out_coords stride {cout.stride} != {x.stride} * {stride}")
    else:
        cout = conv_output_set(cin, stride)
    if k == 1 and cout is cin:
        feats = x.feats @ weight[0].to(x.dtype)  # autocast (if on) applies to the matmul itself
    else:
        kmap = get_kernel_map(cin, cout, k, dilation, transposed=False)
        feats = apply_kernel_map(x.feats, weight, kmap)
    if bias is not None:
        feats = feats + bias.to(feats.dtype)
    return SparseVoxels.from_set(cout, feats)


def sparse_conv_transpose3d(
    x: SparseVoxels,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int = 2,
    generative: bool = False,
    out_coords: SparseVoxels | CoordinateSet | None = None,
) -> SparseVoxels:
    """Transposed sparse convolution to stride ``x.stride // stride``: ``out[p + offset_k * s_out] += x[p] @ W[k]``."""
    k = _kernel_size_of(weight)
    target = out_coords.coordinate_set if isinstance(out_coords, SparseVoxels) else out_coords
    cout = transposed_output_set(x.coordinate_set, k, stride, generative, target)
    kmap = get_kernel_map(x.coordinate_set, cout, k, 1, transposed=True)
    feats = apply_kernel_map(x.feats, weight, kmap)
    if bias is not None:
        feats = feats + bias.to(feats.dtype)
    return SparseVoxels.from_set(cout, feats)


def sparse_max_pool3d(x: SparseVoxels, kernel_size: int, stride: int = 1, dilation: int = 1) -> SparseVoxels:
    """Max over the kernel window (MinkowskiEngine ``MinkowskiMaxPooling``): output set as for a conv.

    Outputs always have at least one input in their window, so no ``-inf`` survives.
    """
    cin = x.coordinate_set
    cout = conv_output_set(cin, stride)
    kmap = get_kernel_map(cin, cout, kernel_size, dilation, transposed=False)
    nbr = kmap.nbr.to(torch.int64)
    if kmap.num_out == 0:
        return SparseVoxels.from_set(cout, x.feats.new_zeros((0, x.num_channels)))
    valid = nbr >= 0
    gathered = x.feats[nbr.clamp(min=0)]  # (N_out, KV, C)
    fill = torch.finfo(x.dtype).min if x.dtype.is_floating_point else torch.iinfo(x.dtype).min
    gathered = gathered.masked_fill(~valid[:, :, None], fill)
    return SparseVoxels.from_set(cout, gathered.amax(dim=1))
