"""Kernel maps: for every output voxel and kernel offset, the input row it reads (or -1).

Offsets follow MinkowskiEngine's hyper-cube rule, per axis: odd kernels are centred,
``(i - K // 2) * dilation``; even kernels are one-sided, ``i * dilation`` for ``i = 0 .. K-1``. The offset index
enumerates the **first spatial axis (x) fastest**: ``k = i_x + K * i_y + K**2 * i_z``; weights are stored as
``(K**3, C_in, C_out)`` in that order.

A kernel map is one table ``nbr[N_out, K**3]`` (int32, -1 = no input). Convolution reads
``in[p] -> out[q]`` with ``p = q + offset_k * s_in``; a transposed convolution reads ``p = q - offset_k * s_out``
(the swapped map of the matching strided conv). In both cases each (output, offset) has at most one input,
so the table is exact. From it we derive, lazily and cached, the per-offset pair lists (torch backend, weight
gradient) and the reverse table ``[N_in, K**3]`` (input gradient of the output-stationary Triton kernels).

Two builders, equal results (tested):
  * ``search``: sorted packed keys + ``torch.searchsorted`` (any extent, deterministic);
  * ``grid``: a dense int32 index grid over the queried box (no search; used when the box, times the batch
    size, has at most ``GRID_MAX_CELLS`` cells: 2^27, a 512 MiB transient, covers a 256^3 frustum with kernel
    halo up to batch 7; env ``FRUSTUM3D_KMAP_GRID_CELLS`` overrides it).
"""

from __future__ import annotations

import math
import os
from functools import reduce

import torch
from torch import Tensor

from .backends import triton_available
from .coords import COORD_MAX, COORD_MIN, CoordinateSet, generative_key, key_deltas
from .transfer import host_to_device

__all__ = [
    "GRID_MAX_CELLS",
    "KernelMap",
    "build_neighbour_table",
    "get_kernel_map",
    "grid_max_cells",
    "index_grid_cells",
    "kernel_offsets",
]

GRID_MAX_CELLS = 2**27
"""Largest index grid (cells, all batch items together) the ``auto`` builder uses before it falls back to the
search. 2^25 (the first value) sent every 256^3 map at batch >= 2 to the search, about 3.5x slower per voxel on a
CPU (tools/bench_kernel_map.py)."""
_METHODS = ("auto", "grid", "search")
_OFFSET_CHUNK = 9  # offsets per searchsorted call (bounds the (N, chunk) int64 temporaries)


_HOST_KERNEL_OFFSETS: dict[tuple[int, int], Tensor] = {}


def _build_kernel_offsets(kernel_size: int, dilation: int, device: torch.device | str) -> Tensor:
    axis = torch.arange(kernel_size, dtype=torch.int64, device=device)
    if kernel_size % 2 == 1:
        axis = axis - kernel_size // 2
    axis = axis * dilation
    gz, gy, gx = torch.meshgrid(axis, axis, axis, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1), gz.reshape(-1)], dim=1)


def kernel_offsets(kernel_size: int, dilation: int = 1, device: torch.device | str = "cpu") -> Tensor:
    """``(K**3, 3)`` int64 offsets (x, y, z) in units of the tensor stride, x fastest (MinkowskiEngine rule).

    The host copy is built once per (size, dilation) and shared, so treat it as read-only: every kernel map of a
    training step asks for it, and building it costs about 18 small ops of host time each time. Other devices
    get a fresh tensor (a cached one could come from a CUDA graph's private memory pool)."""
    if kernel_size < 1:
        raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    if torch.device(device).type != "cpu":
        return _build_kernel_offsets(kernel_size, dilation, device)
    key = (int(kernel_size), int(dilation))
    offs = _HOST_KERNEL_OFFSETS.get(key)
    if offs is None:
        offs = _HOST_KERNEL_OFFSETS[key] = _build_kernel_offsets(kernel_size, dilation, "cpu")
    return offs


_HASH_WEIGHTS: dict[tuple[int, str], Tensor] = {}


def _mask_hash_weights(kv: int, device: torch.device) -> Tensor:
    """Fixed random int64 weights per tap (seeded), made once per (KV, device) rather than per kernel map."""
    key = (int(kv), str(device))
    hit = _HASH_WEIGHTS.get(key)
    if hit is None:
        gen = torch.Generator().manual_seed(12345)
        hit = torch.randint(1, 2**62, (kv,), generator=gen).to(device)
        _HASH_WEIGHTS[key] = hit
    return hit


