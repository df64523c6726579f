"""frustum3d.sparse: sparse voxel tensors and sparse 3D convolution in plain PyTorch (+ Triton on CUDA).

API summary (MinkowskiEngine semantics; everything differentiable w.r.t. features and weights)
---------------------------------------------------------------------------------------------
Data model
  SparseVoxels(coords: LongTensor[N,4] (batch,x,y,z) in FINEST-grid units, multiples of `stride`,
               feats: Tensor[N,C], stride: int = 1, spatial_shape: (X,Y,Z) finest grid, batch_size: int|None)
    .coords .feats .stride .spatial_shape .batch_size .num_voxels .num_channels .device .dtype
    .coordinate_set                 shared CoordinateSet (kernel-map cache, links to finer sets)
    .replace_feats(f)               same coordinates + cache, new features
    .select(mask: bool[N])          pruning (rows stay sorted)
    .to_dense(default_value=0.)     -> Tensor[B, C, X/s, Y/s, Z/s] (voxels outside the grid dropped)
    SparseVoxels.from_dense(dense[B,C,X,Y,Z], mask[B,X,Y,Z], stride=1)
    a + b                           feature sum on identical coords, else sparse_union(a, b, mode="add")
  Rows are always sorted by (batch, x, y, z) (packed int64 key); construction sorts and permutes feats.
  sparse_cat(a, b, ...)             features concatenated on identical coordinates
  sparse_union(a, b, mode="cat"|"add")  coordinate union; absent features are zero; "cat" -> [a_or_0, b_or_0]
  sparse_features_at(src, like)    src's features at like's voxels (zero where src has none), on like's set

Modules (input and output SparseVoxels)
  SparseConv3d(in, out, kernel_size, stride=1, dilation=1, bias=False)       forward(x, out_coords=None)
      stride 1: submanifold (out coords = in coords); stride s: out = floor(coords / (x.stride*s)) * (x.stride*s)
      out[q] = sum_k x[q + off_k * x.stride] @ W[k]; odd K centred offsets, even K one-sided 0..K-1
  SparseConvTranspose3d(in, out, kernel_size, stride=2, bias=False, generative=False)  forward(x, out_coords=None)
      out stride = x.stride // stride; out[p + off_k * s_out] += x[p] @ W[k]
      output set: out_coords (SparseVoxels/CoordinateSet) if given; generative -> all reachable voxels
      (k4/s2: 64 children per voxel); else the finer set x was downsampled from (cached), else ValueError
  SparseMaxPool3d(kernel_size, stride=1, dilation=1)
  SparseInstanceNorm(num_features, eps=1e-8, affine=True)   per batch item, biased variance
  SparseBatchNorm(num_features, eps=1e-5, momentum=0.1)     (wraps nn.BatchNorm1d as .bn)
  SparseLinear(in, out, bias=True)                          (wraps nn.Linear as .linear)
  SparseActivation(fn), SparseReLU, SparseLeakyReLU, SparseELU, SparseSigmoid, SparseSoftmax
  SparseBasicBlock3D(in, out, stride=1, norm="instance"|"batch", kernel_size=3, dilation=1,
                     downsample=None, downsample_kernel_size=4, downsample_bias=False)
Weights: `weight` shaped (K^3, C_in, C_out); offset index k = ix + K*iy + K^2*iz (x fastest).
  conv.dense_weight(w, K) converts to F.conv3d layout (C_out, C_in, Kx, Ky, Kz).
Functional: sparse_conv3d, sparse_conv_transpose3d, sparse_max_pool3d, sparse_instance_norm, apply_kernel_map.
Kernel maps: kernel_map.get_kernel_map(in_set, out_set, K, dilation, transposed) -> KernelMap(nbr[N_out,K^3]),
  cached on the input CoordinateSet; built by an index grid (boxes <= 2^25 cells) or sort+searchsorted
  (env FRUSTUM3D_KMAP=auto|grid|search).
Backends: "torch" (gather-GEMM-scatter, CPU path) and "triton" (implicit GEMM, CUDA); default triton on CUDA
  when importable, else torch; env FRUSTUM3D_SPARSE_BACKEND=torch|triton; use_backend(name) context manager.
  Under torch.autocast the convolutions run in the autocast dtype (fp32 accumulation); norms compute in fp32.
Errors: bad coordinates raise SparseCoordinateError (a ValueError) with a one-line reason.
"""

from __future__ import annotations

from .backends import resolve_backend_name, use_backend
from .blocks import SparseBasicBlock3D, make_norm
from .conv import SparseConv3d, SparseConvTranspose3d, dense_weight
from .coords import CoordinateSet, SparseCoordinateError
from .functional import (
    apply_kernel_map,
    sparse_conv3d,
    sparse_conv_transpose3d,
    sparse_max_pool3d,
)
from .kernel_map import KernelMap, get_kernel_map, kernel_offsets
from .layers import (
    SparseActivation,
    SparseELU,
    SparseLeakyReLU,
    SparseLinear,
    SparseReLU,
    SparseSigmoid,
    SparseSoftmax,
)
from .norm import SparseBatchNorm, SparseInstanceNorm, sparse_instance_norm
from .pooling import SparseMaxPool3d
from .tensor import SparseVoxels, sparse_cat, sparse_features_at, sparse_union

__all__ = [
    "CoordinateSet",
    "KernelMap",
    "SparseActivation",
    "SparseBasicBlock3D",
    "SparseBatchNorm",
    "SparseConv3d",
    "SparseConvTranspose3d",
    "SparseCoordinateError",
    "SparseELU",
    "SparseInstanceNorm",
    "SparseLeakyReLU",
    "SparseLinear",
    "SparseMaxPool3d",
    "SparseReLU",
    "SparseSigmoid",
    "SparseSoftmax",
    "SparseVoxels",
    "apply_kernel_map",
    "dense_weight",
    "get_kernel_map",
    "kernel_offsets",
    "make_norm",
    "resolve_backend_name",
    "sparse_cat",
    "sparse_conv3d",
    "sparse_conv_transpose3d",
    "sparse_features_at",
    "sparse_instance_norm",
    "sparse_max_pool3d",
    "sparse_union",
    "use_backend",
]
