"""Coordinate sets: sorted, unique voxel coordinates plus the caches derived from them.

A :class:`CoordinateSet` is the sparse analogue of MinkowskiEngine's coordinate map: the integer voxel
coordinates ``(batch, x, y, z)`` of one sparse tensor, in finest-grid units and all multiples of the tensor
``stride``. Rows are sorted by a packed int64 key (batch most significant, then x, y, z), so row order is
deterministic and pruning is a plain boolean index. Every set carries a cache: kernel maps keyed by
(output set, kernel size, dilation, transposed), the coarser sets made from it by strided convolutions, the
generative sets made from it by transposed convolutions, and links to the finer sets it was downsampled from
(used by non-generative transposed convolutions to return to the encoder's coordinates).

Sparse tensors produced from one another share these objects, so a residual block's two convolutions, its
downsample branch and later heads reuse one kernel map instead of rebuilding it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .transfer import host_to_device

__all__ = [
    "COORD_MAX",
    "COORD_MIN",
    "CoordinateSet",
    "SparseCoordinateError",
    "generative_key",
    "key_deltas",
    "pack_keys",
    "unpack_keys",
]

# Packed key layout: 16 bits per spatial axis (offset so negative coordinates pack), batch above them.
_AXIS_BITS = 16
_AXIS_OFFSET = 1 << (_AXIS_BITS - 1)
COORD_MIN = -_AXIS_OFFSET
COORD_MAX = _AXIS_OFFSET - 1
_MAX_BATCH = 1 << 14

_uid_counter = itertools.count()


class SparseCoordinateError(ValueError):
    """Raised for invalid sparse coordinates (wrong shape, duplicates, off-stride, out of range)."""


def pack_keys(coords: Tensor) -> Tensor:
    """Pack ``(N, 4)`` integer coordinates ``(b, x, y, z)`` into sortable int64 keys.

    Coordinates must lie in ``[COORD_MIN, COORD_MAX]`` and batch indices in ``[0, 2**14)``; the caller checks
    the range (see :func:`in_key_range`). Sorting keys sorts rows lexicographically by (b, x, y, z).
    """
    c = coords.to(torch.int64)
    key = c[:, 0]
    for axis in (1, 2, 3):
        key = (key << _AXIS_BITS) | (c[:, axis] + _AXIS_OFFSET)
    return key


def unpack_keys(keys: Tensor) -> Tensor:
    """Inverse of :func:`pack_keys`: int64 keys to ``(N, 4)`` int64 coordinates."""
    mask = (1 << _AXIS_BITS) - 1
    z = (keys & mask) - _AXIS_OFFSET
    y = ((keys >> _AXIS_BITS) & mask) - _AXIS_OFFSET
    x = ((keys >> (2 * _AXIS_BITS)) & mask) - _AXIS_OFFSET
    b = keys >> (3 * _AXIS_BITS)
    return torch.stack([b, x, y, z], dim=1)


def key_deltas(shifts: Sequence[Sequence[int]]) -> list[int]:
    """Packed-key steps of spatial ``(dx, dy, dz)`` shifts: ``pack_keys(p + s) == pack_keys(p) + step`` whenever
    ``p + s`` stays in the key range (no axis field carries), so a shifted set's keys are one addition away."""
    return [(int(dx) << (2 * _AXIS_BITS)) + (int(dy) << _AXIS_BITS) + int(dz) for dx, dy, dz in shifts]


def generative_key(kernel_size: int, stride: int) -> tuple[str, int, int]:
    """Cache key of the set a generative transposed convolution (``kernel_size``, ``stride``) makes with
    :meth:`CoordinateSet.generate` from the offsets ``kernel_offsets(kernel_size)`` (dilation 1)."""
    return ("gen", int(kernel_size), int(stride))


def in_key_range(xyz: Tensor) -> Tensor:
    """Boolean mask over rows of ``(..., 3)`` spatial coordinates that fit the packed-key range."""
    return ((xyz >= COORD_MIN) & (xyz <= COORD_MAX)).all(dim=-1)


