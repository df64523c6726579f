"""FrustumGeometry: stored vs per-call intrinsics, hand-written rules, round trips, GridGeometry's API, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from frustum3d import geometry as G
from frustum3d.geometry import FrustumGeometry
from frustum3d.lifting import lift_depth, lift_depth_multiscale, occupancy_aware_lift

SAMPLINGS = ("center", "reference", "toolkit")

# small grids so full masks stay cheap: one with a stored off-centre intrinsic, one with the front3d default
SMALL_K = G.intrinsic_matrix(40.0, 41.0, 19.3, 14.7)
CASES = [
    FrustumGeometry(grid_dims=(64, 48, 96), voxel_size=0.1, depth_min=0.5, depth_max=5.0, plane_size=(40, 30),
                    intrinsic=SMALL_K),
    FrustumGeometry(grid_dims=(64, 64, 64), voxel_size=0.12, plane_size=(80, 60)),
]


def _same(a, b) -> None:
    """Bit-identical tensors (or tuples of tensors): same dtype, shape and values."""
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
        return
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_per_call_intrinsic_equals_stored_for_every_method(case: int) -> None:
    """Every method gives the same bits with the plane intrinsic stored or passed per call, and the image
    test / kept mask follow the written-out rules of the module doc."""
    geo = CASES[case]
    k = geo.plane_intrinsic()
    assert geo.intrinsic is not None or torch.equal(k, G.front3d_intrinsic(geo.plane_size))
    bare = dataclasses.replace(geo, intrinsic=None)  # the front3d default unless k is passed
    _same(bare.bounds(k), geo.bounds())
    _same(bare.camera_to_grid(k), geo.camera_to_grid())
    _same(bare.grid_to_camera(k), geo.grid_to_camera())
    coords = torch.randint(0, 48, (300, 3), generator=torch.Generator().manual_seed(case))
    w, h = geo.plane_size
    for s in SAMPLINGS:
        _same(bare.voxel_sample_offset(s, k), geo.voxel_sample_offset(s))
        fm = geo.frustum_mask(sampling=s)
        _same(bare.frustum_mask(k, sampling=s), fm)
        u, v, z = geo.project_voxels(coords, sampling=s)
        _same(bare.project_voxels(coords, k, sampling=s), (u, v, z))
        lo, hi = (0.0, (w, h)) if s == "toolkit" else (-0.5, (w - 0.5, h - 0.5))
        expected = ((u >= lo) & (u < hi[0]) & (v >= lo) & (v < hi[1])
                    & (z >= geo.depth_min) & (z <= geo.depth_max))
        assert 0 < int(expected.sum()) < len(coords)
        _same(geo.inside_image(u, v, z, s), expected)
        kept = geo.kept_mask(None, fm, sampling=s)
        _same(bare.kept_mask(None, fm, k, sampling=s), kept)
        # kept = inside the given frustum and seeing a pixel; mapping = (u, v, z_index, depth) there, -1 elsewhere
        idx = torch.nonzero(fm)
        ku, kv, kz = geo.project_voxels(idx, sampling=s)
        sees = geo.inside_image(ku, kv, kz, s)
        ref = torch.zeros(geo.grid_dims, dtype=torch.bool)
        ref[tuple(idx[sees].T)] = True
        _same(kept.kept, ref)
        _same(kept.mapping[tuple(idx[sees].T)],
              torch.stack([ku[sees], kv[sees], idx[sees, 2].double(), kz[sees]], -1))
        assert bool((kept.mapping[~kept.kept] == -1).all())
    _same(geo.frustum(), geo.frustum_mask(sampling="reference"))


def test_front3d_defaults_are_the_reference_grid() -> None:
    geo = FrustumGeometry.front3d()
    assert geo == FrustumGeometry()
    assert geo.grid_dims == G.FRONT3D_GRID and geo.plane_size == G.FRONT3D_REDUCED_SIZE
    assert geo.depth_range == G.FRONT3D_DEPTH_RANGE and geo.truncation == G.FRONT3D_TRUNCATION
    k = G.front3d_intrinsic(G.FRONT3D_REDUCED_SIZE)
    _same(geo.camera_to_grid(), geo.camera_to_grid(k))
    b = geo.bounds()
    _same(b, geo.bounds(k))
    assert b.dims.tolist() == [231, 174, 187] and b.padding.tolist() == [12, 41, 34]
    assert torch.allclose(b.min_corner, torch.tensor([-114.748, -85.881, 13.3333], dtype=torch.float64),
                          atol=1e-3)
    _same(geo.frustum_mask(), geo.frustum_mask(k))


def test_per_call_intrinsic_equals_stored_and_accepts_batches_and_3x3() -> None:
    geo = CASES[0]
    bare = dataclasses.replace(geo, intrinsic=None)
    _same(bare.camera_to_grid(SMALL_K), geo.camera_to_grid())
    _same(bare.frustum_mask(SMALL_K), geo.frustum_mask())
    # a 3x3 intrinsic (stored or per call) gives the same grid as its 4x4 form
    _same(bare.with_intrinsic(SMALL_K[:3, :3].numpy()).camera_to_grid(), geo.camera_to_grid())
    _same(bare.camera_to_grid(SMALL_K[:3, :3]), geo.camera_to_grid())
    # batched intrinsics: one transform per item, each equal to the single-intrinsic result
    k2 = SMALL_K.clone()
    k2[0, 0] = 44.0
    batch = torch.stack([SMALL_K, k2])
    c2g = geo.camera_to_grid(batch)
    assert c2g.shape == (2, 4, 4)
    _same(c2g[0], geo.camera_to_grid(SMALL_K))
    _same(c2g[1], geo.camera_to_grid(k2))
    _same(bare.camera_to_grid(batch), c2g)  # a per-call intrinsic overrides the stored one, batched too


def test_round_trips() -> None:
    geo = CASES[0]
    c2g, g2c = geo.camera_to_grid(), geo.grid_to_camera()
    assert torch.allclose(g2c @ c2g, torch.eye(4, dtype=torch.float64), atol=1e-12)
    # a voxel centre -> camera (grid_to_camera) -> pixel (pinhole with the plane intrinsic) equals the
    # centre-sampled projection of that voxel
    coords = torch.tensor([[10, 20, 30], [40, 5, 70], [0, 0, 95]], dtype=torch.float64)
    cam = (g2c @ torch.cat([coords + 0.5, torch.ones(3, 1, dtype=torch.float64)], 1).T).T
    k = geo.plane_intrinsic()
    u = cam[:, 0] * k[0, 0] / cam[:, 2] + k[0, 2]
    v = cam[:, 1] * k[1, 1] / cam[:, 2] + k[1, 2]
    pu, pv, pz = geo.project_voxels(coords, sampling="center")
    assert torch.allclose(pu, u, atol=1e-9) and torch.allclose(pv, v, atol=1e-9)
    assert torch.allclose(pz, cam[:, 2], atol=1e-12)
    # rescaling the plane there and back restores the intrinsic; the value object is hashable and comparable
    back = geo.rescaled((80, 60)).rescaled((40, 30))
    assert torch.allclose(back.plane_intrinsic(), geo.plane_intrinsic(), atol=1e-12)
    assert back.plane_size == geo.plane_size
    assert hash(geo) == hash(dataclasses.replace(geo)) and geo == dataclasses.replace(geo)
    assert geo != geo.rescaled((80, 60))


def test_rescale_convention_is_rescale_intrinsic() -> None:
    geo = FrustumGeometry.front3d()
    full = G.intrinsic_matrix(*G.FRONT3D_INTRINSIC)
    expected = G.rescale_intrinsic(full, G.FRONT3D_IMAGE_SIZE, G.FRONT3D_REDUCED_SIZE)
    _same(geo.plane_intrinsic(full), expected)  # from_size defaults to image_size (network input)
    _same(geo.plane_intrinsic(full, (320, 240)), expected)
    _same(geo.with_intrinsic(full, from_size=(320, 240)).plane_intrinsic(), expected)
    _same(geo.plane_intrinsic(), G.front3d_intrinsic(G.FRONT3D_REDUCED_SIZE))
    half = geo.rescaled((80, 60))
    _same(half.plane_intrinsic(), G.front3d_intrinsic((80, 60)))  # no stored intrinsic: front3d at the size
    stored = geo.with_intrinsic(expected).rescaled((80, 60))
    _same(stored.plane_intrinsic(), G.rescale_intrinsic(expected, (160, 120), (80, 60)))


def test_grid_geometry_api_of_nvp3d() -> None:
    """What nvp3d's GridGeometry offers: plane_intrinsic(K, from_size), frustum(K), grid_to_camera(K)."""
    geo = FrustumGeometry(grid_dims=(64, 64, 64), voxel_size=0.12, plane_size=(80, 60), image_size=(160, 120))
    k_img = G.front3d_intrinsic((160, 120))
    k_plane = geo.plane_intrinsic(k_img)
    _same(k_plane, G.rescale_intrinsic(k_img, (160, 120), (80, 60)))
    stored = geo.with_intrinsic(k_plane)
    _same(geo.frustum(k_plane), stored.frustum_mask(sampling="reference"))
    _same(geo.grid_to_camera(k_plane), stored.grid_to_camera())
    assert torch.allclose(geo.grid_to_camera(k_plane) @ stored.camera_to_grid(), torch.eye(4, dtype=torch.float64),
                          atol=1e-12)
    assert geo.grid_kwargs() == {"grid_dims": (64, 64, 64), "voxel_size": 0.12, "depth_min": 0.4,
                                 "depth_max": 6.0}


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(plane_size=(0, 120)), "plane_size must be 2 positive integers"),
    (dict(image_size=(320,)), "image_size must be 2 positive integers"),
    (dict(grid_dims=(256, 256)), "grid_dims must be 3 positive integers"),
    (dict(depth_min=6.0, depth_max=0.4), "depth_min < depth_max"),
    (dict(voxel_size=0.0), "voxel_size > 0"),
    (dict(truncation=-1.0), "truncation must be a positive"),
    (dict(intrinsic=torch.eye(2)), r"one \[3,3\] or \[4,4\] matrix"),
    (dict(intrinsic=torch.eye(4)[None].expand(2, 4, 4)), "pass batched intrinsics per call"),
    (dict(intrinsic=torch.zeros(4, 4)), "positive focal lengths"),
])
def test_bad_construction_is_one_clear_error(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        FrustumGeometry(**kwargs)


def test_bad_calls_are_clear_errors() -> None:
    geo = FrustumGeometry(grid_dims=(64, 64, 64), voxel_size=0.12, plane_size=(80, 60))
    with pytest.raises(ValueError, match="grid_dims .* is smaller than the frustum box"):
        FrustumGeometry(grid_dims=(64, 64, 64)).camera_to_grid()
    with pytest.raises(ValueError, match=r"depth_map has \(H,W\)=\(30, 40\) but the plane size"):
        geo.kept_mask(np.zeros((30, 40)))
    with pytest.raises(ValueError, match="single intrinsic"):
        geo.frustum_mask(torch.stack([geo.plane_intrinsic()] * 2))
    with pytest.raises(ValueError, match="sampling must be one of"):
        geo.voxel_sample_offset("nearest")
    with pytest.raises(ValueError, match="intrinsic must have shape"):
        geo.camera_to_grid(torch.eye(2))
    with pytest.raises(ValueError, match="plane_size must be 2 positive integers"):
        geo.rescaled((80, -1))


def test_lifting_accepts_geometry_and_matches_keywords() -> None:
    w, h = 20, 15
    k = G.intrinsic_matrix(18.0, 17.0, 9.5, 7.0)
    kw = dict(grid_dims=(24, 24, 24), voxel_size=0.25, depth_min=0.5, depth_max=4.0)
    geo = FrustumGeometry(plane_size=(w, h), truncation=2.0, **kw).with_intrinsic(k)
    gen = torch.Generator().manual_seed(3)
    depth = torch.rand(2, h, w, generator=gen) * 3 + 0.6
    feats = torch.rand(2, 3, h, w, generator=gen)
    sem = torch.rand(2, 4, h, w, generator=gen)
    old = lift_depth(depth, k, feats, sem, truncation=2.0, **kw)
    new = lift_depth(depth, None, feats, sem, geometry=geo)  # intrinsic and truncation from the geometry
    assert torch.equal(old.coords, new.coords) and torch.equal(old.feats, new.feats)
    old_ms = lift_depth_multiscale(depth, k, [feats, feats], strides=(2, 4), copies=(3, 1), **kw)
    new_ms = lift_depth_multiscale(depth, k, [feats, feats], strides=(2, 4), copies=(3, 1), geometry=geo)
    for a, b in zip(old_ms, new_ms, strict=True):
        assert torch.equal(a.coords, b.coords) and torch.equal(a.feats, b.feats)
    occ = torch.randn(2, 10, h, w, generator=gen)
    old_b = occupancy_aware_lift(sem, occ, depth, k, stuff_classes=(3,), **kw)
    new_b = occupancy_aware_lift(sem, occ, depth, None, stuff_classes=(3,), geometry=geo)
    assert torch.equal(old_b.coords, new_b.coords) and torch.equal(old_b.feats, new_b.feats)
    with pytest.raises(ValueError, match="geometry= or as grid_dims, not both"):
        lift_depth(depth, k, geometry=geo, grid_dims=(24, 24, 24))
    with pytest.raises(ValueError, match=r"the depth plane is \(W,H\)=\(20, 15\) but geometry.plane_size"):
        lift_depth(depth, k, geometry=geo.rescaled((40, 30)))
    with pytest.raises(ValueError, match="intrinsic is required"):
        lift_depth(depth, None, **kw)
