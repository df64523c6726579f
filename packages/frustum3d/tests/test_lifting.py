"""Lifting against scalar brute-force loops on tiny grids (20x15 images, 24^3 grids)."""

from __future__ import annotations

import functools
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from frustum3d import geometry as G
from frustum3d.lifting import (
    fuse_lifted,
    lift_depth,
    lift_depth_multiscale,
    occupancy_aware_lift,
    occupancy_channels,
    projective_channels,
    stuff_depth_limit,
)
from scipy import ndimage

W, H = 20, 15
GRID = (24, 24, 24)
VS, DMIN, DMAX = 0.25, 0.5, 4.0
K = G.intrinsic_matrix(18.0, 17.0, 9.5, 7.0)
GEO = dict(grid_dims=GRID, voxel_size=VS, depth_min=DMIN, depth_max=DMAX)
GEOMETRY = G.FrustumGeometry(plane_size=(W, H), **GEO)


def _bilinear(img: np.ndarray, u: int, v: int, out_w: int, out_h: int) -> np.ndarray:
    """align_corners=False bilinear sample of img[C,h,w] at output pixel (u, v) of an (out_h, out_w) grid."""
    c, h, w = img.shape
    sx = max((u + 0.5) * w / out_w - 0.5, 0.0)
    sy = max((v + 0.5) * h / out_h - 0.5, 0.0)
    x0, y0 = min(int(math.floor(sx)), w - 1), min(int(math.floor(sy)), h - 1)
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    ax, ay = sx - x0, sy - y0
    return ((1 - ay) * ((1 - ax) * img[:, y0, x0] + ax * img[:, y0, x1])
            + ay * ((1 - ax) * img[:, y1, x0] + ax * img[:, y1, x1]))


@functools.lru_cache(maxsize=1)
def _c2g():
    return GEOMETRY.camera_to_grid(K).numpy()


def _grid_point(u, v, z):
    c2g = _c2g()
    fx, fy, cx, cy = 18.0, 17.0, 9.5, 7.0
    p = np.array([(u - cx) * z / fx, (v - cy) * z / fy, z, 1.0])
    return (c2g @ p)[:3]


