"""Triton kernels for sparse convolution (imported lazily: only when the triton backend runs).

* ``conv_gather_gemm_kernel``: output-stationary implicit GEMM. A program owns BLOCK_M output rows x BLOCK_N
  output channels, loops over the K^3 offsets and C_in chunks, gathers the input rows named by the neighbour
  table (-1 -> zero rows), multiplies with the offset's weight tile and accumulates in float32 registers; the
  tile is written once (no atomics, deterministic). With a per-tile tap list (``HAS_TAPS``) a program walks only
  the taps that are non-empty for one of its rows, so an empty tap costs one scalar load (the strided input
  gradient has 7 of 8 taps empty per row); with a row permutation (``HAS_PERM``) rows with the same tap mask share
  tiles. With ``TAP_COUNT`` (opt-in, ``triton_backend.TAP_LOOPS``) the tap list is walked up to the tile's
  count of non-empty taps, a loop whose body has no branch, so Triton can software-pipeline its table and row
  loads across taps (``num_stages``); a ``k >= 0`` test in the body keeps every load of an iteration behind it.
  Used for the forward pass (table ``nbr``, weight W[k]) and for the input gradient (reverse table, weight
  W[k]^T through strides).
* ``conv_wgrad_kernel``: weight gradient as a gather-gather reduction per offset,
  ``dW[k] = sum_q feats[nbr[q, k]]^T grad_out[q]``, rows split over programs into float32 partial sums that
  are reduced afterwards (deterministic, no atomics).
* ``conv_wgrad_pairs_kernel``: the same reduction over each offset's compact pair list (the ``pairs`` path of
  :mod:`.triton_policy`, no empty work).

Loop bounds over offsets and input channels are compile-time constants (KV, C_IN): that also keeps the kernels
runnable in the Triton interpreter with NumPy >= 2 (runtime scalar loop bounds fail there).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _accumulate_offset(x_ptr, w_ptr, idx, k, cols, col_ok, acc, stride_wk, stride_wc, stride_wn,
                       C_IN: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc += x[idx, :] @ W[k] for one kernel offset, C_in in chunks of BLOCK_K (missing rows read zero)."""
    valid = idx >= 0
    src = idx.to(tl.int64) * C_IN
    for c0 in tl.static_range(0, C_IN, BLOCK_K):
        ci = c0 + tl.arange(0, BLOCK_K)
        ci_ok = ci < C_IN
        a = tl.load(x_ptr + src[:, None] + ci[None, :], mask=valid[:, None] & ci_ok[None, :], other=0.0)
        b = tl.load(
            w_ptr + k * stride_wk + ci[:, None] * stride_wc + cols[None, :] * stride_wn,
            mask=ci_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


# ``n_out`` changes with every pruned voxel set: not specialised on (divisibility by 16 only feeds masks), so one
# compiled variant serves every step.
@triton.jit(do_not_specialize=["n_out"])
def conv_gather_gemm_kernel(
    x_ptr,  # (N_in, C_in) features (rows gathered)
    w_ptr,  # weight, element (k, ci, co) at k*stride_wk + ci*stride_wc + co*stride_wn
    nbr_ptr,  # neighbour table, element (q, k) at q * stride_nq + k * stride_nk, int32, -1 = missing
    out_ptr,  # (N_out, C_out)
    perm_ptr,  # (N_out,) int32 row order (only read when HAS_PERM)
    taps_ptr,  # (cdiv(N_out, BLOCK_M), KV) int32 per-tile tap list, -1 padded at the end (only read when HAS_TAPS)
    counts_ptr,  # (cdiv(N_out, BLOCK_M),) int32 non-empty taps per tile (only read when TAP_COUNT)
    n_out,
    c_out,
    stride_nq,
    stride_nk,
    stride_wk,
    stride_wc,
    stride_wn,
    KV: tl.constexpr,
    C_IN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SKIP_EMPTY: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_TAPS: tl.constexpr,
    TAP_COUNT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = slots < n_out
    col_ok = cols < c_out
    if HAS_PERM:
        # rows visited in tap-mask order, so a tile's rows share their empty taps and SKIP_EMPTY drops them
        rows64 = tl.load(perm_ptr + slots, mask=row_ok, other=0).to(tl.int64)
    else:
        rows64 = slots.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TAP_COUNT:
        # a runtime bound (not the interpreter's: it cannot loop to a loaded scalar), no branch in the body
        for t in range(0, tl.load(counts_ptr + pid_m)):
            k = tl.load(taps_ptr + pid_m * KV + t)
            idx = tl.load(nbr_ptr + rows64 * stride_nq + k * stride_nk, mask=row_ok, other=-1)
            acc = _accumulate_offset(x_ptr, w_ptr, idx, k, cols, col_ok, acc, stride_wk, stride_wc, stride_wn,
                                     C_IN, BLOCK_K, PRECISION)
    else:
        for t in range(0, KV):
            if HAS_TAPS:
                # the tile's non-empty taps come first: an empty tap costs one scalar load, no table column read
                k = tl.load(taps_ptr + pid_m * KV + t)
                if k >= 0:
                    idx = tl.load(nbr_ptr + rows64 * stride_nq + k * stride_nk, mask=row_ok, other=-1)
                    acc = _accumulate_offset(x_ptr, w_ptr, idx, k, cols, col_ok, acc, stride_wk, stride_wc,
                                             stride_wn, C_IN, BLOCK_K, PRECISION)
            else:
                acc = _tap_plain(x_ptr, w_ptr, nbr_ptr, rows64, row_ok, t, cols, col_ok, acc, stride_nq, stride_nk,
                                 stride_wk, stride_wc, stride_wn, C_IN, BLOCK_K, SKIP_EMPTY, PRECISION)
    out_offs = rows64[:, None] * c_out + cols[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _tap_plain(x_ptr, w_ptr, nbr_ptr, rows64, row_ok, k, cols, col_ok, acc, stride_nq, stride_nk, stride_wk,
               stride_wc, stride_wn, C_IN: tl.constexpr, BLOCK_K: tl.constexpr, SKIP_EMPTY: tl.constexpr,
               PRECISION: tl.constexpr):
    """One tap without a tap list: read the table column, skip it when empty for the whole tile (SKIP_EMPTY)."""
    idx = tl.load(nbr_ptr + rows64 * stride_nq + k * stride_nk, mask=row_ok, other=-1)
    if SKIP_EMPTY:
        if tl.max(idx, axis=0) >= 0:
            acc = _accumulate_offset(x_ptr, w_ptr, idx, k, cols, col_ok, acc, stride_wk, stride_wc,
                                     stride_wn, C_IN, BLOCK_K, PRECISION)
    else:
        acc = _accumulate_offset(x_ptr, w_ptr, idx, k, cols, col_ok, acc, stride_wk, stride_wc,
                                 stride_wn, C_IN, BLOCK_K, PRECISION)
    return acc


@triton.jit(do_not_specialize=["n_out"])
def conv_wgrad_kernel(
    x_ptr,  # (N_in, C_in) input features
    g_ptr,  # (N_out, C_out) output gradient
    nbr_ptr,  # neighbour table, element (q, k) at q * stride_nq + k * stride_nk
    part_ptr,  # (SPLIT, KV, C_in, C_out) float32 partial sums
    n_out,
    kv,
    c_in,
    c_out,
    stride_nq,
    stride_nk,
    ITERS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    PRECISION: tl.constexpr,
):
    k = tl.program_id(0)
    split = tl.program_id(1)
    tile = tl.program_id(2)
    n_co_tiles = tl.cdiv(c_out, BLOCK_CO)
    ci = (tile // n_co_tiles) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    co = (tile % n_co_tiles) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ci_ok = ci < c_in
    co_ok = co < c_out
    start = split.to(tl.int64) * (ITERS * BLOCK_P)
    acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
    for it in range(0, ITERS):
        rows64 = start + it * BLOCK_P + tl.arange(0, BLOCK_P)
        idx = tl.load(nbr_ptr + rows64 * stride_nq + k * stride_nk, mask=rows64 < n_out, other=-1)
        valid = idx >= 0
        # gathered input tile loaded already transposed: (BLOCK_CI, BLOCK_P)
        a_t = tl.load(x_ptr + idx.to(tl.int64)[None, :] * c_in + ci[:, None], mask=valid[None, :] & ci_ok[:, None],
                      other=0.0)
        g = tl.load(g_ptr + rows64[:, None] * c_out + co[None, :], mask=valid[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(a_t, g, acc, input_precision=PRECISION)
    base = (split.to(tl.int64) * kv + k) * c_in
    offs = (base + ci[:, None]) * c_out + co[None, :]
    tl.store(part_ptr + offs, acc, mask=ci_ok[:, None] & co_ok[None, :])


@triton.jit
def conv_wgrad_pairs_kernel(
    x_ptr,  # (N_in, C_in) input features
    g_ptr,  # (N_out, C_out) output gradient
    in_ptr,  # (P,) int64 input rows of the pairs, grouped by offset
    out_ptr,  # (P,) int64 output rows of the pairs
    start_ptr,  # (KV + 1,) int64 first pair of each offset
    part_ptr,  # (SPLIT, KV, C_in, C_out) float32 partial sums
    kv,
    c_in,
    c_out,
    ITERS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Weight gradient over the compact pair list of each offset (no empty taps)."""
    k = tl.program_id(0)
    split = tl.program_id(1)
    tile = tl.program_id(2)
    n_co_tiles = tl.cdiv(c_out, BLOCK_CO)
    ci = (tile // n_co_tiles) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    co = (tile % n_co_tiles) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ci_ok = ci < c_in
    co_ok = co < c_out
    first = tl.load(start_ptr + k)
    end = tl.load(start_ptr + k + 1)
    base_p = first + split.to(tl.int64) * (ITERS * BLOCK_P)
    acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
    for it in range(0, ITERS):
        p = base_p + it * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = p < end
        src = tl.load(in_ptr + p, mask=ok, other=0)
        dst = tl.load(out_ptr + p, mask=ok, other=0)
        a_t = tl.load(x_ptr + src[None, :] * c_in + ci[:, None], mask=ok[None, :] & ci_ok[:, None], other=0.0)
        g = tl.load(g_ptr + dst[:, None] * c_out + co[None, :], mask=ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(a_t, g, acc, input_precision=PRECISION)
    offs = ((split.to(tl.int64) * kv + k) * c_in + ci[:, None]) * c_out + co[None, :]
    tl.store(part_ptr + offs, acc, mask=ci_ok[:, None] & co_ok[None, :])
