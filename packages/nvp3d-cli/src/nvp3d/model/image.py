"""The toolkit's image path from dataset RGB to backbone input.

0..255 RGB at ``target_size`` -> zero-pad bottom/right to a multiple of ``size_divisibility`` ->
/255 -> bilinear resize to the backbone width with the height rounded to a multiple of the patch size
(``round(H_pad * width / W_pad / patch) * patch``: 364 x 448 for a padded 256 x 320 frame).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def padded_size(height: int, width: int, size_divisibility: int) -> tuple[int, int]:
    """(H, W) rounded up to a multiple of ``size_divisibility`` (unchanged when it is <= 1)."""
    if size_divisibility <= 1:
        return height, width
    d = size_divisibility
    return -(-height // d) * d, -(-width // d) * d


def backbone_size(padded_hw: tuple[int, int], width: int, patch_size: int) -> tuple[int, int]:
    """Backbone input (H, W): width fixed, height keeps the aspect ratio rounded to a patch multiple."""
    h, w = padded_hw
    rows = max(1, round(h * width / w / patch_size))
    return rows * patch_size, width


def pad_images(images: torch.Tensor, size_divisibility: int) -> torch.Tensor:
    """Zero-pad ``[..., H, W]`` at the bottom/right to a multiple of ``size_divisibility``."""
    h, w = images.shape[-2:]
    ph, pw = padded_size(h, w, size_divisibility)
    if (ph, pw) == (h, w):
        return images
    return F.pad(images, (0, pw - w, 0, ph - h), value=0.0)


def to_backbone_input(images: torch.Tensor, size_divisibility: int, width: int, patch_size: int
                      ) -> tuple[torch.Tensor, tuple[int, int]]:
    """``[B, 3, H, W]`` or ``[B, S, 3, H, W]`` in 0..255 -> (``[B, S, 3, h, w]`` in [0, 1], padded (H, W))."""
    if images.dim() == 4:
        images = images[:, None]
    if images.dim() != 5 or images.shape[2] != 3:
        raise ValueError(f"images must be [B, 3, H, W] or [B, S, 3, H, W] RGB, got {tuple(images.shape)}")
    b, s = images.shape[:2]
    padded = pad_images(images.float(), size_divisibility)
    pad_hw = tuple(padded.shape[-2:])
    out_hw = backbone_size(pad_hw, width, patch_size)
    x = padded.reshape(b * s, 3, *pad_hw) / 255.0
    x = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False)
    return x.reshape(b, s, 3, *out_hw), pad_hw
