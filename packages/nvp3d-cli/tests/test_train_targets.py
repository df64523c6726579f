"""Multi-plane occupancy targets and criterion targets against brute-force references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nvp3d.data.targets import criterion_targets, dilate_3x3x3, mp_occ_planes, pad_to


def _brute_force(mp_occ, frustum, c2g, k, wh, hw, bins, dmin, dmax):
    h, w = hw
    sx, sy = w / wh[0], h / wh[1]
    fx, fy = float(k[0, 0]) * sx, float(k[1, 1]) * sy
    cx, cy = (float(k[0, 2]) + 0.5) * sx - 0.5, (float(k[1, 2]) + 0.5) * sy - 0.5
    out = torch.zeros(bins, h, w, dtype=torch.float64)
    s, t = float(c2g[0, 0]), c2g[:3, 3].double()
    for i, j, k3 in torch.nonzero(frustum).tolist():
        x, y, z = ((torch.tensor([i, j, k3], dtype=torch.float64) + 0.5 - t) / s).tolist()
        if not dmin <= z <= dmax:
            continue
        u, v, b = round(x * fx / z + cx), round(y * fy / z + cy), int(z * bins // dmax)
        if 0 <= u < w and 0 <= v < h and 0 <= b < bins:
            out[b, v, u] = max(out[b, v, u], float(mp_occ[i, j, k3]))
    # 3x3x3 max filter, written out
    dil = torch.zeros_like(out)
    for b in range(bins):
        for v in range(h):
            for u in range(w):
                dil[b, v, u] = out[max(0, b - 1): b + 2, max(0, v - 1): v + 2, max(0, u - 1): u + 2].max()
    return out, dil


def test_mp_occ_planes_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    grid = (12, 10, 14)
    mp_occ = (torch.rand(grid, generator=g) > 0.7).float()
    frustum = torch.rand(grid, generator=g) > 0.2
    c2g = torch.eye(4)
    c2g[:3, :3] *= 2.5  # 0.4 m voxels
    c2g[:3, 3] = torch.tensor([6.0, 5.0, -1.0])
    k = torch.tensor([[8.0, 0, 7.5, 0], [0, 8.0, 5.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    args = (mp_occ, frustum, c2g, k, (16, 12), (6, 8), 10, 0.4, 6.0)
    raw_ref, dil_ref = _brute_force(*args)
    raw = mp_occ_planes(*args, dilate=False)
    dil = mp_occ_planes(*args)
    assert raw.shape == (10, 6, 8) and raw.sum() > 5
    torch.testing.assert_close(raw.double(), raw_ref)
    torch.testing.assert_close(dil.double(), dil_ref)
    dil_bool = mp_occ_planes(mp_occ.bool(), *args[1:])  # the loader's dtype: boolean planes, same cells
    assert dil_bool.dtype == torch.bool and torch.equal(dil_bool.double(), dil_ref)


@pytest.mark.parametrize("shape", [(7, 5, 9), (1, 4, 3), (2, 1, 1), (16, 12, 16)])
def test_dilate_equals_max_pool3d(shape: tuple[int, int, int]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = F.max_pool3d(x[None, None], kernel_size=3, stride=1, padding=1)[0, 0]
    assert torch.equal(dilate_3x3x3(x), ref)


def test_criterion_targets_pad_to_network_frame() -> None:
    batch = {
        "image": torch.zeros(2, 3, 5, 6),
        "labels": [torch.tensor([1, 10]), torch.tensor([11])],
        "masks": [torch.ones(2, 5, 6, dtype=torch.bool), torch.zeros(1, 5, 6, dtype=torch.bool)],
        "depth": torch.full((2, 5, 6), 2.0),
        "depth_reduced": torch.ones(2, 3, 3),
        "occupancy_planes": torch.zeros(2, 4, 3, 3),
    }
    t = criterion_targets(batch, (8, 8), torch.device("cpu"))
    assert t[0]["masks"].shape == (2, 8, 8) and t[0]["masks"].dtype == torch.float32
    assert t[0]["masks"][:, :5, :6].all() and not t[0]["masks"][:, 5:, :].any() and not t[0]["masks"][:, :, 6:].any()
    assert t[1]["depths"].shape == (8, 8) and float(t[1]["depths"].sum()) == 2.0 * 30
    assert t[1]["occupancy"].shape == (4, 3, 3) and t[1]["labels"].tolist() == [11]
    assert pad_to(torch.ones(2, 2), (2, 2)).shape == (2, 2)


def test_criterion_targets_match_per_image_copies() -> None:
    # one copy per key and batch, split on the device: the same tensors as padding and moving each image alone,
    # also for an image without segments
    g = torch.Generator().manual_seed(0)
    counts = [3, 0, 2]
    batch = {
        "image": torch.zeros(3, 3, 5, 6),
        "labels": [torch.randint(0, 13, (c,), generator=g) for c in counts],
        "masks": [torch.rand(c, 5, 6, generator=g) > 0.5 for c in counts],
        "depth": torch.rand(3, 5, 6, generator=g),
        "depth_reduced": torch.rand(3, 3, 3, generator=g),
        "occupancy_planes": torch.rand(3, 4, 3, 3, generator=g) > 0.5,
    }
    got = criterion_targets(batch, (8, 8), torch.device("cpu"))
    for i, t in enumerate(got):
        assert torch.equal(t["labels"], batch["labels"][i])
        assert torch.equal(t["masks"], pad_to(batch["masks"][i].float(), (8, 8))) and t["masks"].shape[0] == counts[i]
        assert torch.equal(t["depths"], pad_to(batch["depth"][i], (8, 8)))
        assert torch.equal(t["depth_map"], batch["depth_reduced"][i])
        assert torch.equal(t["occupancy"], batch["occupancy_planes"][i].float())
    assert "occupancy" not in criterion_targets(batch, (8, 8), torch.device("cpu"), with_occupancy=False)[0]
