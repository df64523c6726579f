"""2D mask prior of the 3D instance masks (``model.frustum3d.mask_prior_2d``; not in the toolkit).

The completion decoder predicts each query's 3D mask logits from scratch: a dot product of the query embedding
with voxel features. Early in training (and with little data) no thing query wins a voxel, so 3D things are
missing even where the 2D stage segments them well. With the prior, every voxel of every level gets, added to
its decoder logit, the frozen 2D network's mask logit of the same query at the plane pixel the voxel projects
to (nearest pixel; 0 outside the image). A visible surface then starts with the 2D segmentation, and the decoder
learns the residual: occluded voxels behind an object, and geometry the ray does not separate.

:func:`use_2d_labels` (``model.frustum3d.labels_2d_bands``) goes further at evaluation and inference time only: within
a band around each pixel's predicted depth the level-256 3D mask logits are *replaced* by the 2D ones, so the visible
surface carries the 2D segmentation and the 3D masks decide elsewhere.
"""

from __future__ import annotations

from typing import Any

import torch
from frustum3d.geometry import FrustumGeometry
from frustum3d.sparse import SparseVoxels

__all__ = ["add_mask_prior", "labels_2d_at", "mask_prior_at", "surface_depth_gap", "use_2d_labels", "voxel_pixels"]

#: 2D logits are clamped to this magnitude before they are added (a saturated 2D mask must not freeze a voxel)
PRIOR_CLAMP = 10.0