def _brute_lift(depth, feats, sem, stride, copies, include_distance=True):
    acc = defaultdict(list)
    b_n = depth.shape[0]
    for b in range(b_n):
        for v in range(H):
            for u in range(W):
                z = float(depth[b, v, u])
                if not z > 0:
                    continue
                g = _grid_point(u, v, z) / stride
                base = [math.floor(x) for x in g]
                pix = []
                for f in feats:
                    pix.extend(_bilinear(f[b], u, v, W, H).tolist())
                if sem is not None:
                    pix.extend(sem[b, :, v, u].tolist())
                for o in range(-(copies // 2), copies // 2 + 1):
                    c = (base[0] * stride, base[1] * stride, (base[2] + o) * stride)
                    if not all(0 <= c[i] < GRID[i] for i in range(3)):
                        continue
                    df = (g[2] - base[2]) + o
                    row = ([float(np.sign(df)), abs(df)] if include_distance else []) + pix
                    acc[(b, *c)].append(row)
    return {k: np.mean(np.array(r), 0) for k, r in acc.items()}


def _as_dict(sv):
    return {tuple(c): f for c, f in zip(sv.coords.tolist(), sv.feats.double().numpy(), strict=True)}


def _assert_same(got, ref, atol=1e-9):
    assert set(got) == set(ref)
    for key, f in ref.items():
        np.testing.assert_allclose(got[key], f, atol=atol, rtol=1e-6, err_msg=str(key))


def _inputs(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    depth = 0.6 + 3.2 * torch.rand(b, H, W, generator=g, dtype=torch.float64)
    depth[0, 0, :5] = 0.0  # invalid pixels
    depth[-1, 3, 3] = float("nan")
    f1 = torch.randn(b, 4, 8, 10, generator=g, dtype=torch.float64)
    f2 = torch.randn(b, 3, H, W, generator=g, dtype=torch.float64)
    sem = torch.softmax(torch.randn(b, 5, H, W, generator=g, dtype=torch.float64), 1)
    return depth, f1, f2, sem


def test_channel_helpers():
    assert projective_channels(512, 13) == 527
    assert occupancy_channels(13) == 16
    assert occupancy_channels(20) == 23


def test_lift_depth_matches_brute_force():
    depth, f1, f2, sem = _inputs()
    sv = lift_depth(depth, K, [f1, f2], sem, truncation=3, **GEO)
    assert sv.stride == 1 and sv.spatial_shape == GRID and sv.batch_size == 2
    assert sv.num_channels == projective_channels(7, 5)
    assert sv.coords.dtype == torch.int64
    ref = _brute_lift(depth.numpy(), [f1.numpy(), f2.numpy()], sem.numpy(), 1, 7)
    _assert_same(_as_dict(sv), ref)
    # a per-sample [B,4,4] intrinsic gives the same result
    sv_b = lift_depth(depth, torch.stack([K, K]), [f1, f2], sem, truncation=3, **GEO)
    assert torch.equal(sv_b.coords, sv.coords) and torch.allclose(sv_b.feats, sv.feats)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the intrinsic on the device)")
def test_lift_depth_intrinsic_on_the_device():
    # training passes the batch's intrinsic on the GPU, the Predictor on the host: both must lift the same
    # (stop 47's host-side camera-to-grid map mixed devices for a device intrinsic)
    depth, f1, f2, sem = _inputs()
    dev = torch.device("cuda")
    host = lift_depth(depth, K, [f1, f2], sem, truncation=3, **GEO)
    for k in (K.to(dev), torch.stack([K, K]).to(dev), K):
        sv = lift_depth(depth.to(dev), k, [f1.to(dev), f2.to(dev)], sem.to(dev), truncation=3, **GEO)
        assert torch.equal(sv.coords.cpu(), host.coords) and torch.allclose(sv.feats.cpu(), host.feats)


def test_lift_depth_duplicates_are_averaged_deterministically():
    # a constant depth plane makes neighbouring pixels fall into the same voxels
    depth = torch.full((1, H, W), 2.0, dtype=torch.float64)
    sem = torch.softmax(torch.randn(1, 3, H, W, dtype=torch.float64), 1)
    a = lift_depth(depth, K, None, sem, **GEO)
    b = lift_depth(depth, K, None, sem, **GEO)
    assert torch.equal(a.coords, b.coords) and torch.equal(a.feats, b.feats)
    ref = _brute_lift(depth.numpy(), [], sem.numpy(), 1, 7)
    n_contrib = 7 * H * W
    assert len(ref) < n_contrib  # duplicates really happen
    _assert_same(_as_dict(a), ref)


def test_lift_depth_gradient_reaches_features():
    depth, f1, _, sem = _inputs(1, b=1)
    f1 = f1.clone().requires_grad_(True)
    sv = lift_depth(depth, K, f1, sem, **GEO)
    sv.feats[:, 2:6].sum().backward()
    assert f1.grad is not None and f1.grad.abs().sum() > 0


def test_multiscale_matches_brute_force():
    depth, f1, f2, sem = _inputs(2)
    f3 = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    levels = lift_depth_multiscale(depth, K, [f1, f2, f3], strides=(2, 4, 8), copies=(5, 3, 1), **GEO)
    for sv, f, s, c in zip(levels, [f1, f2, f3], (2, 4, 8), (5, 3, 1), strict=True):
        assert sv.stride == s
        assert bool((sv.coords[:, 1:] % s == 0).all())
        _assert_same(_as_dict(sv), _brute_lift(depth.numpy(), [f.numpy()], None, s, c, include_distance=False))


def test_lift_depth_input_errors():
    with pytest.raises(ValueError, match="depth"):
        lift_depth(torch.ones(H, W), K, **GEO)
    with pytest.raises(ValueError, match="features"):
        lift_depth(torch.ones(2, H, W), K, torch.ones(3, 2, H, W), **GEO)
    with pytest.raises(ValueError, match="copies"):
        lift_depth(torch.ones(1, H, W), K, copies=4, **GEO)


# ----------------------------------------------------------------------------------------- occupancy-aware
def _brute_fill(a):
    a = list(a)
    for i in range(len(a)):
        if a[i] == 0:
            left = [x for x in a[:i] if x != 0]
            right = [x for x in a[i + 1:] if x != 0]
            a[i] = max(min(left) if left else 0.0, min(right) if right else 0.0)
    return np.array(a)


def test_fill_gaps_matches_the_in_place_scan():
    """Rows with leading, inner and trailing gaps, no gap, one value and no value against the scalar scan."""
    from frustum3d.lifting import _fill_gaps

    g = torch.Generator().manual_seed(11)
    rows = [[0, 0, 3, 0, 1, 0, 2, 0, 0], [5, 0, 0, 4, 0, 6, 0], [0, 0, 0, 0], [2, 1, 3], [0, 0, 7, 0],
            [4, 0, 0, 0], [1, 0, 1, 0, 0.5, 0]]
    for n in (1, 2, 9, 40):
        for _ in range(25):
            a = torch.rand(n, generator=g, dtype=torch.float64) * 4
            a[torch.rand(n, generator=g) < 0.5] = 0
            rows.append(a.tolist())
    for r in rows:
        got = _fill_gaps(torch.tensor([r, r[::-1]], dtype=torch.float64))  # batched rows, each its own scan
        np.testing.assert_array_equal(got[0].numpy(), _brute_fill(r), err_msg=str(r))
        np.testing.assert_array_equal(got[1].numpy(), _brute_fill(r[::-1]), err_msg=str(r[::-1]))


def _brute_limit(depth, labels, stuff):
    b_n = depth.shape[0]
    out = np.zeros_like(depth)
    for b in range(b_n):
        s = np.isin(labels[b], stuff)
        er = np.zeros_like(s)
        for v in range(H):
            for u in range(W):
                win = [s[vv, uu] for vv in range(v - 2, v + 3) for uu in range(u - 2, u + 3)
                       if 0 <= vv < H and 0 <= uu < W]
                er[v, u] = all(win)
        sd = depth[b] * er
        col = _brute_fill(sd.max(0))
        row = _brute_fill(sd.max(1))
        for v in range(H):
            for u in range(W):
                out[b, v, u] = min(col[u], row[v])
    return out


def test_stuff_depth_limit_brute_force():
    g = torch.Generator().manual_seed(3)
    depth = 0.5 + 3 * torch.rand(2, H, W, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, H, W), generator=g)
    labels[:, 2:12, 3:15] = 3  # a large stuff blob survives the 5x5 erosion
    labels[1, :, 10:] = 1  # leaves zero columns to gap-fill
    got = stuff_depth_limit(depth, labels, (3,))
    ref = _brute_limit(depth.numpy(), labels.numpy(), [3])
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-12)
    assert (ref > 0).any() and (ref[1] == 0).sum() < ref[1].size


