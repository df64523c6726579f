"""The visible surface of a predicted geometry (:func:`nvp3d.model.mask_prior.surface_depth_gap`), against a
brute-force z-buffer that loops over every pixel and every occupied voxel."""

from __future__ import annotations

import math

import torch
from frustum3d.geometry import FrustumGeometry
from nvp3d.model.mask_prior import surface_depth_gap


def _brute_force_gap(coords: torch.Tensor, occupied: torch.Tensor, k: torch.Tensor, g: FrustumGeometry
                     ) -> list[float]:
    w, h = g.plane_size
    zbuf = [[math.inf] * w for _ in range(h)]
    projected = []
    for c in coords.tolist():
        u, v, z = g.project_voxels(torch.tensor([c], dtype=torch.float64), k, sampling="center")
        inside = bool(g.inside_image(u, v, z, sampling="center")[0])
        projected.append((float(u[0]), float(v[0]), float(z[0]), inside))
    for (u, v, z, inside), occ in zip(projected, occupied.tolist()):
        if not (occ and inside):
            continue
        near = max(z - g.voxel_size / 2, 1e-6)
        hx, hy = g.voxel_size / 2 * float(k[0, 0]) / near, g.voxel_size / 2 * float(k[1, 1]) / near
        cu, cv = min(max(round(u), 0), w - 1), min(max(round(v), 0), h - 1)
        for py in range(h):
            for px in range(w):  # a pixel centre inside the projected near face, or the voxel's own pixel
                if (abs(px - u) <= hx or px == cu) and (abs(py - v) <= hy or py == cv):
                    zbuf[py][px] = min(zbuf[py][px], z)
    out = []
    for u, v, z, inside in projected:
        cu, cv = min(max(round(u), 0), w - 1), min(max(round(v), 0), h - 1)
        out.append(z - zbuf[cv][cu] if inside else math.inf)
    return out


def test_surface_depth_gap_matches_a_brute_force_z_buffer() -> None:
    """Every voxel's depth minus the nearest occupied voxel covering its pixel equals a per-pixel loop; occupied
    voxels are never in front of the surface (gap >= 0), voxels outside the image get inf, and hidden voxels exist that
    project onto a pixel no occupied voxel's centre falls on (the splat over the voxel's footprint hides them)."""
    g = FrustumGeometry(grid_dims=(20, 20, 20), voxel_size=0.2, depth_max=3.2, plane_size=(40, 30))
    k = g.plane_intrinsic()
    gen = torch.Generator().manual_seed(0)
    coords = torch.stack(torch.meshgrid(*[torch.arange(20)] * 3, indexing="ij"), -1).reshape(-1, 3)
    coords = coords[torch.randperm(coords.shape[0], generator=gen)[:700]]
    occupied = torch.rand(coords.shape[0], generator=gen) < 0.4
    gap = surface_depth_gap(coords, occupied, k, g, (30, 40))
    want = torch.tensor(_brute_force_gap(coords, occupied, k, g), dtype=torch.float64)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(gap), finite) and 0 < int(finite.sum()) < coords.shape[0]
    assert torch.allclose(gap[finite], want[finite], atol=1e-9)
    # an occupied voxel covers its own pixel, so it is never in front of the surface; the nearest ones are on it
    assert bool((gap[occupied & finite] >= 0).all()) and int((gap[occupied & finite] == 0).sum()) > 0
    hidden = finite & (gap > 0)
    assert int(hidden.sum()) > 0
    u, v, _ = g.project_voxels(coords.double(), k, sampling="center")
    own = v.round() * 40 + u.round()
    centres = set(own[occupied & finite].long().tolist())
    assert any(int(p) not in centres for p in own[hidden].long().tolist())
