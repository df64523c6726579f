"""Kernel-map construction in two or three Triton launches (imported lazily: CUDA tensors, or the tests' interpreter).

A kernel map built from torch ops costs a few dozen small device operations (unpack, shift, floor-divide,
linearise, scatter, gather, pad, each dispatched from Python). At batch 1 the 3D decoder is bound by that host
work, not by the device (stop 44's profile: the device was busy 38 % of the decoder's time, with about 11 grid
lookups and 17 tile tap lists per frame). These kernels do the same work from the sets' packed keys:

* :func:`grid_table`: the index-grid lookup of :func:`frustum3d.sparse.kernel_map._grid_lookup`. One launch
  scatters each input row into a dense int32 grid over the queried box; one launch gathers, for every output row
  and offset, the grid cell at the row's linear index plus the offset's linear step, and writes the
  offset-major ``(KV, N padded to 16)`` table the GEMM kernels read (padding rows -1).
* :func:`tile_tap_lists`: per tile of ``block_m`` rows (in storage order or through a row permutation), the taps
  that are non-empty for one of its rows in ascending order, then -1 (:meth:`KernelMap.tile_taps`); opt-in, through
  per-row 64-bit tap masks (``FRUSTUM3D_TILE_TAP_MASKS=1``).
* :func:`generate_unique`: a generative transposed convolution's output set and each candidate's row, from a
  marked grid over the candidates' box and its prefix sum (instead of sorting them).

Both are exact (integer work only) and are tested equal to the torch builders, on CPU under the Triton
interpreter. Box extents and offsets are host integers, so the launches need no device read.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .transfer import host_to_device

_BLOCK = 256  # rows per program of the grid kernels


@triton.jit
def _grid_cell(keys_ptr, rows, valid, lo_x, lo_y, lo_z, step, ex, ey, ez, nb):
    """Linear index of each row's voxel in the (nb, ex, ey, ez) box, and whether it lies inside the box. Keys
    unpack as :func:`frustum3d.sparse.coords.unpack_keys` does: 16 bits per axis, offset by 2^15, batch above."""
    key = tl.load(keys_ptr + rows, mask=valid, other=0)
    z = (key & 0xFFFF) - 32768 - lo_z
    y = ((key >> 16) & 0xFFFF) - 32768 - lo_y
    x = ((key >> 32) & 0xFFFF) - 32768 - lo_x
    b = key >> 48
    # every coordinate is a multiple of the lattice step past the box corner, so the division is exact where
    # it is inside (a truncating division of a negative remainder is never used: those rows are outside)
    inside = valid & (x >= 0) & (y >= 0) & (z >= 0) & (b >= 0) & (b < nb)
    x, y, z = x // step, y // step, z // step
    inside = inside & (x < ex) & (y < ey) & (z < ez)
    return ((b * ex + x) * ey + y) * ez + z, inside


# sizes, corners and extents change from set to set: not specialised on (each value's divisibility by 16 would
# otherwise compile new variants for the first many sets)
_VARYING = ["n", "lo_x", "lo_y", "lo_z", "step", "ex", "ey", "ez", "nb"]


@triton.jit(do_not_specialize=_VARYING)
def _grid_scatter_kernel(keys_ptr, grid_ptr, n, lo_x, lo_y, lo_z, step, ex, ey, ez, nb, BLOCK: tl.constexpr):
    """grid[cell of input row r] = r for every input row inside the box (cells are unique: the set is)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cell, inside = _grid_cell(keys_ptr, rows, rows < n, lo_x, lo_y, lo_z, step, ex, ey, ez, nb)
    tl.store(grid_ptr + cell, rows.to(tl.int32), mask=inside)