def _generate_on_grid(keys: Tensor, steps: list[list[int]], lo: list[int], hi: list[int], stride: int,
                      batch_size: int) -> tuple[Tensor, Tensor] | None:
    """The generated set's sorted keys and each candidate's row through a marked index grid over the candidates'
    box (:func:`frustum3d.sparse.kmap_triton.generate_unique`: a few launches and a prefix sum instead of
    sorting ``N * KV`` candidates), where the Triton map builders run and the box fits the grid limit; else None
    (the caller sorts). Same results as the sort-based unique."""
    from .kernel_map import grid_max_cells, use_triton_builder  # kernel_map imports this module

    if not use_triton_builder(keys.device):
        return None
    ext = [(h - low) // stride + 1 for low, h in zip(lo, hi, strict=True)]
    if batch_size * ext[0] * ext[1] * ext[2] > grid_max_cells():
        return None
    from .kmap_triton import generate_unique

    dlin = [((dx // stride) * ext[1] + dy // stride) * ext[2] + dz // stride for dx, dy, dz in steps]
    return generate_unique(keys, lo, ext, stride, batch_size, dlin)


class CoordinateSet:
    """Sorted unique voxel coordinates of one sparse tensor, with its kernel-map and coordinate caches.

    Args:
        coords: ``(N, 4)`` int64 ``(batch, x, y, z)`` in finest-grid units, already sorted and unique
            (use :meth:`from_coords` for arbitrary input), or None: unpacked from ``keys`` when first read.
        keys: the packed keys of ``coords`` (sorted ascending).
        stride: tensor stride; every spatial coordinate is a multiple of it.
        spatial_shape: finest-grid dimensions ``(X, Y, Z)``.
        batch_size: number of batch items.

    The keys are the set's identity; the coordinates are derived. A set made from keys (a downsampled, generated,
    united or pruned set) unpacks them only when something reads :attr:`coords`: on a GPU the kernel maps, the
    batch index and the power-of-two downsampling work from the keys, so a large candidate set that is only
    convolved and pruned is never unpacked.
    """

    def __init__(
        self,
        coords: Tensor | None,
        keys: Tensor,
        stride: int,
        spatial_shape: tuple[int, int, int],
        batch_size: int,
    ) -> None:
        self._coords = coords
        self.keys = keys
        self.stride = int(stride)
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        self.batch_size = int(batch_size)
        self.uid = next(_uid_counter)
        # Finer coordinate sets this one descends from, by stride (for non-generative transposed convs).
        self.finer: dict[int, CoordinateSet] = {}
        self.cache: dict[Any, Any] = {}

    # ----------------------------------------------------------------------------------------- creation
    @classmethod
    def from_coords(
        cls,
        coords: Tensor,
        stride: int,
        spatial_shape: tuple[int, int, int],
        batch_size: int | None = None,
    ) -> tuple[CoordinateSet, Tensor]:
        """Validate, sort and wrap user coordinates.

        Returns the set and the permutation ``order`` such that ``set.coords == coords[order]`` (``arange`` when
        the rows already come sorted and unique, found within the one host read of the checks: then nothing is
        sorted or gathered, and ``cache["input_order_is_identity"]`` says so without a device read).
        Raises :class:`SparseCoordinateError` on a wrong shape, duplicates, off-stride or out-of-range values.
        """
        if coords.dim() != 2 or coords.shape[1] != 4:
            raise SparseCoordinateError(
                f"coords must have shape (N, 4) = (batch, x, y, z), got {tuple(coords.shape)}"
            )
        if coords.dtype.is_floating_point or coords.dtype == torch.bool:
            raise SparseCoordinateError(f"coords must be an integer tensor, got {coords.dtype}")
        if stride < 1:
            raise SparseCoordinateError(f"stride must be >= 1, got {stride}")
        if len(spatial_shape) != 3:
            raise SparseCoordinateError(f"spatial_shape must be (X, Y, Z), got {spatial_shape}")
        coords = coords.to(torch.int64)
        n = coords.shape[0]
        keys = pack_keys(coords)  # meaningful once the range checks below pass
        already_sorted = True
        if n > 0:
            b = coords[:, 0]
            # every check in one device-to-host read (one GPU sync per set, not one per check), with the set's
            # bounds (:meth:`bounds`), which the kernel maps and the sets derived from this one then know for free,
            # and whether the rows already come sorted and unique (strictly increasing keys: no sort, no gather)
            xyz = coords[:, 1:]
            ascending = (keys[1:] > keys[:-1]).all().long()  # True for one row (empty comparison)
            checks = torch.cat([torch.stack([b.min(), b.max(), (~in_key_range(xyz)).any().long(),
                                             (xyz % stride != 0).any().long(), ascending]),
                                xyz.min(dim=0).values, xyz.max(dim=0).values]).tolist()
            b_min, b_max, out_of_range, off_stride, already_sorted = checks[:5]
            bounds = (checks[5:8], checks[8:11])
            if b_min < 0 or b_max >= _MAX_BATCH:
                raise SparseCoordinateError(f"batch indices must lie in [0, {_MAX_BATCH}), got {b_min}..{b_max}")
            if out_of_range:
                raise SparseCoordinateError(
                    f"spatial coordinates out of range: they must lie in [{COORD_MIN}, {COORD_MAX}] (finest-grid units)"
                )
            if stride > 1 and off_stride:
                raise SparseCoordinateError(
                    f"coordinates must be multiples of the tensor stride {stride} (finest-grid units)"
                )
            max_b = b_max + 1
        else:
            max_b = 0
        if batch_size is None:
            batch_size = max(max_b, 1)
        elif batch_size < max_b:
            raise SparseCoordinateError(f"batch_size={batch_size} but coords hold batch index {max_b - 1}")
        if already_sorted:  # a copy, as the sorted path makes: the caller may reuse its tensor
            out = cls(coords.clone(), keys, stride, spatial_shape, batch_size)
            order = torch.arange(n, device=coords.device)
        else:
            sorted_keys, order = torch.sort(keys, stable=True)
            if n > 1 and bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
                raise SparseCoordinateError("coords contain duplicate rows; coordinates must be unique per batch item")
            out = cls(coords[order], sorted_keys, stride, spatial_shape, batch_size)
        # SparseVoxels reads this instead of comparing ``order`` with arange on the device (a sync)
        out.cache["input_order_is_identity"] = bool(already_sorted)
        if n > 0:
            out.cache["bounds"] = bounds
        return out, order

    @classmethod
    def from_sorted_keys(
        cls, keys: Tensor, stride: int, spatial_shape: tuple[int, int, int], batch_size: int
    ) -> CoordinateSet:
        """Build a set from already sorted, unique packed keys (internal fast path; coordinates unpacked lazily)."""
        return cls(None, keys, stride, spatial_shape, batch_size)

    # ----------------------------------------------------------------------------------------- properties
    @property
    def coords(self) -> Tensor:
        """``(N, 4)`` int64 ``(batch, x, y, z)`` (unpacked from the keys on first read, then kept)."""
        if self._coords is None:
            self._coords = unpack_keys(self.keys)
        return self._coords

    @property
    def num_voxels(self) -> int:
        return int(self.keys.shape[0])

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def to(self, device: torch.device | str) -> CoordinateSet:
        """The same coordinates on ``device`` (a new set: caches and links stay with this one)."""
        coords = None if self._coords is None else self._coords.to(device)
        return CoordinateSet(coords, self.keys.to(device), self.stride, self.spatial_shape, self.batch_size)

    def batch_index(self) -> Tensor:
        """int64 ``[N]`` batch item of every row (the coordinates' first column, read from the keys when the
        coordinates were not unpacked)."""
        if self._coords is not None:
            return self._coords[:, 0]
        return self.keys >> (3 * _AXIS_BITS)

    def inside(self, spatial_shape: Sequence[int]) -> Tensor:
        """Bool ``[N]``: which rows lie inside the grid ``[0, X) x [0, Y) x [0, Z)`` (finest units), read from the
        keys' axis fields, so the coordinates need not be unpacked (a generated candidate set can have millions of
        rows, a few of them past the grid's border)."""
        limits = host_to_device([_AXIS_OFFSET + int(d) for d in spatial_shape], self.device)
        fields = self._axis_fields()  # inside is [offset, offset + dim) on every axis
        return ((fields >= _AXIS_OFFSET) & (fields < limits)).all(1)

    def _axis_fields(self) -> Tensor:
        """``(N, 3)`` int64 x, y, z fields of the keys: the coordinates plus the axis offset, without unpacking
        the batch column or subtracting (for the in-grid test and the bounds)."""
        shifts = host_to_device([2 * _AXIS_BITS, _AXIS_BITS, 0], self.device)
        return (self.keys[:, None] >> shifts) & ((1 << _AXIS_BITS) - 1)

    def same_as(self, other: CoordinateSet) -> bool:
        """True when both sets hold identical coordinates at the same stride (identity is the fast path)."""
        if self is other:
            return True
        if self.stride != other.stride or self.num_voxels != other.num_voxels:
            return False
        return bool(torch.equal(self.keys, other.keys))

    def inherit_links(self, *parents: CoordinateSet) -> None:
        """Copy the finer-set links of ``parents`` (pruned / united sets still descend from the same maps)."""
        for p in parents:
            for s, fine in p.finer.items():
                self.finer.setdefault(s, fine)

    # ----------------------------------------------------------------------------------------- derived sets
    def select(self, mask: Tensor) -> CoordinateSet:
        """Subset of rows where ``mask`` is True (order preserved, so the result stays sorted)."""
        return self.select_rows(mask.nonzero().flatten())

    def select_rows(self, rows: Tensor) -> CoordinateSet:
        """Subset of the given ascending int64 ``rows`` (one boolean selection's ``nonzero()``, shared with the
        features by :meth:`SparseVoxels.select`, so a pruning step synchronises once, not once per tensor)."""
        coords = None if self._coords is None else self._coords.index_select(0, rows)
        out = CoordinateSet(coords, self.keys.index_select(0, rows), self.stride, self.spatial_shape,
                            self.batch_size)
        out.inherit_links(self)
        return out

    def downsample(self, factor: int) -> CoordinateSet:
        """Coordinates floored to ``stride * factor`` (MinkowskiEngine strided-conv rule), cached per factor."""
        key = ("down", int(factor))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        new_stride = self.stride * factor
        if _AXIS_OFFSET % new_stride == 0:
            # a power-of-two stride that divides the axis offset: flooring an axis to it clears the low bits of
            # its offset field, for negative coordinates too (one op on the keys, no unpacking)
            low = new_stride - 1
            keys = torch.unique(self.keys & ~(low | low << _AXIS_BITS | low << 2 * _AXIS_BITS), sorted=True)
        else:
            c = self.coords.clone()
            c[:, 1:] = torch.div(c[:, 1:], new_stride, rounding_mode="floor") * new_stride
            keys = torch.unique(pack_keys(c), sorted=True)
        out = CoordinateSet.from_sorted_keys(keys, new_stride, self.spatial_shape, self.batch_size)
        known = self.known_bounds()
        if known is not None and self.num_voxels:  # flooring is monotonic: the floored bounds, no device read
            out.cache["bounds"] = tuple([v // new_stride * new_stride for v in side] for side in known)
        out.inherit_links(self)
        out.finer[self.stride] = self
        self.cache[key] = out
        return out

    def generate(self, offsets: Tensor, out_stride: int, cache_key: Any) -> CoordinateSet:
        """Every voxel ``p + offset * out_stride`` (generative transposed conv output), cached per ``cache_key``.

        The row each candidate ``(p, offset k)`` became is kept too (:meth:`generated_rows`): it is the transposed
        convolution's kernel map read from the input side, so that map needs no lookup over the output set."""
        hit = self.cache.get(cache_key)
        if hit is not None:
            return hit
        steps = (offsets.to(device="cpu", dtype=torch.int64) * out_stride).tolist()  # host offsets: no device read
        n, kv = self.num_voxels, len(steps)
        # The range check and the new set's bounds from this set's (cached) bounds and the offsets' on the host:
        # every candidate exists, so both are exact, and no (N * KV, 4) candidate coordinates are built.
        out_lo, out_hi = self.shifted_bounds(steps)
        if n and kv and (min(out_lo) < COORD_MIN or max(out_hi) > COORD_MAX):
            raise SparseCoordinateError("generated coordinates leave the supported range; prune the input first")
        marked = None
        if n and kv:
            marked = _generate_on_grid(self.keys, steps, out_lo, out_hi, out_stride, self.batch_size)
        if marked is not None:
            keys, rows = marked
        else:  # inside the range an offset adds a constant to every key
            cand = self.keys[:, None] + host_to_device(key_deltas(steps), self.device)[None, :]
            keys, rows = torch.unique(cand.reshape(-1), sorted=True, return_inverse=True)
        out = CoordinateSet.from_sorted_keys(keys, out_stride, self.spatial_shape, self.batch_size)
        if n and kv:
            out.cache["bounds"] = (out_lo, out_hi)
        self.cache[cache_key] = out
        # kept on this (the parent) set, keyed by the child's uid: a link from child to parent would make a cycle
        # that only the garbage collector frees, holding the large generated sets' memory
        self.cache[("generated_rows", out.uid)] = (cache_key, rows.view(n, kv).to(torch.int32))
        return out

    def generated_rows(self, out: CoordinateSet, cache_key: Any) -> Tensor | None:
        """``(N, KV)`` int32: the row of ``out`` that voxel ``p`` (row of this set) plus offset ``k`` became, when
        ``out`` was made by :meth:`generate` from this set under ``cache_key``; else None."""
        hit = self.cache.get(("generated_rows", out.uid))
        if hit is None or hit[0] != cache_key:
            return None
        return hit[1]

    def batch_counts(self) -> list[int]:
        """Voxels of every batch item (rows are sorted by batch index, so item b is one contiguous block of rows).

        Read from the device once per set and cached: every layer on the same coordinates (instance norms, per-item
        losses and query products) shares that one host sync instead of paying one each."""
        counts = self.cache.get("batch_counts")
        if counts is None:
            if self.num_voxels == 0:
                counts = [0] * self.batch_size
            elif self.batch_size == 1:  # every row is item 0's: no read
                counts = [self.num_voxels]
            else:
                counts = torch.bincount(self.batch_index(), minlength=self.batch_size).tolist()
            self.cache["batch_counts"] = counts
        return counts

    def bounds(self) -> tuple[list[int], list[int]]:
        """Smallest and largest spatial coordinate per axis ``([x, y, z], [x, y, z])`` over all rows (zeros for an
        empty set), read from the device once per set and cached: every kernel map built on this output set sizes
        its index grid from it without another host sync."""
        hit = self.cache.get("bounds")
        if hit is None:
            if self.num_voxels == 0:
                hit = ([0, 0, 0], [0, 0, 0])
            else:
                fields = self._axis_fields()
                lo, hi = torch.stack([fields.min(dim=0).values, fields.max(dim=0).values]).tolist()
                hit = ([v - _AXIS_OFFSET for v in lo], [v - _AXIS_OFFSET for v in hi])  # fields carry the offset
            self.cache["bounds"] = hit
        return hit

    def known_bounds(self) -> tuple[list[int], list[int]] | None:
        """:meth:`bounds` when already known on the host (read before, or derived when the set was made), else
        None (no device read)."""
        return self.cache.get("bounds")

    def shifted_bounds(self, shifts: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
        """Smallest and largest corner ``([x, y, z], [x, y, z])`` of every ``p + s`` over this set's voxels ``p``
        and the host-side ``shifts`` ``s`` (the set's own bounds when there are none): the box a kernel map's
        queries or a generated set's voxels lie in, from :meth:`bounds` without another device read."""
        lo, hi = self.bounds()
        if not shifts:
            return list(lo), list(hi)
        # the shifts' own bounds in Python: a torch min/max over dim 0 of a CPU tensor runs an OpenMP region even
        # for 27 rows (grain size 1), which cost about 1 ms per call on a busy 16-core training host (H200 profile
        # of the 3D step: 264 ms of host time in aten::max / aten::min per 5 steps; 471 us with 16 threads on 2
        # cores)
        cols = list(zip(*shifts))
        return ([int(a) + min(c) for a, c in zip(lo, cols, strict=True)],
                [int(a) + max(c) for a, c in zip(hi, cols, strict=True)])

    def __repr__(self) -> str:
        return (
            f"CoordinateSet(uid={self.uid}, num_voxels={self.num_voxels}, stride={self.stride}, "
            f"spatial_shape={self.spatial_shape}, batch_size={self.batch_size})"
        )
