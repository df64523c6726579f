"""Depth noise for 3D-stage training (``model.frustum3d.train_depth_noise``; not in the toolkit).

Why: the 3D stage lifts its features along the frozen 2D network's depth. On the frames it trains on, that depth
is better than on unseen frames (the 2D network has fit them), so the 3D network learns to trust a depth it will
not get at test time. Measured on the learning benchmark (one H100, stop 40): held-out plane depth 2.8 voxels off
at the median, and lifting the same checkpoint at the GT depth gives held-out PRQ 26.0 instead of 16.0, while the
3D stage scores PRQ 34-36 on its training frames. Perturbing the lifting depth while training shows the 3D
network depth errors of the kind it meets on unseen frames.

The perturbation is multiplicative in depth (errors grow with distance, as the 2D depth's do): per image
``depth * exp(sigma * (g + f(x, y)) / sqrt(2))``, with ``g`` one standard normal per image (a scale error) and ``f``
a smooth standard-normal field (normal values on a coarse grid, bilinearly resized to the plane: errors of whole
regions, such as a wall lifted too near, rather than independent pixels). ``sigma`` is the standard deviation of
the log-depth error per pixel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: cells of the coarse grid of the smooth field along the plane's longer side
FIELD_CELLS = 4


def perturb_depth(depth: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``depth`` ``[B, h, w]`` (metres) times a random log-normal factor per pixel (module docstring); ``sigma``
    is the standard deviation of the log factor at each pixel. ``sigma <= 0`` returns ``depth`` itself."""
    if sigma <= 0:
        return depth
    if depth.dim() != 3:
        raise ValueError(f"depth must be [B, h, w], got shape {tuple(depth.shape)}")
    b, h, w = depth.shape
    long_side = max(h, w)
    gh = max(2, round(FIELD_CELLS * h / long_side))
    gw = max(2, round(FIELD_CELLS * w / long_side))
    dev, dtype = depth.device, torch.float32
    scale = torch.randn(b, 1, 1, generator=generator, dtype=dtype, device=dev)
    coarse = torch.randn(b, 1, gh, gw, generator=generator, dtype=dtype, device=dev)
    # align_corners: the field takes the coarse values at the plane's corners, so its spread is the same everywhere
    field = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)[:, 0]
    # bilinear mixing shrinks the field's spread between grid nodes; normalise per image to unit std
    field = field / field.flatten(1).std(dim=1).clamp_min(1e-6)[:, None, None]
    log_factor = sigma * (scale + field) / math.sqrt(2.0)
    return depth * torch.exp(log_factor).to(depth.dtype)