def _brute_buol(sem, occ, depth, stuff, nb):
    """Scalar loops: frustum voxels sampled at their centre, nearest pixel, BUOL keep rule + features."""
    c2g = GEOMETRY.camera_to_grid(K).numpy()
    g2c = np.linalg.inv(c2g)
    labels = sem.argmax(1)
    limit = _brute_limit(np.minimum(depth, DMAX), labels, stuff)
    res = {}
    bn = sem.shape[0]
    fm = np.zeros((bn, *GRID), bool)
    kept_vox = np.zeros((bn, *GRID), bool)
    for b in range(bn):
        for i in range(GRID[0]):
            for j in range(GRID[1]):
                for m in range(GRID[2]):
                    x, y, z, _ = g2c @ np.array([i + 0.5, j + 0.5, m + 0.5, 1.0])
                    if z <= 0:
                        continue
                    u, v = x / z * 18.0 + 9.5, y / z * 17.0 + 7.0
                    if not (-0.5 <= u < W - 0.5 and -0.5 <= v < H - 0.5 and DMIN <= z <= DMAX):
                        continue
                    fm[b, i, j, m] = True
                    pu, pv = int(math.floor(u + 0.5)), int(math.floor(v + 0.5))
                    jb = min(int(math.floor(z * nb / DMAX)), nb - 1)
                    pb = int(math.floor(min(depth[b, pv, pu], DMAX) * nb / DMAX))
                    lb = int(math.floor(limit[b, pv, pu] * nb / DMAX))
                    if not (pb - 3 < jb < lb + 5):
                        continue
                    kept_vox[b, i, j, m] = True
                    d = (jb - pb) * DMAX / nb
                    res[(b, i, j, m)] = np.array(
                        sem[b, :, pv, pu].tolist() + [1 / (1 + math.exp(-occ[b, jb, pv, pu])), np.sign(d), abs(d)])
        ring = ndimage.binary_dilation(kept_vox[b], np.ones((5, 5, 5), bool)) & fm[b] & ~kept_vox[b]
        for c in np.argwhere(ring):
            res[(b, *c.tolist())] = np.zeros(sem.shape[1] + 3)
    return res


def test_occupancy_aware_lift_matches_brute_force():
    g = torch.Generator().manual_seed(4)
    nb = 16
    sem_logits = torch.randn(2, 4, H, W, generator=g, dtype=torch.float64)
    sem_logits[:, 3, :, :8] += 5  # stuff (class 3) on the left part of the image
    sem = torch.softmax(sem_logits, 1)
    occ = torch.randn(2, nb, H, W, generator=g, dtype=torch.float64)
    depth = 0.8 + 2.5 * torch.rand(2, H, W, generator=g, dtype=torch.float64)
    sv = occupancy_aware_lift(sem, occ, depth, K, stuff_classes=(3,), **GEO)
    assert sv.num_channels == occupancy_channels(4)
    ref = _brute_buol(sem.numpy(), occ.numpy(), depth.numpy(), [3], nb)
    got = _as_dict(sv)
    nonzero = sum(1 for f in ref.values() if f.any())
    assert nonzero > 50 and len(ref) > nonzero  # both kept voxels and a shell exist
    _assert_same(got, ref)