def voxel_pixels(centres: torch.Tensor, intrinsic: torch.Tensor, geometry: FrustumGeometry, plane_hw: tuple[int, int],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plane pixel every voxel (finest-grid centres ``[N, 3]``, one frame, its ``[4, 4]`` plane intrinsic) looks
    at: nearest column and row (clamped into the plane), the voxel's metric depth (float64) and whether it sees
    the image at all, each ``[N]`` on ``device``. "center" sampling inverts the lifting (voxel = floor(grid
    point), pixel centres at integer u, v)."""
    h, w = plane_hw
    u, v, z = geometry.project_voxels(centres.double(), intrinsic.detach().double().cpu(), sampling="center")
    inside = geometry.inside_image(u, v, z, sampling="center").to(device)
    ui = u.round().long().clamp(0, w - 1).to(device)
    vi = v.round().long().clamp(0, h - 1).to(device)
    return ui, vi, z.to(device), inside


#: largest splat half-width in pixels: a voxel nearer than that covers more pixels, which the z-buffer then misses
#: only where no farther voxel of the same surface fills them
MAX_SPLAT_RADIUS = 12


def surface_depth_gap(coords: torch.Tensor, occupied: torch.Tensor, intrinsic: torch.Tensor,
                      geometry: FrustumGeometry, plane_hw: tuple[int, int]) -> torch.Tensor:
    """How far behind the first surface of its pixel each voxel lies (metres, float64 ``[N]``; ``inf`` where it
    projects outside the image): the voxel's depth minus a z-buffer of the ``occupied`` voxels (bool ``[N]``).

    The z-buffer is the visible surface of the *predicted geometry*, not the 2D network's depth: every occupied
    voxel covers the plane pixels whose centres fall inside its projected cube (a square of half-width
    ``voxel_size / 2 * focal / (z - voxel_size / 2)``, its near face), so that a voxel behind a near object is
    hidden even where it projects between the object's voxel centres. An occupied voxel covers its own pixel, so
    its gap is >= 0 (0: it is the first surface there); free voxels in front of the surface get a gap < 0; the
    visible surface is where the gap is near 0. ``coords`` ``[N, 3]`` finest-grid indices of one frame with its
    ``[4, 4]`` plane ``intrinsic``; ``plane_hw`` the plane's (h, w)."""
    h, w = plane_hw
    device = coords.device
    k = intrinsic.detach().double().cpu()
    u, v, z = geometry.project_voxels(coords.detach().cpu().double(), k, sampling="center")
    inside = geometry.inside_image(u, v, z, sampling="center")
    ui = u.round().long().clamp(0, w - 1)
    vi = v.round().long().clamp(0, h - 1)
    zbuf = torch.full((h * w,), float("inf"), dtype=torch.float64)
    occ = occupied.detach().cpu().bool() & inside
    if bool(occ.any()):
        near = (z[occ] - 0.5 * geometry.voxel_size).clamp_min(1e-6)
        hx = 0.5 * geometry.voxel_size * float(k[0, 0]) / near
        hy = 0.5 * geometry.voxel_size * float(k[1, 1]) / near
        # nearest (widest) voxels first: an offset of m pixels only needs the voxels whose splat reaches m
        reach = torch.maximum(hx, hy).ceil().clamp(max=MAX_SPLAT_RADIUS)
        order = torch.argsort(reach, descending=True)
        reach, hx, hy = reach[order], hx[order], hy[order]
        uo, vo, zo, cu, cv = (t[occ][order] for t in (u, v, z, ui, vi))
        r = int(reach[0])
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                n = int((reach >= max(abs(dx), abs(dy))).sum())
                pu, pv = cu[:n] + dx, cv[:n] + dy
                # a pixel centre inside the projected near face; the voxel's own pixel always counts
                cover = (((pu - uo[:n]).abs() <= hx[:n]) | (dx == 0)) & (((pv - vo[:n]).abs() <= hy[:n]) | (dy == 0))
                cover &= (pu >= 0) & (pu < w) & (pv >= 0) & (pv < h)
                if bool(cover.any()):
                    zbuf.scatter_reduce_(0, (pv * w + pu)[cover], zo[:n][cover], "amin")
    gap = z - zbuf[vi * w + ui]
    return torch.where(inside, gap, torch.full_like(gap, float("inf"))).to(device)


def labels_2d_at(centres: torch.Tensor, batch: torch.Tensor, mask_logits: torch.Tensor, intrinsic: torch.Tensor,
                 geometry: FrustumGeometry, depth: torch.Tensor | None = None, bands: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-voxel 2D mask logits ``[N, Q]`` (clamped to ``PRIOR_CLAMP``) and which voxels see them (bool ``[N]``).

    ``centres`` ``[N, 3]`` finest-grid voxel indices (a coarse cell passes its centre ``x + (s - 1) / 2``) of batch
    items ``batch`` [N]; ``mask_logits`` ``[B, Q, h, w]`` on the lifting plane, ``intrinsic`` ``[B, 4, 4]`` of the
    plane. A voxel sees its pixel (nearest) when it projects inside the image and the depth range and, with
    ``depth`` ``[B, h, w]`` (the predicted depth on the plane), lies within ``bands`` truncation bands
    (``bands * truncation * voxel_size``) of that pixel's depth: the free space in front of a surface and what lies
    far behind it are not the object's. Voxels that do not see a pixel get logits 0."""
    n = centres.shape[0]
    bsz, q, h, w = mask_logits.shape
    out = mask_logits.new_zeros((n, q))
    seen = torch.zeros(n, dtype=torch.bool, device=mask_logits.device)
    k = intrinsic if intrinsic.dim() == 3 else intrinsic[None].expand(bsz, *intrinsic.shape)
    for b in range(bsz):
        rows = (batch == b).nonzero().flatten()
        if rows.numel() == 0:
            continue
        ui, vi, z, keep = voxel_pixels(centres[rows], k[b], geometry, (h, w), mask_logits.device)
        logits = mask_logits[b][:, vi, ui].T.clamp(-PRIOR_CLAMP, PRIOR_CLAMP)  # [N_b, Q]
        if depth is not None:
            band = bands * geometry.truncation * geometry.voxel_size
            keep = keep & ((z - depth[b][vi, ui].double()).abs() <= band)
        out[rows] = torch.where(keep[:, None], logits, torch.zeros_like(logits))
        seen[rows] = keep
    return out, seen


def mask_prior_at(centres: torch.Tensor, batch: torch.Tensor, mask_logits: torch.Tensor, intrinsic: torch.Tensor,
                  geometry: FrustumGeometry, depth: torch.Tensor | None = None) -> torch.Tensor:
    """The prior: :func:`labels_2d_at`'s logits within one truncation band (``depth`` given) or wherever a voxel
    projects into the image (``depth`` None); 0 elsewhere."""
    return labels_2d_at(centres, batch, mask_logits, intrinsic, geometry, depth)[0]


def _sparse_with_prior(x: SparseVoxels, mask_logits: torch.Tensor, intrinsic: torch.Tensor,
                       geometry: FrustumGeometry, depth: torch.Tensor | None) -> SparseVoxels:
    s = int(x.stride)
    centres = x.coords[:, 1:].to(torch.float64) + (s - 1) / 2.0
    prior = mask_prior_at(centres, x.coords[:, 0], mask_logits, intrinsic, geometry, depth)
    return x.replace_feats(x.feats + prior.to(x.feats.dtype))


def _dense_with_prior(logits: torch.Tensor, mask_logits: torch.Tensor, intrinsic: torch.Tensor,
                      geometry: FrustumGeometry, depth: torch.Tensor | None) -> torch.Tensor:
    bsz, q, *dims = logits.shape
    s = geometry.grid_dims[0] // dims[0]
    grid = torch.stack(torch.meshgrid(*[torch.arange(d, device=logits.device) for d in dims], indexing="ij"), -1)
    centres = (grid.reshape(-1, 3).to(torch.float64) * s + (s - 1) / 2.0).repeat(bsz, 1)
    batch = torch.arange(bsz, device=logits.device).repeat_interleave(grid.numel() // 3)
    prior = mask_prior_at(centres, batch, mask_logits, intrinsic, geometry, depth)  # [B*V, Q]
    prior = prior.reshape(bsz, -1, q).permute(0, 2, 1).reshape(bsz, q, *dims)
    return logits + prior.to(logits.dtype)


def add_mask_prior(out: dict[str, Any], mask_logits: torch.Tensor, intrinsic: torch.Tensor,
                   geometry: FrustumGeometry, depth: torch.Tensor | None = None) -> dict[str, Any]:
    """Add the 2D mask prior (module docstring) to ``panoptic_{64,128,256}`` of a decoder output dict; with
    ``depth`` only within the truncation band around each pixel's depth (:func:`mask_prior_at`)."""
    mask_logits = mask_logits.detach().float()
    depth = None if depth is None else depth.detach()
    for key in ("panoptic_64", "panoptic_128", "panoptic_256"):
        x = out.get(key)
        if isinstance(x, SparseVoxels):
            out[key] = _sparse_with_prior(x, mask_logits, intrinsic, geometry, depth)
        elif isinstance(x, torch.Tensor):
            out[key] = _dense_with_prior(x, mask_logits, intrinsic, geometry, depth)
    return out


def use_2d_labels(out: dict[str, Any], mask_logits: torch.Tensor, intrinsic: torch.Tensor, geometry: FrustumGeometry,
                  depth: torch.Tensor, bands: float) -> dict[str, Any]:
    """Replace the level-256 3D mask logits by the 2D mask logits at the voxels within ``bands`` truncation bands of
    their pixel's predicted depth (``model.frustum3d.labels_2d_bands``, evaluation and inference only).

    The visible surface is then labelled by the 2D segmentation, which generalises to unseen scenes better than the
    3D masks that the completion U-Net learns in a few hundred steps (tools/diagnose_3d.py's fusion sweep); the 3D
    masks still decide behind and in front of that band (hidden faces, completed geometry)."""
    x = out.get("panoptic_256")
    if not isinstance(x, SparseVoxels) or x.num_voxels == 0 or bands <= 0:
        return out
    logits, seen = labels_2d_at(x.coords[:, 1:].to(torch.float64), x.coords[:, 0], mask_logits.detach().float(),
                                intrinsic, geometry, depth.detach(), bands)
    out["panoptic_256"] = x.replace_feats(torch.where(seen[:, None], logits.to(x.feats.dtype), x.feats))
    return out
