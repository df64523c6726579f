"""Aligns the depth branch's multi-scale features with the pixel decoder's levels.

The VGGT DPT depth head's fusion outputs (``[out1, out2, out3, out4]``, finest first,
e.g. 208x256 / 104x128 / 52x64 / 26x32 for a 364x448 input) each pass a stride-2 3x3
ConvBNReLU, a bilinear resize and a 1x1 conv. Level i is resized to the i-th entry of
``[mask_features size, 1/8, 1/16, 1/32]``; the first (mask-feature-size) map is computed
but dropped, as in the toolkit, and the rest are returned coarse-first to match the
decoder's ``[1/32, 1/16, 1/8]`` order. The raw coarsest input is passed through as
``depth_features`` (reused by the 3D stage).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConvBlock(nn.Module):
    """3x3 stride-2 conv + BatchNorm + ReLU (keys ``conv_block.0/1``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_block(x)


class DepthProjector(nn.Module):
    """``forward(depth_features, mask_size, level_sizes)`` -> (coarsest input, [3 aligned maps])."""

    def __init__(self, in_channels: int = 256, out_channels: int = 256, num_proj_convs: int = 4) -> None:
        super().__init__()
        self.num_proj_convs = num_proj_convs
        self.proj_convs1 = nn.ModuleList(ConvBlock(in_channels, in_channels) for _ in range(num_proj_convs))
        self.proj_convs2 = nn.ModuleList(
            nn.Conv2d(in_channels, out_channels, kernel_size=1) for _ in range(num_proj_convs)
        )

    def forward(
        self,
        depth_features: Sequence[torch.Tensor],
        mask_size: tuple[int, int],
        level_sizes: Sequence[tuple[int, int]],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``level_sizes`` are the decoder levels coarse-first ([1/32, 1/16, 1/8])."""
        targets = [tuple(mask_size)] + [tuple(s) for s in list(level_sizes)[::-1]]
        if len(depth_features) != self.num_proj_convs or len(targets) != self.num_proj_convs:
            raise ValueError(
                f"DepthProjector: {len(depth_features)} depth maps and {len(targets)} target sizes, "
                f"expected {self.num_proj_convs} of each"
            )
        outs = []
        for i, (feat, size) in enumerate(zip(depth_features, targets)):
            y = self.proj_convs1[i](feat)
            y = F.interpolate(y, size, mode="bilinear", align_corners=False)
            outs.append(self.proj_convs2[i](y))
        return depth_features[-1], outs[1:][::-1]