def test_fuse_lifted_zero_pads():
    depth, f1, _, sem = _inputs(5, b=1)
    a = lift_depth(depth, K, f1, sem, **GEO)
    occ = torch.randn(1, 16, H, W, dtype=torch.float64)
    b = occupancy_aware_lift(sem, occ, depth, K, stuff_classes=(4,), **GEO)
    u = fuse_lifted(a, b)
    assert u.num_channels == a.num_channels + b.num_channels
    da, db, du = _as_dict(a), _as_dict(b), _as_dict(u)
    assert set(du) == set(da) | set(db)
    for key, f in du.items():
        np.testing.assert_allclose(f[: a.num_channels], da.get(key, np.zeros(a.num_channels)))
        np.testing.assert_allclose(f[a.num_channels:], db.get(key, np.zeros(b.num_channels)))


# ----------------------------------------------------------------------------------------- real front3d frame
def _frame_dir():
    from pathlib import Path

    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "packages").is_dir() and (parent / "pyproject.toml").is_file():
            d = parent.parent / "shared" / "fixtures" / "front3d-real" / "data" / "30054695-4a17-4698-a482-06047262a526"
            return d if d.is_dir() else None
    return None


FRAME = _frame_dir()


@pytest.mark.skipif(FRAME is None, reason="shared fixture front3d-real frame not present")
def test_real_depth_lifts_onto_flipped_gt_surface():
    """Conventions end to end: unflipped real depth, nearest-resized to 160x120 and lifted with the default
    front3d geometry, lands on the GT surface of the (0,1)-flipped geometry; the unflipped geometry is empty
    there (the fixture README measures a median of 1.36 voxels per pixel for this check)."""
    openexr = pytest.importorskip("OpenEXR")
    z = openexr.File(str(FRAME / "depth_0007.exr")).parts[0].channels["Z"].pixels
    depth = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(z))[None, None].float(),
                                            size=(120, 160), mode="nearest")[:, 0]
    sv = lift_depth(depth, G.front3d_intrinsic(), copies=1)
    c = sv.coords[:, 1:].numpy()
    stored = np.load(FRAME / "geometry_0007.npz")["data"]
    on_flipped = stored[::-1, ::-1][c[:, 0], c[:, 1], c[:, 2]]
    assert np.median(on_flipped) < 1.5
    assert (on_flipped <= 2.0).mean() > 0.85
    assert np.median(stored[c[:, 0], c[:, 1], c[:, 2]]) == 12.0


def test_occupancy_pyramid_and_multiscale_fusion_brute_force():
    from frustum3d.lifting import fuse_multiscale, occupancy_pyramid

    g = torch.Generator().manual_seed(7)
    sem = torch.softmax(torch.randn(1, 3, H, W, generator=g, dtype=torch.float64), 1)
    occ = torch.randn(1, 12, H, W, generator=g, dtype=torch.float64)
    depth = 0.8 + 2.5 * torch.rand(1, H, W, generator=g, dtype=torch.float64)
    buol = occupancy_aware_lift(sem, occ, depth, K, stuff_classes=(2,), **GEO)
    pyr = occupancy_pyramid(buol, 3)
    prev = _as_dict(buol)
    for lvl, sv in enumerate(pyr):
        s_in, s_out = 2**lvl, 2 ** (lvl + 1)
        assert sv.stride == s_out
        # MinkowskiEngine: outputs = inputs floored to multiples of s_out; window o + {-1,0,1} * s_in
        ref = {}
        for (b, x, y, z) in prev:
            o = (b, x // s_out * s_out, y // s_out * s_out, z // s_out * s_out)
            ref.setdefault(o, None)
        for o in ref:
            vals = [prev[(o[0], o[1] + dx * s_in, o[2] + dy * s_in, o[3] + dz * s_in)]
                    for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1)
                    if (o[0], o[1] + dx * s_in, o[2] + dy * s_in, o[3] + dz * s_in) in prev]
            ref[o] = np.max(np.stack(vals), 0)
        _assert_same(_as_dict(sv), ref)
        prev = ref
    f = torch.randn(1, 4, H, W, dtype=torch.float64)
    proj = lift_depth_multiscale(depth, K, [f, f, f], **GEO)
    fused = fuse_multiscale(proj, pyr)
    for a, b, u in zip(proj, pyr, fused, strict=True):
        assert u.num_channels == 4 + occupancy_channels(3)
        assert set(_as_dict(u)) == set(_as_dict(a)) | set(_as_dict(b))


def test_dilate_equals_box_max_pool():
    """The separable dilation of the BUOL shell equals one box max-pool (odd sizes, masks touching the border)."""
    from frustum3d.lifting import _dilate

    g = torch.Generator().manual_seed(5)
    for size in (1, 3, 5):
        m = torch.rand(9, 13, 7, generator=g) < 0.05
        m[0, 0, 0] = m[-1, -1, -1] = True
        ref = F.max_pool3d(m[None, None].float(), size, 1, size // 2)[0, 0].bool()
        assert torch.equal(_dilate(m, size), ref)
