"""Pure-PyTorch sparse convolution (the CPU path and the reference), in two equivalent forms.

* **Per-offset loop**: for each offset k with pairs (in_idx, out_idx), ``out[out_idx] += feats[in_idx] @ W[k]``
  via ``index_add_``. Its cost is proportional to the pairs, plus three small ops per offset.
* **Gather**: one GEMM of every input row with every offset's weight, ``Y = feats @ [W[0] .. W[K^3-1]]``
  (``(N_in, K^3, C_out)``), then ``out[q] = sum_k Y[nbr[q, k], k]``, one gather and one sum. Its backward needs no
  scatter: the gradient of ``Y`` is ``grad_out`` gathered through the reverse table, and both gradients are GEMMs
  with it. It multiplies every (input, offset) pair, used or not, so it serves maps that are full enough or small
  (:func:`uses_gather`); a generative transposed convolution (7 % of its table filled) keeps the loop.

Measured on the demo's 3D step (tiny preset, 32^3, one CPU thread, forward + both gradients of its 32 sparse
convolutions, ``tools/bench_torch_sparse_conv.py``): 353 ms with the loop everywhere, 151 ms with the gather where
:func:`uses_gather` picks it (float64 results equal to 1e-15 relative). Half-precision inputs accumulate in float32 in both forms (the Triton kernels' contract).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..kernel_map import KernelMap

name = "torch"

#: A map runs in the gather form when at least this fraction of its table is filled ...
GATHER_MIN_FILL = 0.25
#: ... or when its forward and reverse tables hold at most this many entries together (small maps, where the
#: loop's three ops per offset cost more than multiplying the empty entries).
GATHER_MAX_ENTRIES = 2**18
#: Elements of the per-offset products ``Y`` (or of their gradient) made at once: offsets are taken in chunks
#: below this, so a 256^3 map with 64 channels does not make a 27x feature-sized temporary (64 MiB in float32).
GATHER_CHUNK_ELEMENTS = 2**24


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def uses_gather(kmap: KernelMap) -> bool:
    """Whether the convolutions of ``kmap`` run in the gather form (module docstring)."""
    entries = (kmap.num_out + kmap.num_in) * kmap.kernel_volume
    return entries <= GATHER_MAX_ENTRIES or kmap.fill() >= GATHER_MIN_FILL


def _offset_chunks(kv: int, rows: int, channels: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of offsets whose products (``rows x width x channels``) stay under the budget."""
    width = max(1, min(kv, GATHER_CHUNK_ELEMENTS // max(1, rows * channels)))
    return [(k, min(kv, k + width)) for k in range(0, kv, width)]


def _with_zero_row(rows: int, cols: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """A ``(rows + 1, cols)`` buffer whose last row is zero (what -1 table entries read) and its first ``rows``."""
    buf = torch.empty((rows + 1, cols), dtype=like.dtype, device=like.device)
    buf[rows].zero_()
    return buf, buf[:rows]


def _gather_forward(feats: Tensor, weight: Tensor, kmap: KernelMap) -> Tensor:
    kv, c_in, c_out = weight.shape
    n_in, n_out = kmap.num_in, kmap.num_out
    out = torch.zeros((n_out, c_out), dtype=feats.dtype, device=feats.device)
    for start, stop in _offset_chunks(kv, max(n_in, n_out), c_out):
        width = stop - start
        w = weight[start:stop].permute(1, 0, 2).reshape(c_in, width * c_out)
        buf, body = _with_zero_row(n_in * width, c_out, feats)
        torch.mm(feats, w, out=body.view(n_in, width * c_out))
        picked = buf.index_select(0, kmap.gather_index(False, start, stop))
        out += picked.view(n_out, width, c_out).sum(1)
    return out


def _gather_backward(grad_out: Tensor, kmap: KernelMap, weight: Tensor | None = None,
                     feats: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """``(grad_feats, grad_weight)`` of the gather form: the first when ``weight`` is given, the second when
    ``feats`` is."""
    kv, n_in, n_out, c_out = kmap.kernel_volume, kmap.num_in, kmap.num_out, grad_out.shape[1]
    c_in = weight.shape[1] if weight is not None else feats.shape[1]
    grad_feats = grad_out.new_zeros((n_in, c_in)) if weight is not None else None
    grad_weight = grad_out.new_empty((kv, c_in, c_out)) if feats is not None else None
    padded, body = _with_zero_row(n_out, c_out, grad_out)
    body.copy_(grad_out)
    for start, stop in _offset_chunks(kv, max(n_in, n_out), c_out):
        width = stop - start
        # the gradient of the products Y[p, k] is grad_out[q] of the output q that read it (reverse table)
        grad_y = padded.index_select(0, kmap.gather_index(True, start, stop)).view(n_in, width * c_out)
        if grad_feats is not None:
            w = weight[start:stop].permute(1, 0, 2).reshape(c_in, width * c_out)
            grad_feats.addmm_(grad_y, w.t())
        if grad_weight is not None:
            grad_weight[start:stop] = (feats.t() @ grad_y).view(c_in, width, c_out).permute(1, 0, 2)
    return grad_feats, grad_weight


def _loop_forward(feats: Tensor, weight: Tensor, kmap: KernelMap) -> Tensor:
    in_idx, out_idx, counts = kmap.pairs()
    out = torch.zeros((kmap.num_out, weight.shape[2]), dtype=feats.dtype, device=feats.device)
    start = 0
    for k, n in enumerate(counts):
        if n:
            sl = slice(start, start + n)
            out.index_add_(0, out_idx[sl], feats.index_select(0, in_idx[sl]) @ weight[k])
        start += n
    return out


def _loop_dgrad(grad_out: Tensor, weight: Tensor, kmap: KernelMap) -> Tensor:
    in_idx, out_idx, counts = kmap.pairs()
    grad_in = torch.zeros((kmap.num_in, weight.shape[1]), dtype=grad_out.dtype, device=grad_out.device)
    start = 0
    for k, n in enumerate(counts):
        if n:
            sl = slice(start, start + n)
            grad_in.index_add_(0, in_idx[sl], grad_out.index_select(0, out_idx[sl]) @ weight[k].t())
        start += n
    return grad_in


def _loop_wgrad(feats: Tensor, grad_out: Tensor, kmap: KernelMap) -> Tensor:
    in_idx, out_idx, counts = kmap.pairs()
    grad_w = torch.zeros((kmap.kernel_volume, feats.shape[1], grad_out.shape[1]), dtype=feats.dtype,
                         device=feats.device)
    start = 0
    for k, n in enumerate(counts):
        if n:
            sl = slice(start, start + n)
            grad_w[k] = feats.index_select(0, in_idx[sl]).t() @ grad_out.index_select(0, out_idx[sl])
        start += n
    return grad_w


def _own_precision(fn):
    """Run a backend entry point with autocast off: it accumulates half-precision inputs in float32 itself, and
    under an active autocast (CPU bf16 inference or training) its float32 products would be cast back to bf16 and
    then refused by ``index_add_`` into the float32 accumulator."""

    @functools.wraps(fn)
    def run(first: Tensor, *args, **kwargs):
        if first.device.type not in ("cpu", "cuda"):
            return fn(first, *args, **kwargs)
        with torch.autocast(first.device.type, enabled=False):
            return fn(first, *args, **kwargs)

    return run


@_own_precision
def conv_forward(feats: Tensor, weight: Tensor, kmap: KernelMap) -> Tensor:
    """``out[q] = sum_k feats[nbr[q, k]] @ weight[k]``."""
    acc = _acc_dtype(feats.dtype)
    f, w = feats.to(acc), weight.to(acc)
    out = _gather_forward(f, w, kmap) if uses_gather(kmap) else _loop_forward(f, w, kmap)
    return out.to(feats.dtype)


@_own_precision
def conv_backward(feats: Tensor, grad_out: Tensor, weight: Tensor, kmap: KernelMap, need_feats: bool = True,
                  need_weight: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """Both gradients at once, ``(grad_feats, grad_weight)`` (``None`` where not needed): the gather form
    gathers the products' gradient once for the two."""
    acc = _acc_dtype(grad_out.dtype)
    f, g, w = feats.to(acc), grad_out.to(acc), weight.to(acc)
    if uses_gather(kmap):
        grad_feats, grad_weight = _gather_backward(g, kmap, weight=w if need_feats else None,
                                                   feats=f if need_weight else None)
    else:
        grad_feats = _loop_dgrad(g, w, kmap) if need_feats else None
        grad_weight = _loop_wgrad(f, g, kmap) if need_weight else None
    return (None if grad_feats is None else grad_feats.to(grad_out.dtype),
            None if grad_weight is None else grad_weight.to(feats.dtype))


@_own_precision
def conv_dgrad(grad_out: Tensor, weight: Tensor, kmap: KernelMap) -> Tensor:
    """``grad_in[p] = sum_k grad_out[q] @ weight[k].T`` over pairs (p, q) of offset k."""
    acc = _acc_dtype(grad_out.dtype)
    g, w = grad_out.to(acc), weight.to(acc)
    grad_in = _gather_backward(g, kmap, weight=w)[0] if uses_gather(kmap) else _loop_dgrad(g, w, kmap)
    return grad_in.to(grad_out.dtype)


@_own_precision
def conv_wgrad(feats: Tensor, grad_out: Tensor, kmap: KernelMap) -> Tensor:
    """``grad_w[k] = feats[in_idx_k].T @ grad_out[out_idx_k]`` (float32 accumulation for half inputs)."""
    acc = _acc_dtype(feats.dtype)
    f, g = feats.to(acc), grad_out.to(acc)
    grad_w = _gather_backward(g, kmap, feats=f)[1] if uses_gather(kmap) else _loop_wgrad(f, g, kmap)
    return grad_w.to(feats.dtype)