@triton.jit(do_not_specialize=_VARYING)
def _grid_gather_kernel(keys_ptr, grid_ptr, dlin_ptr, out_ptr, n, n_pad, lo_x, lo_y, lo_z, step, ex, ey, ez, nb,
                        KV: tl.constexpr, BLOCK: tl.constexpr):
    """out[k, q] = grid[cell(q) + dlin[k]] for output rows q < n (every query lies in the box), -1 for the
    padding rows n .. n_pad - 1."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < n
    cell, _ = _grid_cell(keys_ptr, rows, valid, lo_x, lo_y, lo_z, step, ex, ey, ez, nb)
    in_pad = rows < n_pad
    dst = out_ptr + rows  # advanced by one offset's row per tap: no k * n_pad product, which could pass 2^31
    for k in range(KV):
        d = tl.load(dlin_ptr + k)
        v = tl.load(grid_ptr + cell + d, mask=valid, other=-1)
        tl.store(dst, v, mask=in_pad)
        dst += n_pad


def grid_table(in_keys: Tensor, out_keys: Tensor, lo: list[int], ext: list[int], step: int, nb: int,
               dlin: list[int], n_pad: int) -> Tensor:
    """Offset-major ``(KV, n_pad)`` int32 neighbour table storage: entry ``(k, q)`` is the input row at output
    row ``q``'s voxel shifted by offset ``k`` (``dlin[k]``: its linear step in the box), or -1.

    ``lo`` / ``ext``: the box's lower corner (finest units) and extent (``step`` units) per axis, large enough
    to hold every query; ``nb``: batch items in the box. Keys are the sets' packed keys (sorted or not)."""
    device = out_keys.device
    n_in, n_out, kv = int(in_keys.numel()), int(out_keys.numel()), len(dlin)
    ex, ey, ez = (int(e) for e in ext)
    grid = torch.full((nb * ex * ey * ez,), -1, dtype=torch.int32, device=device)
    box = (int(lo[0]), int(lo[1]), int(lo[2]), int(step), ex, ey, ez, int(nb))
    if n_in:
        _grid_scatter_kernel[(triton.cdiv(n_in, _BLOCK),)](in_keys, grid, n_in, *box, BLOCK=_BLOCK)
    out = torch.empty((kv, n_pad), dtype=torch.int32, device=device)
    if kv:
        steps = host_to_device(dlin, device)
        _grid_gather_kernel[(triton.cdiv(n_pad, _BLOCK),)](out_keys, grid, steps, out, n_out, n_pad, *box, KV=kv,
                                                           BLOCK=_BLOCK)
    return out


@triton.jit(do_not_specialize=["n"])
def _tile_taps_kernel(table_ptr, perm_ptr, out_ptr, n, n_pad, KV: tl.constexpr, KV_PAD: tl.constexpr,
                      BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, HAS_PERM: tl.constexpr):
    """One program per tile: which taps hold an entry for one of the tile's rows; those taps in ascending order,
    then -1 (a stable partition of 0 .. KV-1)."""
    tile = tl.program_id(0).to(tl.int64)
    taps = tl.arange(0, KV_PAD)
    tap_ok = taps < KV
    hit = tl.zeros((KV_PAD,), dtype=tl.int32)
    for c0 in range(0, BLOCK_M, CHUNK):
        rows = tile * BLOCK_M + c0 + tl.arange(0, CHUNK)
        valid = rows < n
        if HAS_PERM:
            src = tl.load(perm_ptr + rows, mask=valid, other=0).to(tl.int64)
        else:
            src = rows
        entry = tl.load(table_ptr + taps[:, None].to(tl.int64) * n_pad + src[None, :],
                        mask=tap_ok[:, None] & valid[None, :], other=-1)
        hit = tl.maximum(hit, tl.max((entry >= 0).to(tl.int32), axis=1))
    before = tl.cumsum(hit, axis=0)  # non-empty taps up to and including each tap
    count = tl.sum(hit, axis=0)
    pos = tl.where(hit > 0, before - 1, count + taps - before)
    tl.store(out_ptr + tile * KV + pos, tl.where(hit > 0, taps, -1), mask=tap_ok)


