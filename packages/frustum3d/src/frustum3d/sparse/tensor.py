"""``SparseVoxels``: features on sorted unique voxel coordinates, plus cat / union / pruning / dense conversion."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .coords import CoordinateSet, SparseCoordinateError

__all__ = ["SparseVoxels", "sparse_cat", "sparse_features_at", "sparse_union"]


class SparseVoxels:
    """A batch of sparse voxel grids: ``feats[i]`` lives at ``coords[i] = (batch, x, y, z)``.

    Coordinates are in **finest-grid units** and are multiples of ``stride`` (MinkowskiEngine's tensor stride):
    a level at 128^3 inside a 256^3 grid has ``stride=2`` and coordinates 0, 2, 4, ... ``spatial_shape`` is the
    finest grid ``(X, Y, Z)``. Rows are sorted by (batch, x, y, z) on construction (features permuted
    alongside), so results are deterministic and :meth:`select` is a boolean index.

    Args:
        coords: ``(N, 4)`` integer tensor ``(batch, x, y, z)``, unique.
        feats: ``(N, C)`` floating tensor.
        stride: tensor stride (>= 1).
        spatial_shape: finest-grid dims ``(X, Y, Z)``.
        batch_size: number of batch items (default: max batch index + 1).
    """

    __slots__ = ("_cset", "_feats")

    def __init__(
        self,
        coords: Tensor,
        feats: Tensor,
        stride: int = 1,
        spatial_shape: tuple[int, int, int] = (256, 256, 256),
        batch_size: int | None = None,
    ) -> None:
        if feats.dim() != 2:
            raise SparseCoordinateError(f"feats must have shape (N, C), got {tuple(feats.shape)}")
        if feats.shape[0] != coords.shape[0]:
            raise SparseCoordinateError(
                f"feats has {feats.shape[0]} rows but coords has {coords.shape[0]}; they must match"
            )
        if coords.device != feats.device:
            raise SparseCoordinateError(f"coords on {coords.device} but feats on {feats.device}")
        cset, order = CoordinateSet.from_coords(coords, stride, tuple(spatial_shape), batch_size)
        self._cset = cset
        self._feats = feats if cset.cache["input_order_is_identity"] else feats[order]

    # ----------------------------------------------------------------------------------------- internal
    @classmethod
    def from_set(cls, cset: CoordinateSet, feats: Tensor) -> SparseVoxels:
        """Wrap features on an existing coordinate set (no validation beyond the row count)."""
        if feats.dim() != 2 or feats.shape[0] != cset.num_voxels:
            raise SparseCoordinateError(
                f"feats must have shape ({cset.num_voxels}, C) for this coordinate set, got {tuple(feats.shape)}"
            )
        obj = cls.__new__(cls)
        obj._cset = cset
        obj._feats = feats
        return obj

    @property
    def coordinate_set(self) -> CoordinateSet:
        """The shared coordinate set (carries the kernel-map cache)."""
        return self._cset

    # ----------------------------------------------------------------------------------------- properties
    @property
    def coords(self) -> Tensor:
        return self._cset.coords

    @property
    def feats(self) -> Tensor:
        return self._feats

    @property
    def stride(self) -> int:
        return self._cset.stride

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return self._cset.spatial_shape  # type: ignore[return-value]

    @property
    def batch_size(self) -> int:
        return self._cset.batch_size

    @property
    def num_voxels(self) -> int:
        return self._cset.num_voxels

    @property
    def num_channels(self) -> int:
        return int(self._feats.shape[1])

    @property
    def device(self) -> torch.device:
        return self._feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self._feats.dtype

    def __len__(self) -> int:
        return self.num_voxels

    def __repr__(self) -> str:
        return (
            f"SparseVoxels(num_voxels={self.num_voxels}, channels={self.num_channels}, stride={self.stride}, "
            f"spatial_shape={self.spatial_shape}, batch_size={self.batch_size}, dtype={self.dtype}, "
            f"device={self.device})"
        )

    # ----------------------------------------------------------------------------------------- operations
    def replace_feats(self, feats: Tensor) -> SparseVoxels:
        """Same coordinates (and kernel-map cache), new ``(N, C')`` features."""
        return SparseVoxels.from_set(self._cset, feats)

    def select(self, mask: Tensor) -> SparseVoxels:
        """Keep rows where the boolean ``mask[N]`` is True (pruning); gradients flow to the kept rows."""
        if mask.dtype != torch.bool or mask.shape != (self.num_voxels,):
            raise SparseCoordinateError(
                f"select() needs a bool mask of shape ({self.num_voxels},), got {mask.dtype} {tuple(mask.shape)}"
            )
        rows = mask.nonzero().flatten()  # one selection (and one GPU sync) for coordinates, keys and features
        return SparseVoxels.from_set(self._cset.select_rows(rows), self._feats.index_select(0, rows))

    def to(self, *args, **kwargs) -> SparseVoxels:
        """Cast/move the features (``.to(dtype)``); moving devices rebuilds the coordinate set."""
        feats = self._feats.to(*args, **kwargs)
        if feats.device == self.device:
            return self.replace_feats(feats)
        return SparseVoxels.from_set(self._cset.to(feats.device), feats)

    def grid_shape(self) -> tuple[int, int, int]:
        """Dense grid dims at this stride: ``ceil(spatial_shape / stride)``."""
        s = self.stride
        return tuple(-(-d // s) for d in self.spatial_shape)  # type: ignore[return-value]

    def to_dense(self, default_value: float = 0.0) -> Tensor:
        """Dense ``(B, C, X/s, Y/s, Z/s)`` tensor; empty cells hold ``default_value``.

        Voxels outside the grid (e.g. produced by a generative transposed conv at the border) are dropped,
        as MinkowskiEngine's ``dense(shape, min_coordinate=0)`` does; prune them first to keep them explicit.
        """
        gx, gy, gz = self.grid_shape()
        c = self.coords
        xyz = torch.div(c[:, 1:], self.stride, rounding_mode="floor")
        inside = (xyz >= 0).all(dim=1) & (xyz[:, 0] < gx) & (xyz[:, 1] < gy) & (xyz[:, 2] < gz)
        feats = self._feats
        if not bool(inside.all()):
            xyz, c, feats = xyz[inside], c[inside], feats[inside]
        dense = feats.new_full((self.batch_size, gx, gy, gz, self.num_channels), default_value)
        dense = dense.index_put((c[:, 0], xyz[:, 0], xyz[:, 1], xyz[:, 2]), feats)
        return dense.permute(0, 4, 1, 2, 3)

    @classmethod
    def from_dense(cls, dense: Tensor, mask: Tensor, stride: int = 1) -> SparseVoxels:
        """Sparse tensor of the cells of ``dense[B, C, X, Y, Z]`` where ``mask[B, X, Y, Z]`` is True.

        ``dense`` is the grid at ``stride``; the finest-grid ``spatial_shape`` is ``(X, Y, Z) * stride``.
        """
        if dense.dim() != 5:
            raise SparseCoordinateError(f"dense must have shape (B, C, X, Y, Z), got {tuple(dense.shape)}")
        b, _, x, y, z = dense.shape
        if mask.shape != (b, x, y, z) or mask.dtype != torch.bool:
            raise SparseCoordinateError(
                f"mask must be bool with shape {(b, x, y, z)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        idx = mask.nonzero()  # lexicographic (b, x, y, z) = sorted key order
        coords = idx.clone()
        coords[:, 1:] *= stride
        feats = dense.permute(0, 2, 3, 4, 1)[mask]
        from .coords import pack_keys

        keys = pack_keys(coords)
        cset = CoordinateSet(coords, keys, stride, (x * stride, y * stride, z * stride), b)
        return cls.from_set(cset, feats)

    def __add__(self, other: SparseVoxels) -> SparseVoxels:
        """Feature sum on identical coordinates, else the zero-filled union (MinkowskiEngine ``a + b``)."""
        if self._cset.same_as(other._cset):
            return self.replace_feats(self._feats + other._feats)
        return sparse_union(self, other, mode="add")


def _check_compatible(a: SparseVoxels, b: SparseVoxels, what: str) -> None:
    if a.stride != b.stride:
        raise SparseCoordinateError(f"{what}: strides differ ({a.stride} vs {b.stride})")
    if a.spatial_shape != b.spatial_shape:
        raise SparseCoordinateError(f"{what}: spatial shapes differ ({a.spatial_shape} vs {b.spatial_shape})")
    if a.device != b.device:
        raise SparseCoordinateError(f"{what}: devices differ ({a.device} vs {b.device})")


def sparse_cat(*tensors: SparseVoxels) -> SparseVoxels:
    """Concatenate features of sparse tensors with identical coordinates (MinkowskiEngine ``cat``)."""
    if not tensors:
        raise ValueError("sparse_cat needs at least one tensor")
    first = tensors[0]
    for t in tensors[1:]:
        _check_compatible(first, t, "sparse_cat")
        if not first.coordinate_set.same_as(t.coordinate_set):
            raise SparseCoordinateError(
                "sparse_cat needs identical coordinates; use sparse_union for different coordinate sets"
            )
    return first.replace_feats(torch.cat([t.feats for t in tensors], dim=1))


def sparse_features_at(src: SparseVoxels, like: SparseVoxels) -> SparseVoxels:
    """``src``'s features at the voxels of ``like`` (zero where ``src`` has no voxel), on ``like``'s coordinate set.

    A skip connection into a level whose voxel set was grown and pruned after ``src`` was made (the decoder's
    finest level reading the lifted input) needs the earlier features at the later voxels, not the union of both.
    """
    _check_compatible(src, like, "sparse_features_at")
    sa, sb = src.coordinate_set, like.coordinate_set
    if sa.same_as(sb):
        return like.replace_feats(src.feats)
    out = src.feats.new_zeros((sb.num_voxels, src.num_channels))
    if sa.num_voxels and sb.num_voxels:
        pos = torch.searchsorted(sa.keys, sb.keys).clamp_(max=sa.num_voxels - 1)
        hit = sa.keys[pos] == sb.keys
        out = torch.where(hit[:, None], src.feats[pos], out)
    return SparseVoxels.from_set(sb, out)


def sparse_union(a: SparseVoxels, b: SparseVoxels, mode: Literal["cat", "add"] = "cat") -> SparseVoxels:
    """Union of the coordinates of ``a`` and ``b``; features missing on one side are zero.

    ``mode="cat"``: features ``[a_or_0, b_or_0]`` (C_a + C_b channels; ``sparse_cat_union`` of the reference).
    ``mode="add"``: ``a_or_0 + b_or_0`` (needs C_a == C_b; MinkowskiEngine ``a + b``).
    When one set contains the other, the larger set (and its kernel-map cache) is reused.
    """
    if mode not in ("cat", "add"):
        raise ValueError(f"sparse_union mode must be 'cat' or 'add', got {mode!r}")
    _check_compatible(a, b, "sparse_union")
    if mode == "add" and a.num_channels != b.num_channels:
        raise SparseCoordinateError(
            f"sparse_union(mode='add') needs equal channels, got {a.num_channels} and {b.num_channels}"
        )
    sa, sb = a.coordinate_set, b.coordinate_set
    if sa.same_as(sb):
        fa, fb = a.feats, b.feats
        return a.replace_feats(torch.cat([fa, fb], 1) if mode == "cat" else fa + fb)
    keys, inverse = torch.unique(torch.cat([sa.keys, sb.keys]), sorted=True, return_inverse=True)
    ia, ib = inverse[: sa.num_voxels], inverse[sa.num_voxels :]
    m = keys.shape[0]
    if m == sa.num_voxels:
        cset = sa
    elif m == sb.num_voxels:
        cset = sb
    else:
        cset = CoordinateSet.from_sorted_keys(keys, sa.stride, sa.spatial_shape, max(sa.batch_size, sb.batch_size))
        cset.inherit_links(sa, sb)
        ka, kb = sa.known_bounds(), sb.known_bounds()
        if ka is not None and kb is not None and sa.num_voxels and sb.num_voxels:  # no device read for the union's
            cset.cache["bounds"] = ([min(p, q) for p, q in zip(ka[0], kb[0], strict=True)],
                                    [max(p, q) for p, q in zip(ka[1], kb[1], strict=True)])
    dtype = torch.promote_types(a.dtype, b.dtype)
    fa, fb = a.feats.to(dtype), b.feats.to(dtype)
    if mode == "add":
        out = fa.new_zeros((m, fa.shape[1])).index_add(0, ia, fa).index_add(0, ib, fb)
    else:
        pa = fa.new_zeros((m, fa.shape[1])).index_copy(0, ia, fa)
        pb = fb.new_zeros((m, fb.shape[1])).index_copy(0, ib, fb)
        out = torch.cat([pa, pb], dim=1)
    return SparseVoxels.from_set(cset, out)