def padded_rows(n: int) -> int:
    """``n`` rounded up to a multiple of 16 (at least 16): the row count of an offset-major table's storage."""
    return max(16, -(-int(n) // 16) * 16)


def offset_major_table(n: int, kv: int, device: torch.device | str) -> Tensor:
    """An ``(n, kv)`` int32 table of -1 stored offset-major: a view of ``(kv, padded_rows(n))`` storage, the
    layout the Triton kernels read (:meth:`KernelMap.offset_major`), so no transposed copy is needed later."""
    return torch.full((kv, padded_rows(n)), -1, dtype=torch.int32, device=device)[:, :n].t()


def is_offset_major(table: Tensor) -> bool:
    """Whether ``table`` (N, KV) is stored offset-major with a row stride :func:`offset_major_table` gives."""
    return table.stride(0) == 1 and table.stride(1) == padded_rows(table.shape[0])


class KernelMap:
    """Neighbour table of one convolution plus lazily derived pair lists and reverse table."""

    def __init__(self, nbr: Tensor, num_in: int, generated_rows: Tensor | None = None) -> None:
        self.nbr = nbr  # (N_out, KV) int32, -1 = missing
        self.num_in = int(num_in)
        # (N_in, KV) int32 output row of every (input, offset) pair, for the map of a generative transposed conv
        # (every pair exists): the pair lists, the reverse table, the row order and the tile taps then come from
        # these N_in * KV entries instead of a pass over the mostly empty N_out * KV table
        self._generated = generated_rows
        self._pairs: tuple[Tensor, Tensor, list[int]] | None = None
        self._reverse: Tensor | None = None
        self._counts: Tensor | None = None
        self._offset_major: dict[bool, Tensor] = {}
        self._row_order: dict[bool, Tensor] = {}
        self._tile_taps: dict[tuple[bool, int, bool], Tensor] = {}
        self._tile_tap_counts: dict[tuple[bool, int, bool], Tensor] = {}
        self._fill: dict[bool, float] = {}
        self._gather_index: dict[tuple[bool, int, int], Tensor] = {}

    @classmethod
    def from_generated_rows(cls, rows: Tensor, num_out: int) -> KernelMap:
        """The map of a generative transposed convolution, from the output row each (input row, offset) pair
        became when its output set was generated (:meth:`CoordinateSet.generated_rows`): ``nbr[rows[p, k], k] =
        p``. Equal to the looked-up map (tested); it costs a scatter of ``N_in * KV`` entries instead of ``N_out *
        KV`` lookups (a k4 s2 up-sampling to 256^3 has about 12x more outputs than inputs, 7 of 8 entries empty)."""
        n_in, kv = rows.shape
        n_pad = padded_rows(num_out)
        storage = torch.full((kv * n_pad,), -1, dtype=torch.int32, device=rows.device)
        if n_in and kv:
            taps = torch.arange(kv, dtype=torch.int64, device=rows.device) * n_pad
            cells = (rows.to(torch.int64) + taps[None, :]).reshape(-1)
            inputs = torch.arange(n_in, dtype=torch.int32, device=rows.device)[:, None].expand(n_in, kv)
            storage[cells] = inputs.reshape(-1)
        return cls(storage.view(kv, n_pad)[:, :num_out].t(), n_in, generated_rows=rows)

    @property
    def num_out(self) -> int:
        return int(self.nbr.shape[0])

    @property
    def kernel_volume(self) -> int:
        return int(self.nbr.shape[1])

    @property
    def device(self) -> torch.device:
        return self.nbr.device

    def pairs(self) -> tuple[Tensor, Tensor, list[int]]:
        """Per-offset pairs sorted by offset: ``(in_idx, out_idx, counts)``; ``counts[k]`` pairs belong to k."""
        if self._pairs is None and self._generated is not None:
            # every pair exists; for one offset the outputs grow with the input row (packed keys shift by a
            # constant), so this is the order the nonzero() below gives, without its host sync
            n_in, kv = self._generated.shape
            out_idx = self._generated.t().reshape(-1).to(torch.int64)
            in_idx = torch.arange(n_in, dtype=torch.int64, device=self.device).repeat(kv)
            self._counts = torch.full((kv,), n_in, dtype=torch.int64, device=self.device)
            self._pairs = (in_idx, out_idx, [n_in] * kv)
        if self._pairs is None:
            valid = self.nbr >= 0
            k_idx, out_idx = valid.t().nonzero(as_tuple=True)
            in_idx = self.nbr[out_idx, k_idx].to(torch.int64)
            counts = torch.bincount(k_idx, minlength=self.kernel_volume)
            self._counts = counts
            self._pairs = (in_idx, out_idx, counts.tolist())
        return self._pairs

    def reverse(self) -> Tensor:
        """``(N_in, KV)`` int32 table: for input row p and offset k, the output row that reads p (or -1)."""
        if self._reverse is None and self._generated is not None:
            rev = torch.full((self.kernel_volume, padded_rows(self.num_in)), -1, dtype=torch.int32,
                             device=self.device)
            rev[:, : self.num_in] = self._generated.t()
            self._reverse = rev[:, : self.num_in].t()
        if self._reverse is None:
            kv, n_pad, n_out = self.kernel_volume, padded_rows(self.num_in), self.num_out
            # offset-major storage plus one dump cell at the end, where the -1 entries write: no nonzero(), so
            # no host sync (it is built in the backward pass, which syncs nowhere else)
            rev = torch.full((kv * n_pad + 1,), -1, dtype=torch.int32, device=self.device)
            if n_out and kv:
                taps = torch.arange(kv, dtype=torch.int64, device=self.device) * n_pad
                nbr = self.nbr.to(torch.int64)
                cells = torch.where(nbr >= 0, nbr + taps, kv * n_pad).reshape(-1)
                rows = torch.arange(n_out, dtype=torch.int32, device=self.device)[:, None].expand(n_out, kv)
                rev.index_put_((cells,), rows.reshape(-1))  # each real cell is written once
            self._reverse = rev[: kv * n_pad].view(kv, n_pad)[:, : self.num_in].t()
        return self._reverse

    def offset_major(self, reverse: bool = False) -> Tensor:
        """The (reverse) table as an ``(N, KV)`` view of offset-major ``(KV, N_pad)`` storage (coalesced per offset).

        ``N_pad`` is ``N`` rounded up to a multiple of 16, so the offset stride is always divisible by 16: the
        Triton kernels are specialised on that divisibility, and voxel counts that change from step to step
        (pruning) would otherwise switch between two compiled variants and recompile during training.
        """
        hit = self._offset_major.get(reverse)
        if hit is None:
            table = self.reverse() if reverse else self.nbr
            if is_offset_major(table):  # built that way (the grid and search builders, reverse()): no copy
                hit = table
            else:
                # a transposed copy: N x KV int32 through a strided kernel, 0.8 ms per 256^3 map on an H100 (stop
                # 41's profile: 10.8 ms of a 160 ms inference frame when the builders still made row-major tables)
                hit = offset_major_table(*table.shape, table.device)
                hit.copy_(table)
            self._offset_major[reverse] = hit
        return hit

    def row_order(self, reverse: bool = False) -> Tensor:
        """int32 permutation grouping rows with the same set of non-empty taps (mask-sorted order).

        Rows are ordered by a random 64-bit hash of their tap mask; collisions only cost speed. Used by the
        Triton kernels (``sorted`` path) so tiles of strided / transposed maps skip the taps that are empty for all rows.
        """
        hit = self._row_order.get(reverse)
        if hit is None:
            if self._from_pairs(reverse):
                # the same hash summed over the pairs (integer sums wrap alike in any order): equal order
                n_in, kv = self._generated.shape
                h = torch.zeros(self.num_out, dtype=torch.int64, device=self.device)
                h.index_add_(0, self._generated.reshape(-1), _mask_hash_weights(kv, self.device).repeat(n_in))
            else:
                table = self.reverse() if reverse else self.nbr
                h = ((table >= 0).to(torch.int64) * _mask_hash_weights(table.shape[1], table.device)).sum(dim=1)
            hit = torch.argsort(h, stable=True).to(torch.int32)
            self._row_order[reverse] = hit
        return hit

    def _from_pairs(self, reverse: bool) -> bool:
        """Whether the forward table's row order and tile taps come from the generated pairs (the accumulating
        ``index_add_`` of the hash is left out under ``torch.use_deterministic_algorithms``)."""
        return not reverse and self._generated is not None and not torch.are_deterministic_algorithms_enabled()

    def tile_taps(self, reverse: bool, block_m: int, sorted_rows: bool) -> Tensor:
        """``(cdiv(N, block_m), KV)`` int32: per tile of ``block_m`` rows, its non-empty taps first, then -1.

        Rows are taken in :meth:`row_order` when ``sorted_rows``, else in storage order. A tap that is empty for
        every row of a tile is absent from the tile's list, so the GEMM kernels never read its table column.
        """
        key = (bool(reverse), int(block_m), bool(sorted_rows))
        hit = self._tile_taps.get(key)
        if hit is None:
            table = self.reverse() if reverse else self.nbr
            n, kv = table.shape
            tiles = -(-n // block_m)
            if not self._from_pairs(reverse) and is_offset_major(table) and use_triton_builder(table.device):
                from .kmap_triton import tile_tap_lists

                hit = tile_tap_lists(table.t(), block_m, self.row_order(reverse) if sorted_rows else None)
                self._tile_taps[key] = hit
                return hit
            if self._from_pairs(reverse):
                rows = self._generated.to(torch.int64)
                if sorted_rows:  # each output row's position in the row order
                    rank = torch.empty(n, dtype=torch.int64, device=table.device)
                    rank[self.row_order(reverse).long()] = torch.arange(n, dtype=torch.int64, device=table.device)
                    rows = rank[rows]
                any_row = torch.zeros((tiles, kv), dtype=torch.bool, device=table.device)
                any_row[rows // block_m, torch.arange(kv, device=table.device)[None, :]] = True
            else:
                # offset-major (KV, N), the tables' storage order: the row gather of the sorted order then reads
                # each offset's row of the table contiguously (a row-major gather of it ran at a fraction of the
                # memory bandwidth: 6.3 ms of a 117 ms inference frame on an H100, stop 44)
                occ = table.t() >= 0
                if sorted_rows:
                    occ = occ[:, self.row_order(reverse).long()]
                if tiles * block_m != n:
                    occ = torch.cat([occ, occ.new_zeros((kv, tiles * block_m - n))], dim=1)
                any_row = occ.reshape(kv, tiles, block_m).any(dim=2).t()
            tap = torch.arange(kv, dtype=torch.int32, device=table.device).expand(tiles, kv)
            ordered = torch.where(any_row, tap, kv).sort(dim=1).values
            hit = torch.where(ordered < kv, ordered, -1).to(torch.int32).contiguous()
            self._tile_taps[key] = hit
        return hit

    def tile_tap_counts(self, reverse: bool, block_m: int, sorted_rows: bool) -> Tensor:
        """``(cdiv(N, block_m),)`` int32: how many leading entries of each tile's :meth:`tile_taps` list are taps
        (the GEMM kernels' loop bound, so their loop body needs no test for the -1 padding)."""
        key = (bool(reverse), int(block_m), bool(sorted_rows))
        hit = self._tile_tap_counts.get(key)
        if hit is None:  # only the opt-in counted loop reads it, so the default path never builds it
            hit = (self.tile_taps(reverse, block_m, sorted_rows) >= 0).sum(dim=1, dtype=torch.int32)
            self._tile_tap_counts[key] = hit
        return hit

    def fill(self, reverse: bool = False) -> float:
        """Fraction of non-empty entries of the (reverse) table: 0.7 for a dense subm k3, <= 1/8 for a strided
        input gradient (one host sync, cached)."""
        hit = self._fill.get(reverse)
        if hit is None:
            if reverse:
                nnz, rows = self.num_pairs(), self.num_in
            else:
                nnz, rows = self.num_pairs(), self.num_out
            hit = nnz / max(1, rows * self.kernel_volume)
            self._fill[reverse] = hit
        return hit

    def gather_index(self, reverse: bool, start: int, stop: int) -> Tensor:
        """Flat int64 row indices of the torch backend's gather form (cached), one per (row, offset ``k``) of the
        table's columns ``start .. stop - 1``, row by row:

        * forward table: row ``p * (stop - start) + (k - start)`` of the per-offset products ``feats @ W[k]``
          ``(N_in, stop - start, C)`` seen as rows of C, or ``N_in * (stop - start)`` (a zero row after them)
          where the entry is -1;
        * reverse table: the output row ``q`` that reads input ``p`` through ``k``, or ``N_out`` (a zero row).
        """
        key = (bool(reverse), int(start), int(stop))
        hit = self._gather_index.get(key)
        if hit is None:
            table = (self.reverse() if reverse else self.nbr)[:, start:stop].to(torch.int64)
            if reverse:
                hit = torch.where(table >= 0, table, self.num_out)
            else:
                width = stop - start
                taps = torch.arange(width, dtype=torch.int64, device=table.device)
                hit = torch.where(table >= 0, table * width + taps, self.num_in * width)
            hit = hit.contiguous().view(-1)
            self._gather_index[key] = hit
        return hit

    def pair_starts(self) -> tuple[Tensor, Tensor, Tensor, int]:
        """Pairs grouped by offset as device tensors: (in_idx, out_idx, starts[KV+1], max pairs per offset)."""
        in_idx, out_idx, counts = self.pairs()
        # cumulated on the device from the bincount (no host-to-device copy per kernel map)
        starts = torch.zeros(self.kernel_volume + 1, dtype=torch.int64, device=self.device)
        starts[1:] = torch.cumsum(self._counts, 0)
        return in_idx, out_idx, starts, max(counts) if counts else 0

    def num_pairs(self) -> int:
        if self._generated is not None:  # every (input, offset) pair exists: no pass over the table, no sync
            return int(self._generated.numel())
        return int((self.nbr >= 0).sum())


def _search_lookup(in_set: CoordinateSet, out_set: CoordinateSet, deltas: Tensor, host_deltas: Tensor) -> Tensor:
    """Sorted-key search lookup; ``host_deltas``: the same offsets on the host (they bound the queries)."""
    n_out, kv = out_set.num_voxels, deltas.shape[0]
    nbr = offset_major_table(n_out, kv, out_set.device)
    if n_out == 0 or in_set.num_voxels == 0 or kv == 0:
        return nbr
    lo, hi = _offset_box(out_set, host_deltas)
    if min(lo) >= COORD_MIN and max(hi) <= COORD_MAX:
        # Additive packed keys: key(q + d) = key(q) + key_delta(d) when no axis leaves its 16-bit field.
        dkey = host_to_device(key_deltas(host_deltas.tolist()), out_set.device)
        for start in range(0, kv, _OFFSET_CHUNK):
            d = dkey[start : start + _OFFSET_CHUNK]
            q = out_set.keys[:, None] + d[None, :]
            idx = torch.searchsorted(in_set.keys, q)
            idx.clamp_(max=in_set.num_voxels - 1)
            found = in_set.keys[idx] == q
            nbr[:, start : start + d.shape[0]] = torch.where(found, idx, -1).to(torch.int32)
        return nbr
    # Rare slow path: explicit coordinates with a range check per query.
    from .coords import in_key_range, pack_keys

    for k in range(kv):
        q = out_set.coords.clone()
        q[:, 1:] += deltas[k]
        ok = in_key_range(q[:, 1:])
        qk = pack_keys(torch.where(ok[:, None], q, torch.zeros_like(q)))
        idx = torch.searchsorted(in_set.keys, qk).clamp_(max=in_set.num_voxels - 1)
        found = (in_set.keys[idx] == qk) & ok
        nbr[:, k] = torch.where(found, idx, -1).to(torch.int32)
    return nbr


def _offset_box(out_set: CoordinateSet, deltas: Tensor) -> tuple[list[int], list[int]]:
    """Smallest and largest corner ``([x, y, z], [x, y, z])`` of every query ``q + d`` (host ints).

    ``deltas`` are the host-side offsets; the set's bounds are read once per set (:meth:`CoordinateSet.bounds`),
    so the maps of every layer on one output set share that host sync."""
    return out_set.shifted_bounds(deltas.tolist())


def _query_box(out_set: CoordinateSet, deltas: Tensor, step: int) -> tuple[list[int], list[int]]:
    """Lower corner and extent (in ``step`` units) of the box every query ``q + d`` lies in, host ints
    (:func:`_offset_box`; ``deltas`` on the host)."""
    lo, hi = _offset_box(out_set, deltas)
    ext = [(h - low) // step + 1 for low, h in zip(lo, hi, strict=True)]
    return lo, ext


def index_grid_cells(in_set: CoordinateSet, out_set: CoordinateSet, kernel_size: int, dilation: int = 1,
                     transposed: bool = False) -> int:
    """Cells of the index grid a kernel map between these sets needs (all batch items): the ``auto`` builder
    uses the grid when this is at most :func:`grid_max_cells`, else the search."""
    if out_set.num_voxels == 0:
        return 0
    deltas = _map_deltas(in_set, out_set, kernel_size, dilation, transposed)
    step = _lattice_step(in_set, out_set, deltas)
    _, ext = _query_box(out_set, deltas, step)
    return max(out_set.batch_size, in_set.batch_size) * math.prod(ext)


def _map_deltas(in_set: CoordinateSet, out_set: CoordinateSet, kernel_size: int, dilation: int,
                transposed: bool) -> Tensor:
    """Finest-unit offsets of a map's taps, on the CPU (a convolution reads ``q + offset * in stride``, a
    transposed one ``q - offset * out stride``)."""
    offs = kernel_offsets(kernel_size, dilation)
    return -offs * out_set.stride if transposed else offs * in_set.stride


def _lattice_step(in_set: CoordinateSet, out_set: CoordinateSet, deltas: Tensor) -> int:
    """The index grid's cell size: the gcd of both strides and every offset (read from host-side offsets, so
    no device sync)."""
    units = [in_set.stride, out_set.stride] + sorted({abs(int(v)) for v in deltas.flatten().tolist()})
    return reduce(math.gcd, units)


def _grid_lookup(in_set: CoordinateSet, out_set: CoordinateSet, step: int, host_deltas: Tensor) -> Tensor | None:
    """Index-grid lookup over the queried box; None when the box is larger than ``GRID_MAX_CELLS``.
    ``host_deltas``: the offsets on the host (they size the box without a device read)."""
    n_out, kv = out_set.num_voxels, host_deltas.shape[0]
    if n_out == 0 or in_set.num_voxels == 0 or kv == 0:
        return offset_major_table(n_out, kv, out_set.device)
    lo, ext = _query_box(out_set, host_deltas, step)
    nb = max(out_set.batch_size, in_set.batch_size)
    if nb * math.prod(ext) > grid_max_cells():
        return None
    ex, ey, ez = ext
    # the offsets' linear steps in the grid, worked out on the host: they also size the clean cells the padding
    # rows read
    host_dlin = [(dx * ey + dy) * ez + dz for dx, dy, dz in (host_deltas // step).tolist()]
    if use_triton_builder(out_set.device):  # the same lookup in a few launches (module frustum3d.sparse.kmap_triton)
        from .kmap_triton import grid_table

        storage = grid_table(in_set.keys, out_set.keys, lo, ext, step, nb, host_dlin, padded_rows(n_out))
        return storage[:, :n_out].t()
    # (b, x, y, z) columns at once, one copy of the box: lower corner, lattice step, linear strides, extent
    box = host_to_device([0, *lo] + [1, step, step, step] + [ex * ey * ez, ey * ez, ez, 1] + [nb, *ext] + host_dlin,
                         out_set.device)
    lo_t, step_t, lin_t, ext_t, dlin = box[0:4], box[4:8], box[8:12], box[12:16], box[16:]
    spare = nb * ex * ey * ez  # one cell past the box (below)
    clean = spare + 1 - min(host_dlin)  # padding row base: base + dlin lands in [spare + 1, spare + 1 + span]
    grid = torch.full((clean + max(host_dlin) + 1,), -1, dtype=torch.int32, device=out_set.device)
    # Rows outside the box go to one spare cell past its end, which no query reads: no nonzero(), no sync.
    rel = (in_set.coords - lo_t) // step_t
    inside = ((rel >= 0) & (rel < ext_t)).all(dim=1)
    lin = (rel * lin_t).sum(dim=1)
    grid[torch.where(inside, lin, spare)] = torch.arange(in_set.num_voxels, dtype=torch.int32, device=rel.device)
    # Every query q + d lies inside the box by construction: a single gather, no bounds checks.
    base = ((out_set.coords - lo_t) // step_t * lin_t).sum(dim=1)
    # gathered offset-major, (KV, N padded to 16) with -1 in the padding rows: the layout the Triton kernels read,
    # so KernelMap.offset_major needs no transposed copy, and each offset's row is written contiguously
    n_pad = padded_rows(n_out)
    if n_pad > n_out:
        base = torch.cat([base, base.new_full((n_pad - n_out,), clean)])
    return grid[dlin[:, None] + base[None, :]][:, :n_out].t()


def build_neighbour_table(
    in_set: CoordinateSet, out_set: CoordinateSet, deltas: Tensor, method: str = "auto"
) -> Tensor:
    """``nbr[q, k]`` = row of ``in_set`` at ``out_set.coords[q] + deltas[k]`` (finest units), else -1."""
    if method not in _METHODS:
        raise ValueError(f"kernel-map method must be one of {_METHODS}, got {method!r}")
    host = deltas.to(device="cpu", dtype=torch.int64)  # kernel offsets come on the CPU: no copy, no sync
    step = _lattice_step(in_set, out_set, host)
    if method in ("auto", "grid"):
        table = _grid_lookup(in_set, out_set, step, host)
        if table is not None:
            return table
        if method == "grid":
            raise ValueError(
                f"index grid would exceed GRID_MAX_CELLS={grid_max_cells()}; use method='search' or 'auto' (or "
                "raise FRUSTUM3D_KMAP_GRID_CELLS)"
            )
    return _search_lookup(in_set, out_set, host_to_device(host, out_set.device), host)


def grid_max_cells() -> int:
    """``GRID_MAX_CELLS``, or ``FRUSTUM3D_KMAP_GRID_CELLS`` when set (a positive integer)."""
    raw = os.environ.get("FRUSTUM3D_KMAP_GRID_CELLS", "").strip()
    if not raw:
        return GRID_MAX_CELLS
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"FRUSTUM3D_KMAP_GRID_CELLS must be a positive number of cells, got {raw!r}")
    return value


def use_triton_builder(device: torch.device) -> bool:
    """Whether kernel maps on ``device`` are built by the Triton kernels of :mod:`frustum3d.sparse.kmap_triton`
    (same tables, fewer device operations): ``FRUSTUM3D_KMAP_TRITON`` = ``auto`` (the default: on CUDA when
    Triton imports), ``0`` (never: the torch ops) or ``1`` (also on CPU under the Triton interpreter, for tests)."""
    mode = os.environ.get("FRUSTUM3D_KMAP_TRITON", "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"FRUSTUM3D_KMAP_TRITON must be auto, 0 or 1, got {mode!r}")
    if mode == "0" or not triton_available():
        return False
    if device.type == "cuda":
        return True
    return mode == "1" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_method() -> str:
    """Kernel-map builder from ``FRUSTUM3D_KMAP`` (auto|grid|search), default ``auto``."""
    m = os.environ.get("FRUSTUM3D_KMAP", "auto").strip().lower()
    if m not in _METHODS:
        raise ValueError(f"FRUSTUM3D_KMAP must be one of {_METHODS}, got {m!r}")
    return m


def get_kernel_map(
    in_set: CoordinateSet,
    out_set: CoordinateSet,
    kernel_size: int,
    dilation: int = 1,
    transposed: bool = False,
    method: str | None = None,
) -> KernelMap:
    """Cached kernel map between two coordinate sets.

    Convolution (``transposed=False``): out q reads in ``q + offset_k * in_set.stride``.
    Transposed (``transposed=True``): out q reads in ``q - offset_k * out_set.stride``.
    Cached on ``in_set`` per (out set, kernel_size, dilation, transposed).
    """
    key = ("kmap", out_set.uid, int(kernel_size), int(dilation), bool(transposed))
    hit = in_set.cache.get(key)
    if hit is not None:
        return hit
    method = method or default_method()
    rows = None
    if transposed and dilation == 1 and method == "auto" and in_set.stride % out_set.stride == 0:
        rows = in_set.generated_rows(out_set, generative_key(kernel_size, in_set.stride // out_set.stride))
    if rows is not None:  # out_set was generated from in_set by this very convolution
        kmap = KernelMap.from_generated_rows(rows, out_set.num_voxels)
        in_set.cache[key] = kmap
        return kmap
    deltas = _map_deltas(in_set, out_set, kernel_size, dilation, transposed)
    nbr = build_neighbour_table(in_set, out_set, deltas, method)
    kmap = KernelMap(nbr, in_set.num_voxels)
    in_set.cache[key] = kmap
    return kmap