@triton.jit(do_not_specialize=["n"])
def _row_mask_kernel(table_ptr, out_ptr, n, n_pad, KV: tl.constexpr, BLOCK: tl.constexpr):
    """out[q] = bit k set for every tap k with an entry in row q (KV <= 64): one coalesced pass over the
    offset-major table."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < n
    bits = tl.zeros((BLOCK,), dtype=tl.int64)
    src = table_ptr + rows
    for k in range(KV):
        entry = tl.load(src, mask=valid, other=-1)
        bits = bits | ((entry >= 0).to(tl.int64) << k)
        src += n_pad
    tl.store(out_ptr + rows, bits, mask=valid)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit(do_not_specialize=["n"])
def _tile_taps_masks_kernel(mask_ptr, perm_ptr, out_ptr, n, KV: tl.constexpr, KV_PAD: tl.constexpr,
                            BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """:func:`_tile_taps_kernel` through a row permutation, from the rows' tap masks: one scattered 8-byte read
    per row instead of one per row and tap."""
    tile = tl.program_id(0).to(tl.int64)
    bits = tl.zeros((CHUNK,), dtype=tl.int64)
    for c0 in range(0, BLOCK_M, CHUNK):
        rows = tile * BLOCK_M + c0 + tl.arange(0, CHUNK)
        valid = rows < n
        src = tl.load(perm_ptr + rows, mask=valid, other=0).to(tl.int64)
        bits = bits | tl.load(mask_ptr + src, mask=valid, other=0)
    word = tl.reduce(bits, 0, _bit_or)
    taps = tl.arange(0, KV_PAD)
    tap_ok = taps < KV
    hit = tl.where(tap_ok, ((word >> taps.to(tl.int64)) & 1).to(tl.int32), 0)
    before = tl.cumsum(hit, axis=0)
    count = tl.sum(hit, axis=0)
    pos = tl.where(hit > 0, before - 1, count + taps - before)
    tl.store(out_ptr + tile * KV + pos, tl.where(hit > 0, taps, -1), mask=tap_ok)


def tap_masks_enabled() -> bool:
    """``FRUSTUM3D_TILE_TAP_MASKS``: ``1`` builds permuted tap lists from per-row tap masks (opt-in), ``0`` or
    unset reads the table entries through the permutation (the default)."""
    mode = os.environ.get("FRUSTUM3D_TILE_TAP_MASKS", "0").strip() or "0"
    if mode not in ("0", "1"):
        raise ValueError(f"FRUSTUM3D_TILE_TAP_MASKS must be 0 or 1, got {mode!r}")
    return mode == "1"


def tile_tap_lists(columns: Tensor, block_m: int, perm: Tensor | None) -> Tensor:
    """``(cdiv(N, block_m), KV)`` int32 tap lists of a table given offset-major, as its ``(KV, N)`` view of
    ``(KV, N_pad)`` storage (:func:`frustum3d.sparse.kernel_map.offset_major_table`); rows are taken through
    ``perm`` (int32, a permutation of the N rows) when given.

    With ``FRUSTUM3D_TILE_TAP_MASKS=1`` (opt-in, not yet timed on a GPU), tap lists through a permutation (at
    most 64 taps) first pack each row's taps into one 64-bit mask in a coalesced pass, and the tiles read those:
    reading every tap's entry of the permuted rows scatters KV reads per row over the whole table, far more than
    the cache holds at batch 4 of the 256^3 level, where the Triton builders were slower than the torch ones
    (stop 46, docs/speed.md). Same lists either way (tested)."""
    kv, n = columns.shape
    n_pad = columns.stride(0)
    if columns.stride(1) != 1:
        raise ValueError(f"tile_tap_lists needs offset-major storage, got strides {columns.stride()}")
    tiles = triton.cdiv(n, block_m)
    out = torch.empty((tiles, kv), dtype=torch.int32, device=columns.device)
    if not (tiles and kv):
        return out
    if perm is not None and kv <= 64 and tap_masks_enabled():
        masks = torch.empty((n,), dtype=torch.int64, device=columns.device)
        _row_mask_kernel[(triton.cdiv(n, _BLOCK),)](columns, masks, n, n_pad, KV=kv, BLOCK=_BLOCK)
        _tile_taps_masks_kernel[(tiles,)](masks, perm, out, n, KV=kv, KV_PAD=triton.next_power_of_2(kv),
                                          BLOCK_M=block_m, CHUNK=min(block_m, 256))
        return out
    chunk = min(block_m, max(16, 4096 // triton.next_power_of_2(kv)))
    _tile_taps_kernel[(tiles,)](columns, columns if perm is None else perm, out, n, n_pad, KV=kv,
                                KV_PAD=triton.next_power_of_2(kv), BLOCK_M=block_m, CHUNK=chunk,
                                HAS_PERM=perm is not None)
    return out


# ------------------------------------------------------------------------------------------- generated sets
@triton.jit(do_not_specialize=_VARYING)
def _mark_kernel(keys_ptr, dlin_ptr, grid_ptr, n, lo_x, lo_y, lo_z, step, ex, ey, ez, nb,
                 KV: tl.constexpr, BLOCK: tl.constexpr):
    """grid[cell(p) + dlin[k]] = 1 for every input row p and offset k (equal stores may race: same value). A
    generating voxel may lie outside the box its candidates fill: its linear index plus an offset's step is still
    the candidate's, so the inside flag is not used."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < n
    cell, _ = _grid_cell(keys_ptr, rows, valid, lo_x, lo_y, lo_z, step, ex, ey, ez, nb)
    one = tl.full((BLOCK,), 1, dtype=tl.int8)
    for k in range(KV):
        tl.store(grid_ptr + cell + tl.load(dlin_ptr + k), one, mask=valid)


