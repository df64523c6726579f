"""The VGGT wrapper: aggregator + camera, depth and point heads under the checkpoint's top-level names."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from .aggregator import Aggregator
from .camera_head import CameraHead
from .dpt_head import DPTHead
from .errors import ConfigError


class VGGT(nn.Module):
    """Visual geometry grounded transformer (VGGT-1B layout by default).

    Submodules ``aggregator``, ``camera_head``, ``depth_head``, ``point_head`` carry the official checkpoint's
    key prefixes. ``track_head`` is not implemented here (always ``None``); ``load_pretrained`` skips the
    checkpoint's ``track_head.*`` keys with a message.

    Small configurations pass ``aggregator_kwargs`` (any ``Aggregator`` argument), ``dpt_kwargs`` (``features``,
    ``out_channels``, ``intermediate_layer_idx`` ...) and ``camera_kwargs`` (``trunk_depth``, ``num_heads`` ...).
    """

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        embed_dim: int = 1024,
        enable_camera: bool = True,
        enable_point: bool = True,
        enable_depth: bool = True,
        enable_track: bool = False,
        aggregator_kwargs: Mapping[str, Any] | None = None,
        dpt_kwargs: Mapping[str, Any] | None = None,
        camera_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if enable_track:
            raise ConfigError("the VGGT track head is not implemented in backbone_vggt; use enable_track=False")
        self.aggregator = Aggregator(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                                     **dict(aggregator_kwargs or {}))
        dim = 2 * embed_dim
        dpt = dict(dpt_kwargs or {})
        self.camera_head = CameraHead(dim_in=dim, **dict(camera_kwargs or {})) if enable_camera else None
        self.point_head = (
            DPTHead(dim_in=dim, patch_size=patch_size, output_dim=4, activation="inv_log",
                    conf_activation="expp1", **dpt)
            if enable_point else None
        )
        self.depth_head = (
            DPTHead(dim_in=dim, patch_size=patch_size, output_dim=2, activation="exp", conf_activation="expp1",
                    **dpt)
            if enable_depth else None
        )
        self.track_head = None

    def forward(self, images: torch.Tensor, query_points: torch.Tensor | None = None) -> dict[str, Any]:
        """``images`` [B, S, 3, H, W] or [S, 3, H, W] in [0, 1] -> dict of pose/depth/point predictions.

        The heads run with autocast disabled (float32), as the reference does; the aggregator follows any
        surrounding autocast.
        """
        if query_points is not None:
            raise ConfigError("query_points need the track head, which backbone_vggt does not implement")
        if images.dim() == 4:
            images = images.unsqueeze(0)
        tokens, patch_start_idx = self.aggregator(images)
        out: dict[str, Any] = {}
        device_type = images.device.type
        no_autocast = (torch.autocast(device_type=device_type, enabled=False)
                       if torch.amp.is_autocast_available(device_type) else nullcontext())
        with no_autocast:
            if self.camera_head is not None:
                poses = self.camera_head(tokens)
                out["pose_enc"] = poses[-1]
                out["pose_enc_list"] = poses
            if self.depth_head is not None:
                out["depth"], out["depth_conf"] = self.depth_head(tokens, images=images, patch_start_idx=patch_start_idx)
            if self.point_head is not None:
                out["world_points"], out["world_points_conf"] = self.point_head(
                    tokens, images=images, patch_start_idx=patch_start_idx)
        if not self.training:
            out["images"] = images
        return out
