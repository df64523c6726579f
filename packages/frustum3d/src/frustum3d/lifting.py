"""2D -> 3D lifting: turn per-pixel depth, image features and semantics into sparse voxels in the frustum grid.

Three lifters, each returning :class:`frustum3d.sparse.SparseVoxels` (coords ``(b, x, y, z)`` int64 in
finest-grid units, ``spatial_shape = grid_dims``):

* :func:`lift_depth` -- projective TSDF lifting (Dahnert / Uni-3D ``SparseProjection``). Every valid depth
  pixel ``(u, v)`` of the reduced plane is unprojected to a continuous grid point ``g`` (float64,
  :meth:`frustum3d.geometry.FrustumGeometry.camera_to_grid`) and replicated along the depth axis (grid
  axis 2) at offsets ``o = -t..t`` voxels (``2t+1`` copies, 7 for truncation 3). Copy ``o`` lands in voxel
  ``floor(g) + (0,0,o)`` and carries ``[sign(df), |df|] ++ features(u, v) ++ semantic(u, v)`` with
  ``df = frac(g_z) + o`` (the reference's projective distance, positive behind the observed surface). 2D
  features are sampled bilinearly at the pixel centres of the depth plane (``F.interpolate(...,
  align_corners=False)`` to (H, W)). Several contributions to one voxel are averaged (a deterministic
  sorted segment mean; the reference subsamples randomly). Points outside the grid are dropped.
* :func:`lift_depth_multiscale` -- the same at coarser voxels (stride 2/4/8 = 0.06/0.12/0.24 m for front3d) with
  fewer copies (5/3/1), one 2D feature map per level. Coarse voxel = ``floor(g / s) * s`` of the finest-grid
  point, so levels nest exactly inside the sparse encoder's strided levels (the reference builds a separate
  128^3 / 64^3 / 32^3 frustum whose rounding of the padding can differ by half a coarse voxel).
* :func:`occupancy_aware_lift` -- BUOL occupancy-aware lifting (see its docstring).
* :func:`fuse_lifted` -- union of two voxel sets with zero-padded feature concatenation.
* :func:`occupancy_pyramid` / :func:`fuse_multiscale` -- the front3d multi-scale input: the BUOL voxels
  max-pooled (k3, s2, MinkowskiEngine windows) to strides 2/4/8 and unioned with the multi-scale projective
  levels (256 + 16 = 272 channels in the reference).

Channel counts are derived, never hard-coded: ``projective_channels(C_feat, K) = 2 + C_feat + K`` and
``occupancy_channels(K) = K + 3`` (16 only when K = 13).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import geometry as G
from .sparse import SparseVoxels, sparse_max_pool3d, sparse_union
from .sparse.transfer import host_to_device

__all__ = [
    "projective_channels",
    "occupancy_channels",
    "lift_depth",
    "lift_depth_multiscale",
    "occupancy_aware_lift",
    "stuff_depth_limit",
    "fuse_lifted",
    "occupancy_pyramid",
    "fuse_multiscale",
]


def projective_channels(feature_channels: int, num_classes: int) -> int:
    """Channels of :func:`lift_depth` output: [sign(df), |df|] + 2D features + semantic probabilities."""
    return 2 + feature_channels + num_classes


def occupancy_channels(num_classes: int) -> int:
    """Channels of :func:`occupancy_aware_lift` output: semantic probs + occupancy prob + [sign(d), |d|]."""
    return num_classes + 3


def _lifting_geometry(
    geometry: G.FrustumGeometry | None,
    plane_size: tuple[int, int],
    grid_dims: Sequence[int] | None,
    voxel_size: float | None,
    depth_min: float | None,
    depth_max: float | None,
) -> G.FrustumGeometry:
    """The grid of one lifting call: ``geometry`` (whose plane must be the depth plane) or the legacy keywords
    (front3d values where None) on the depth plane."""
    legacy = {"grid_dims": grid_dims, "voxel_size": voxel_size, "depth_min": depth_min, "depth_max": depth_max}
    if geometry is None:
        return G.FrustumGeometry(
            grid_dims=tuple(G.FRONT3D_GRID if grid_dims is None else grid_dims),  # type: ignore[arg-type]
            voxel_size=G.FRONT3D_VOXEL_SIZE if voxel_size is None else voxel_size,
            depth_min=G.FRONT3D_DEPTH_RANGE[0] if depth_min is None else depth_min,
            depth_max=G.FRONT3D_DEPTH_RANGE[1] if depth_max is None else depth_max,
            plane_size=plane_size,
        )
    given = sorted(k for k, v in legacy.items() if v is not None)
    if given:
        raise ValueError(f"pass the grid either as geometry= or as {', '.join(given)}, not both")
    if geometry.plane_size != tuple(plane_size):
        raise ValueError(f"the depth plane is (W,H)={tuple(plane_size)} but geometry.plane_size is "
                         f"{geometry.plane_size}; resize the depth to the lifting plane or use geometry.rescaled()")
    return geometry


def _batched_intrinsic(intrinsic, batch: int, geometry: G.FrustumGeometry | None = None) -> Tensor:
    if intrinsic is None:
        if geometry is None:
            raise ValueError("intrinsic is required for lifting (pass it, or geometry= with a stored intrinsic; "
                             "see geometry.front3d_intrinsic())")
        intrinsic = geometry.plane_intrinsic()
    k = G._as_f64(intrinsic)
    if k.shape[-2:] not in ((3, 3), (4, 4)) or k.dim() not in (2, 3):
        raise ValueError(f"intrinsic must be [4,4], [3,3] or [B,4,4], got {tuple(k.shape)}")
    if k.dim() == 2:
        k = k.expand(batch, *k.shape)
    if k.shape[0] != batch:
        raise ValueError(f"intrinsic batch {k.shape[0]} != depth batch {batch}")
    return k


def _sample_to_plane(maps: Tensor | Sequence[Tensor] | None, batch: int, h: int, w: int, name: str) -> Tensor:
    """Resize (bilinear, align_corners=False) 2D maps to the depth plane and concatenate: [B, C, H, W]."""
    if maps is None:
        return torch.zeros(batch, 0, h, w)
    if isinstance(maps, Tensor):
        maps = [maps]
    out = []
    for m in maps:
        if m.dim() != 4 or m.shape[0] != batch:
            raise ValueError(f"{name} must be [B={batch}, C, h, w], got {tuple(m.shape)}")
        if m.shape[-2:] != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        out.append(m)
    return torch.cat(out, 1)


def _segment_mean(keys: Tensor, feats: Tensor) -> tuple[Tensor, Tensor]:
    """Deterministic mean of ``feats`` rows sharing a key: returns (unique sorted keys, means)."""
    uniq, inverse, counts = torch.unique(keys, sorted=True, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    means = torch.segment_reduce(feats[order], "mean", lengths=counts, axis=0)
    return uniq, means


def _pack(b: Tensor, xyz: Tensor, grid: Sequence[int]) -> Tensor:
    gx, gy, gz = grid
    return ((b * gx + xyz[:, 0]) * gy + xyz[:, 1]) * gz + xyz[:, 2]


def _unpack(keys: Tensor, grid: Sequence[int]) -> Tensor:
    gx, gy, gz = grid
    z = keys % gz
    r = keys // gz
    y = r % gy
    r = r // gy
    x = r % gx
    b = r // gx
    return torch.stack([b, x, y, z], 1)


def lift_depth(
    depth: Tensor,
    intrinsic=None,
    features: Tensor | Sequence[Tensor] | None = None,
    semantic: Tensor | None = None,
    *,
    geometry: G.FrustumGeometry | None = None,
    grid_dims: Sequence[int] | None = None,
    voxel_size: float | None = None,
    depth_min: float | None = None,
    depth_max: float | None = None,
    truncation: float | None = None,
    stride: int = 1,
    copies: int | None = None,
    include_distance: bool = True,
) -> SparseVoxels:
    """Projective TSDF lifting of a depth plane (module docstring).

    Args:
        depth: [B, H, W] metric depth on the lifting plane (e.g. 120x160); <= 0 or non-finite = invalid.
        intrinsic: [4,4] / [3,3] or [B,4,4] intrinsic **of that plane** (rescale it first); None = the
            intrinsic stored in ``geometry``.
        features: 2D feature map(s) [B, C_i, h_i, w_i], resized bilinearly to (H, W) and concatenated.
        semantic: per-pixel semantic probabilities [B, K, h, w] (resized bilinearly to (H, W) if needed).
        geometry: the finest frustum grid as a :class:`frustum3d.geometry.FrustumGeometry` (its
            ``plane_size`` must be (W, H) of ``depth``). Or, older form, the keywords
            grid_dims, voxel_size, depth_min, depth_max (front3d values when omitted); not both.
        truncation: t (default ``geometry.truncation``, 3); ``copies`` defaults to ``2*int(t)+1``.
        stride: 1 for the finest grid; s > 1 quantises to coarse voxels of s finest voxels.
        include_distance: prepend [sign(df), |df|] (2 channels).

    Returns:
        SparseVoxels with ``stride``, feats [N, 2*include_distance + C + K] (dtype of the features, float32
        when none are given).
    """
    if depth.dim() != 3:
        raise ValueError(f"depth must be [B, H, W], got {tuple(depth.shape)}")
    bsz, h, w = depth.shape
    dev = depth.device
    geo = _lifting_geometry(geometry, (w, h), grid_dims, voxel_size, depth_min, depth_max)
    # float64 on the host: the map below is host math. An intrinsic given on the device is read back here (one
    # wait); one given on the host (the Predictor's) costs no read back
    k_host = _batched_intrinsic(intrinsic, bsz, geometry).cpu()
    k = k_host.to(dev)
    c2g = geo.camera_to_grid(k_host).to(dev)  # from the host copy: no read back from the device
    gd = geo.grid_dims
    if truncation is None:
        truncation = geo.truncation if geometry is not None else G.FRONT3D_TRUNCATION
    n_copies = 2 * int(truncation) + 1 if copies is None else int(copies)
    if n_copies < 1 or n_copies % 2 == 0:
        raise ValueError(f"copies must be a positive odd number, got {n_copies}")
    half = n_copies // 2

    feat2d = _sample_to_plane(features, bsz, h, w, "features").to(dev)
    sem = _sample_to_plane(semantic, bsz, h, w, "semantic").to(dev)
    dtype = feat2d.dtype if feat2d.shape[1] else (sem.dtype if sem.shape[1] else torch.float32)
    pix_feats = torch.cat([feat2d.to(dtype), sem.to(dtype)], 1)  # [B, C+K, H, W]

    valid = torch.isfinite(depth) & (depth > 0)
    b_idx, v_idx, u_idx = valid.nonzero(as_tuple=True)
    z = depth[b_idx, v_idx, u_idx].to(torch.float64)
    kk = k[b_idx]
    x = (u_idx.double() - kk[:, 0, 2]) * z / kk[:, 0, 0]
    y = (v_idx.double() - kk[:, 1, 2]) * z / kk[:, 1, 1]
    cm = c2g[b_idx] if c2g.dim() == 3 else c2g.expand(len(b_idx), 4, 4)
    g = torch.stack([x, y, z], 1) * cm[:, 0, 0, None] + cm[:, :3, 3]  # continuous finest-grid coords
    gs = g / stride  # coarse-voxel units
    base = torch.floor(gs).long()
    frac_z = gs[:, 2] - base[:, 2].double()

    offsets = torch.arange(-half, half + 1, device=dev)
    n_pts = g.shape[0]
    cxyz = base[:, None, :].expand(n_pts, n_copies, 3).clone()
    cxyz[..., 2] += offsets[None, :]
    df = frac_z[:, None] + offsets[None, :].double()  # [P, copies]
    cxyz = cxyz.reshape(-1, 3) * stride  # finest-grid units, multiples of stride
    df = df.reshape(-1)
    rows = torch.arange(n_pts, device=dev).repeat_interleave(n_copies)
    inside = ((cxyz >= 0) & (cxyz < host_to_device(gd, dev))).all(1).nonzero()[:, 0]  # one sync for three
    cxyz, df, rows = cxyz[inside], df[inside], rows[inside]

    per_pix = pix_feats[b_idx, :, v_idx, u_idx][rows]  # [M, C+K]
    parts = [per_pix]
    if include_distance:
        parts.insert(0, torch.stack([torch.sign(df), df.abs()], 1).to(dtype))
    feats = torch.cat(parts, 1)
    keys = _pack(b_idx[rows], cxyz, gd)
    uniq, means = _segment_mean(keys, feats)
    coords = _unpack(uniq, gd)
    return SparseVoxels(coords, means, stride=stride, spatial_shape=gd, batch_size=bsz)


def lift_depth_multiscale(
    depth: Tensor,
    intrinsic,
    features: Sequence[Tensor],
    semantic: Tensor | None = None,
    *,
    strides: Sequence[int] = (2, 4, 8),
    copies: Sequence[int] = (5, 3, 1),
    include_distance: bool = False,
    geometry: G.FrustumGeometry | None = None,
    grid_dims: Sequence[int] | None = None,
    voxel_size: float | None = None,
    depth_min: float | None = None,
    depth_max: float | None = None,
) -> list[SparseVoxels]:
    """Multi-scale projective lifting: level i uses ``features[i]`` at ``strides[i]`` with ``copies[i]`` copies.

    The default channel layout is the reference's (the level's 2D features only; ``include_distance`` and
    ``semantic`` add [sign, |df|] and K channels). The grid: ``geometry`` or the older keywords, as in
    :func:`lift_depth`.
    """
    if not (len(features) == len(strides) == len(copies)):
        raise ValueError(f"need one feature map per level: {len(features)} maps, {len(strides)} strides, "
                         f"{len(copies)} copies")
    return [
        lift_depth(depth, intrinsic, f, semantic, geometry=geometry, grid_dims=grid_dims, voxel_size=voxel_size,
                   depth_min=depth_min, depth_max=depth_max, stride=s, copies=c,
                   include_distance=include_distance)
        for f, s, c in zip(features, strides, copies, strict=True)
    ]


def _fill_gaps(a: Tensor) -> Tensor:
    """Reference ``find_none`` along the last dim of ``a`` (>= 0), on a's device: each zero, scanned left to right
    and updated in place, becomes max(min of the non-zero values left of it, min of the non-zero values right of
    it), 0 if none.

    Without the scan: a filled zero is >= the minimum left of it, so the left minimum is the running minimum of
    the original non-zeros -- except when the row starts with zeros, whose fills are the row's minimum and then
    stay the left minimum everywhere. (The in-place scan was a host loop per zero, after a device-to-host copy.)
    """
    nz = a != 0
    inf = torch.full_like(a[..., :1], float("inf"))
    vals = torch.where(nz, a, inf)
    left = torch.cat([inf, vals[..., :-1]], -1).cummin(-1).values  # min over [0, i)
    right = torch.cat([vals[..., 1:], inf], -1).flip(-1).cummin(-1).values.flip(-1)  # min over (i, n)
    left = torch.where(nz[..., :1], left, vals.amin(-1, keepdim=True))
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    fill = torch.maximum(torch.where(left.isinf(), zero, left), torch.where(right.isinf(), zero, right))
    return torch.where(nz, a, fill)


def stuff_depth_limit(depth: Tensor, semantic_label: Tensor, stuff_classes: Sequence[int],
                      erosion: int = 5) -> Tensor:
    """Per-pixel far limit [B, H, W] (float64, on depth's device) from the stuff (wall/floor/ceiling) depth, as
    BUOL/TAO compute it.

    Stuff pixels (label in ``stuff_classes``) are eroded with an ``erosion`` x ``erosion`` window; the column
    maximum (over rows) and row maximum (over columns) of the stuff depth are gap-filled (:func:`_fill_gaps`)
    and the limit at (v, u) is ``min(colmax[u], rowmax[v])``. (The reference's border ``stuff_padding`` step is
    a no-op -- it only ever writes zeros -- and is omitted.)
    """
    stuff = torch.zeros_like(semantic_label, dtype=torch.bool)
    for c in stuff_classes:
        stuff |= semantic_label == c
    if erosion > 1:
        stuff = (-F.max_pool2d(-stuff.float()[:, None], erosion, 1, erosion // 2))[:, 0].bool()
    sd = depth.detach().to(torch.float64) * stuff
    col = _fill_gaps(sd.amax(1))  # [B, W]
    row = _fill_gaps(sd.amax(2))  # [B, H]
    return torch.minimum(col[:, None, :], row[:, :, None])


def _dilate(mask: Tensor, size: int) -> Tensor:
    """Binary dilation of a bool [X, Y, Z] volume by a ``size``^3 box (odd size), as three 1D max-pools: a box
    maximum is separable, and 3 x ``size`` comparisons per voxel replace ``size``^3 (half precision on CUDA)."""
    x = mask[None, None].to(torch.float16 if mask.is_cuda else torch.float32)
    p = size // 2
    for k in ((size, 1, 1), (1, size, 1), (1, 1, size)):
        x = F.max_pool3d(x, k, 1, tuple(p if n > 1 else 0 for n in k))
    return x[0, 0].bool()


def occupancy_aware_lift(
    semantic: Tensor,
    occupancy_logits: Tensor,
    depth: Tensor,
    intrinsic,
    frustum: Tensor | None = None,
    *,
    stuff_classes: Sequence[int] = (10, 11, 12),
    geometry: G.FrustumGeometry | None = None,
    grid_dims: Sequence[int] | None = None,
    voxel_size: float | None = None,
    depth_min: float | None = None,
    depth_max: float | None = None,
    before_bins: int = 3,
    after_bins: int = 5,
    shell: int = 5,
    sampling: str = "center",
    room_mask: Tensor | None = None,
) -> SparseVoxels:
    """BUOL occupancy-aware lifting.

    Depth bins: ``n = occupancy_logits.shape[1]`` (100) bins over [0, depth_max]; bin(d) = floor(d * n /
    depth_max) (depth clipped to depth_max first). Every frustum voxel that projects into the image
    (:meth:`frustum3d.geometry.FrustumGeometry.kept_mask`; pixel = nearest, ``floor(u)`` with toolkit
    sampling) with voxel bin ``j`` is kept when
    ``bin(pred_depth) - before_bins < j < bin(stuff_limit) + after_bins`` (``stuff_limit`` from
    :func:`stuff_depth_limit`) and, if given, ``room_mask[b, v, u]``. Its features are
    ``[semantic probs (K), sigmoid(occupancy_logits[b, j, v, u]), sign(d), |d|]`` with
    ``d = (j - bin(pred_depth)) * depth_max / n`` (metres). A zero-feature shell is added: frustum voxels within
    the ``shell^3`` (5^3) dilation of the kept set that are not kept themselves. A batch item with no voxels
    gets one zero voxel at the grid centre so every item stays present.

    Deliberate differences from the toolkit (documented, not reproduced): voxels are sampled at their centre
    (``sampling="center"``, consistent with :func:`lift_depth`; pass ``"toolkit"`` for its mapping), and the
    toolkit's extra ``-1`` shift of all coordinates and its snapping of shell voxels to even coordinates are
    not applied; one bin-count constant is used (the toolkit mixes depth_max and a literal 6).

    Args:
        semantic: [B, K, H, W] per-pixel class probabilities on the lifting plane.
        occupancy_logits: [B, n_bins, H, W] multi-plane occupancy logits.
        depth: [B, H, W] predicted depth (metres).
        intrinsic: intrinsic of the plane, [4,4] or [B,4,4]; None = the one stored in ``geometry``.
        frustum: bool [X, Y, Z] or [B, X, Y, Z] frustum mask (camera convention), None = analytic.
        geometry: the grid (or the older keywords grid_dims, voxel_size, depth_min, depth_max), as in
            :func:`lift_depth`.
    """
    bsz, n_cls, h, w = semantic.shape
    if occupancy_logits.dim() != 4 or occupancy_logits.shape[0] != bsz or occupancy_logits.shape[-2:] != (h, w):
        raise ValueError(f"occupancy_logits must be [B={bsz}, n_bins, {h}, {w}], got "
                         f"{tuple(occupancy_logits.shape)}")
    if depth.shape != (bsz, h, w):
        raise ValueError(f"depth must be [B={bsz}, {h}, {w}], got {tuple(depth.shape)}")
    dev = semantic.device
    geo = _lifting_geometry(geometry, (w, h), grid_dims, voxel_size, depth_min, depth_max)
    gd = geo.grid_dims
    depth_max = geo.depth_max
    n_bins = occupancy_logits.shape[1]
    k = _batched_intrinsic(intrinsic, bsz, geometry)
    if frustum is not None:
        frustum = frustum.to(device=dev, dtype=torch.bool)  # stays on the device: no round trip of the grid
        if frustum.dim() == 3:
            frustum = frustum.expand(bsz, *frustum.shape)

    d = depth.detach().clamp(max=depth_max)
    pred_bin = torch.floor(d * n_bins / depth_max).long()  # [B,H,W]
    labels = semantic.detach().argmax(1)
    limit_bin = torch.floor(stuff_depth_limit(d, labels, stuff_classes) * n_bins / depth_max).long()

    all_coords, all_feats = [], []
    for b in range(bsz):
        fm = None if frustum is None else frustum[b]
        if fm is None:
            fm = geo.frustum_mask(k[b].cpu(), sampling=sampling)
        if tuple(fm.shape) != gd:
            raise ValueError(f"frustum mask shape {tuple(fm.shape)} != grid_dims {gd}")
        # kept voxels (geometry.kept_mask semantics) without materialising the dense mapping volume; the rule is
        # evaluated on every frustum voxel (clamped pixels where it sees none) and selected once: one host sync
        # for the selection instead of one per boolean-indexed tensor
        idx = fm.to(dev).nonzero()
        u, v, z = geo.project_voxels(idx, k[b], sampling)
        sees = geo.inside_image(u, v, z, sampling)
        kept_all = torch.zeros(gd, dtype=torch.bool, device=dev)
        kept_all[idx[:, 0], idx[:, 1], idx[:, 2]] = sees  # frustum voxels are unique: the rest stays False
        # toolkit: truncate u, v (its test is 0 <= u < W); other samplings: nearest pixel (-0.5 <= u < W-0.5)
        shift = 0.0 if sampling == "toolkit" else 0.5
        uu = (u + shift).floor().long().clamp(0, w - 1)
        vv = (v + shift).floor().long().clamp(0, h - 1)
        jb = torch.floor(z * n_bins / depth_max).long().clamp(0, n_bins - 1)
        pb = pred_bin[b, vv, uu]
        keep = sees & (jb > pb - before_bins) & (jb < limit_bin[b, vv, uu] + after_bins)
        if room_mask is not None:
            keep &= room_mask[b, vv, uu].bool()
        rows = keep.nonzero()[:, 0]
        sel, uu, vv, jb, pb = idx[rows], uu[rows], vv[rows], jb[rows], pb[rows]
        dist = ((jb - pb).to(semantic.dtype) * (depth_max / n_bins))[:, None]
        feats = torch.cat([
            semantic[b][:, vv, uu].T,
            torch.sigmoid(occupancy_logits[b, jb, vv, uu])[:, None].to(semantic.dtype),
            torch.sign(dist), dist.abs(),
        ], 1)
        # zero-feature shell: dilation of the kept set, restricted to projecting frustum voxels
        kept_set = torch.zeros(gd, dtype=torch.bool, device=dev)
        kept_set[sel[:, 0], sel[:, 1], sel[:, 2]] = True
        if shell > 1:
            dil = _dilate(kept_set, shell)
            ring = dil & kept_all & ~kept_set
        else:
            ring = torch.zeros_like(kept_set)
        ring_idx = ring.nonzero()
        if sel.shape[0] + ring_idx.shape[0] == 0:
            ring_idx = host_to_device([[g // 2 for g in gd]], dev)
        coords = torch.cat([sel, ring_idx], 0)
        feats = torch.cat([feats, feats.new_zeros(ring_idx.shape[0], feats.shape[1])], 0)
        all_coords.append(torch.cat([torch.full_like(coords[:, :1], b), coords], 1))
        all_feats.append(feats)
    return SparseVoxels(torch.cat(all_coords), torch.cat(all_feats), stride=1, spatial_shape=gd,
                        batch_size=bsz)


def fuse_lifted(projective: SparseVoxels, occupancy: SparseVoxels) -> SparseVoxels:
    """Coordinate union of two lifted sets; features ``[projective or 0, occupancy or 0]``."""
    return sparse_union(projective, occupancy, mode="cat")


def occupancy_pyramid(occupancy: SparseVoxels, levels: int = 3) -> list[SparseVoxels]:
    """Repeated sparse max-pooling (kernel 3, stride 2) of the BUOL voxels: strides 2, 4, ... (``levels``)."""
    out, x = [], occupancy
    for _ in range(levels):
        x = sparse_max_pool3d(x, 3, 2)
        out.append(x)
    return out


def fuse_multiscale(projective: Sequence[SparseVoxels], pyramid: Sequence[SparseVoxels]) -> list[SparseVoxels]:
    """Per level, coordinate union with zero-padded ``[projective, pooled occupancy]`` features."""
    if len(projective) != len(pyramid):
        raise ValueError(f"need as many pyramid levels ({len(pyramid)}) as projective levels ({len(projective)})")
    return [sparse_union(a, b, mode="cat") for a, b in zip(projective, pyramid, strict=True)]