@triton.jit(do_not_specialize=["ncells", "lo_x", "lo_y", "lo_z", "step", "ex", "ey", "ez"])
def _compact_kernel(grid_ptr, prefix_ptr, out_ptr, ncells, lo_x, lo_y, lo_z, step, ex, ey, ez,
                    BLOCK: tl.constexpr):
    """The packed key of every marked cell, written at its rank among the marked cells (cell order is key
    order: both run batch, x, y, z)."""
    cells = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = cells < ncells
    marked = valid & (tl.load(grid_ptr + cells, mask=valid, other=0) != 0)
    rank = tl.load(prefix_ptr + cells, mask=marked, other=1) - 1
    iz = cells % ez
    r = cells // ez
    iy = r % ey
    r = r // ey
    ix = r % ex
    b = r // ex
    key = ((b << 48) | ((lo_x + ix * step + 32768) << 32) | ((lo_y + iy * step + 32768) << 16)
           | (lo_z + iz * step + 32768))
    tl.store(out_ptr + rank, key, mask=marked)


@triton.jit(do_not_specialize=_VARYING)
def _rank_kernel(keys_ptr, dlin_ptr, prefix_ptr, out_ptr, n, lo_x, lo_y, lo_z, step, ex, ey, ez, nb,
                 KV: tl.constexpr, BLOCK: tl.constexpr):
    """out[p, k] = rank of candidate (p, k) among the generated set's rows (int32, row-major (N, KV))."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < n
    cell, _ = _grid_cell(keys_ptr, rows, valid, lo_x, lo_y, lo_z, step, ex, ey, ez, nb)
    for k in range(KV):
        rank = tl.load(prefix_ptr + cell + tl.load(dlin_ptr + k), mask=valid, other=1) - 1
        tl.store(out_ptr + rows * KV + k, rank, mask=valid)


def generate_unique(keys: Tensor, lo: list[int], ext: list[int], step: int, nb: int,
                    dlin: list[int]) -> tuple[Tensor, Tensor]:
    """Every candidate ``p + offset`` of the input rows' packed ``keys`` as sorted unique keys, and the
    ``(N, KV)`` int32 row each candidate became: ``torch.unique(..., sorted=True, return_inverse=True)`` of the
    candidates, through a marked grid over their box and its prefix sum instead of a sort.

    ``lo`` / ``ext``: the box's lower corner (finest units) and extent (``step`` units, the generated set's
    stride) per axis, holding every candidate; ``nb``: batch items; ``dlin``: each offset's linear step in the
    box. One host read (the generated set's size), as the sort-based unique has."""
    device = keys.device
    n, kv = int(keys.numel()), len(dlin)
    ex, ey, ez = (int(e) for e in ext)
    ncells = nb * ex * ey * ez
    box = (int(lo[0]), int(lo[1]), int(lo[2]), int(step), ex, ey, ez)
    grid = torch.zeros((ncells,), dtype=torch.int8, device=device)
    steps = host_to_device(dlin, device)
    blocks = (triton.cdiv(n, _BLOCK),)
    _mark_kernel[blocks](keys, steps, grid, n, *box, nb, KV=kv, BLOCK=_BLOCK)
    prefix = torch.cumsum(grid, 0, dtype=torch.int32)
    m = int(prefix[-1])
    out = torch.empty((m,), dtype=torch.int64, device=device)
    _compact_kernel[(triton.cdiv(ncells, 1024),)](grid, prefix, out, ncells, *box, BLOCK=1024)
    rows = torch.empty((n, kv), dtype=torch.int32, device=device)
    _rank_kernel[blocks](keys, steps, prefix, rows, n, *box, nb, KV=kv, BLOCK=_BLOCK)
    return out, rows
