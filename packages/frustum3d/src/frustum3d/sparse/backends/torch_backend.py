"""Pure-PyTorch sparse convolution: gather-GEMM-scatter per kernel offset (CPU path and reference).

For each offset k with pairs (in_idx, out_idx): ``out[out_idx] += feats[in_idx] @ W[k]`` via ``index_add_``.
Half-precision inputs accumulate into a float32 buffer (same contract as the Triton kernels).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernel_map import KernelMap

name = "torch"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def conv_forward(feats: Tensor, weight: Tensor, kmap: KernelMap) -> Tensor:
    """``out[q] = sum_k feats[nbr[q, k]] @ weight[k]``."""
    in_idx, out_idx, counts = kmap.pairs()
    acc = _acc_dtype(feats.dtype)
    out = torch.zeros((kmap.num_out, weight.shape[2]), dtype=acc, device=feats.device)
    start = 0
    for k, n in enumerate(counts):
        if n:
            sl = slice(start, start + n)
            out.index_add_(0, out_idx[sl], (feats.index_select(0, in_idx[sl]) @ weight[k]).to(acc))
        start += n
    return out.to(feats.dtype)


def conv_dgrad(grad_out: Tensor, weight: Tensor, kmap: KernelMap) -> Tensor:
    """``grad_in[p] = sum_k grad_out[q] @ weight[k].T`` over pairs (p, q) of offset k."""
    in_idx, out_idx, counts = kmap.pairs()
    acc = _acc_dtype(grad_out.dtype)
    grad_in = torch.zeros((kmap.num_in, weight.shape[1]), dtype=acc, device=grad_out.device)
    start = 0
    for k, n in enumerate(counts):
        if n:
            sl = slice(start, start + n)
            grad_in.index_add_(0, in_idx[sl], (grad_out.index_select(0, out_idx[sl]) @ weight[k].t()).to(acc))
        start += n
    return grad_in.to(grad_out.dtype)


def conv_wgrad(feats: Tensor, grad_out: Tensor, kmap: KernelMap) -> Tensor:
    """``grad_w[k] = feats[in_idx_k].T @ grad_out[out_idx_k]`` (float32 accumulation for half inputs)."""
    in_idx, out_idx, counts = kmap.pairs()
    kv = kmap.kernel_volume
    acc = _acc_dtype(feats.dtype)
    grad_w = torch.zeros((kv, feats.shape[1], grad_out.shape[1]), dtype=acc, device=feats.device)
    start = 0
    for k, n in enumerate(counts):
        if n:
            sl = slice(start, start + n)
            a = feats.index_select(0, in_idx[sl]).to(acc)
            b = grad_out.index_select(0, out_idx[sl]).to(acc)
            grad_w[k] = a.t() @ b
        start += n
    return grad_w.to(feats.dtype)
