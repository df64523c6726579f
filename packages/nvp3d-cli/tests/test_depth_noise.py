"""``model.frustum3d.train_depth_noise``: the lifting depth's random log-normal error in 3D-stage training."""

from __future__ import annotations

import pytest
import torch
from nvp3d.model.depth_noise import perturb_depth


def test_zero_sigma_is_the_identity() -> None:
    depth = torch.rand(2, 6, 8) + 1.0
    assert perturb_depth(depth, 0.0) is depth


def test_log_error_has_the_asked_spread_and_is_smooth_over_the_image() -> None:
    """Per pixel the log factor has mean 0 and standard deviation sigma over many images; within one image it is
    a smooth field (neighbouring pixels differ by a small fraction of sigma), plus one scale per image."""
    gen = torch.Generator().manual_seed(0)
    depth = torch.full((512, 30, 40), 3.0, dtype=torch.float64)
    sigma = 0.1
    out = perturb_depth(depth, sigma, generator=gen)
    assert out.shape == depth.shape and out.dtype == depth.dtype and bool((out > 0).all())
    log = torch.log(out / depth)
    assert abs(float(log.mean())) < 0.1 * sigma
    assert float(log.std(dim=0).mean()) == pytest.approx(sigma, rel=0.1)
    step = (log[:, :, 1:] - log[:, :, :-1]).abs().mean()
    assert float(step) < 0.1 * sigma
    # the errors of two images are independent: their correlation over pixels and images is near 0
    a, b = log[0::2].flatten(), log[1::2].flatten()
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.1


def test_same_generator_same_noise_and_bad_shape_refused() -> None:
    depth = torch.rand(3, 12, 16) + 0.5
    one = perturb_depth(depth, 0.2, generator=torch.Generator().manual_seed(7))
    two = perturb_depth(depth, 0.2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(one, two) and not torch.equal(one, depth)
    with pytest.raises(ValueError, match=r"depth must be \[B, h, w\]"):
        perturb_depth(depth[0], 0.2)
