"""BUOL multi-plane occupancy head: per-pixel occupancy logits for ``num_bins`` depth planes.

A decoder (1x1 conv on res5, then four up-projections to res4, res3, res2 and 2x res2 size)
and a multi-feature fusion (every res level up-projected to that size, concatenated, 5x5
conv) are concatenated and fed to a prediction head that resizes to ``target_size``
(default 120x160, the 3D stage's reduced image plane) and applies three 5x5 convs.
Up-projections resize bilinearly with align_corners=True (BUOL convention).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class UpProjection(nn.Module):
    """Resize, then relu(bn(conv3(relu(bn(conv5(x))))) + bn(conv5'(x)))."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_input_features, num_output_features, 5, 1, 2, bias=False)
        self.bn1 = nn.BatchNorm2d(num_output_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv1_2 = nn.Conv2d(num_output_features, num_output_features, 3, 1, 1, bias=False)
        self.bn1_2 = nn.BatchNorm2d(num_output_features)
        self.conv2 = nn.Conv2d(num_input_features, num_output_features, 5, 1, 2, bias=False)
        self.bn2 = nn.BatchNorm2d(num_output_features)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        branch1 = self.bn1_2(self.conv1_2(self.relu(self.bn1(self.conv1(x)))))
        branch2 = self.bn2(self.conv2(x))
        return self.relu(branch1 + branch2)


class Decoder(nn.Module):
    """Coarse-to-fine decoder; ``block_channel`` ordered res5 -> res2."""

    def __init__(self, block_channel: Sequence[int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(block_channel[0], block_channel[1], kernel_size=1, stride=1, bias=False)
        self.bn = nn.BatchNorm2d(block_channel[1])
        self.up1 = UpProjection(block_channel[1], block_channel[2])
        self.up2 = UpProjection(block_channel[2], block_channel[3])
        self.up3 = UpProjection(block_channel[3], block_channel[3] // 2)
        self.up4 = UpProjection(block_channel[3] // 2, block_channel[3] // 4)

    def forward(self, res2, res3, res4, res5):
        x = F.relu(self.bn(self.conv(res5)))
        x = self.up1(x, res4.shape[-2:])
        x = self.up2(x, res3.shape[-2:])
        x = self.up3(x, res2.shape[-2:])
        return self.up4(x, (res2.shape[-2] * 2, res2.shape[-1] * 2))


class MultiFeatureFusion(nn.Module):
    """All four levels up-projected to one size and fused by a 5x5 conv + BN + ReLU."""

    def __init__(self, block_channel: Sequence[int], num_features: int = 64) -> None:
        super().__init__()
        if num_features % 4 != 0:
            raise ValueError(f"MultiFeatureFusion: num_features ({num_features}) must be divisible by 4")
        per = num_features // 4
        self.up1 = UpProjection(block_channel[3], per)
        self.up2 = UpProjection(block_channel[2], per)
        self.up3 = UpProjection(block_channel[1], per)
        self.up4 = UpProjection(block_channel[0], per)
        self.conv = nn.Conv2d(num_features, num_features, kernel_size=5, stride=1, padding=2, bias=False)
        self.bn = nn.BatchNorm2d(num_features)

    def forward(self, res2, res3, res4, res5, size):
        x = torch.cat([self.up1(res2, size), self.up2(res3, size), self.up3(res4, size), self.up4(res5, size)], 1)
        return F.relu(self.bn(self.conv(x)))


class PredictionHead(nn.Module):
    """Resize to ``target_size`` by an up-projection, two 5x5 ConvBNReLU, 5x5 conv to bins."""

    def __init__(self, channel: int, num_class: int, target_size: tuple[int, int] = (120, 160)) -> None:
        super().__init__()
        self.target_size = tuple(target_size)
        self.resize = UpProjection(channel, channel)
        self.conv0 = nn.Conv2d(channel, channel, kernel_size=5, stride=1, padding=2, bias=False)
        self.bn0 = nn.BatchNorm2d(channel)
        self.conv1 = nn.Conv2d(channel, channel, kernel_size=5, stride=1, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(channel)
        self.conv2 = nn.Conv2d(channel, num_class, kernel_size=5, stride=1, padding=2, bias=True)

    def forward(self, x):
        x = self.resize(x, self.target_size)
        x = F.relu(self.bn0(self.conv0(x)))
        x = F.relu(self.bn1(self.conv1(x)))
        return self.conv2(x)


class MultiPlaneOccupancyHead(nn.Module):
    """``forward({"res2".."res5"})`` -> occupancy logits ``[B, num_bins, *target_size]``.

    Args:
        block_channel: channels of res5, res4, res3, res2 (toolkit 2048, 1024, 512, 256).
        feature_channels: width of the fusion branch (4 equal parts).
        num_bins: depth planes (100 bins over [0, depth_max] in the toolkit).
        target_size: output plane (H, W).
    """

    def __init__(
        self,
        block_channel: Sequence[int] = (2048, 1024, 512, 256),
        feature_key: Sequence[str] = ("res2", "res3", "res4", "res5"),
        feature_channels: int = 64,
        num_bins: int = 100,
        target_size: tuple[int, int] = (120, 160),
    ) -> None:
        super().__init__()
        if len(block_channel) != 4 or len(feature_key) != 4:
            raise ValueError("MultiPlaneOccupancyHead needs 4 block channels and 4 feature keys")
        if block_channel[3] % 4 != 0:
            raise ValueError(f"block_channel[3] ({block_channel[3]}) must be divisible by 4")
        self.feature_key = list(feature_key)
        self.num_bins = num_bins
        self.decoder = Decoder(block_channel)
        self.multi_feature_fuser = MultiFeatureFusion(block_channel, feature_channels)
        self.prediction = PredictionHead(block_channel[3] // 4 + feature_channels, num_bins, target_size)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        res2, res3, res4, res5 = (features[k] for k in self.feature_key)
        dec = self.decoder(res2, res3, res4, res5)
        mff = self.multi_feature_fuser(res2, res3, res4, res5, dec.shape[-2:])
        return self.prediction(torch.cat((dec, mff), 1))
