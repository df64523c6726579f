"""`MaskFormerHead`: the whole trainable 2D head of NVPanoptix3D behind one module.

backbone tokens --ViTFeatureAdapter--> res2..res5 --MSDeformAttnPixelDecoder--> mask features
+ 3 levels; DPT depth features --DepthProjector--> 3 aligned depth levels; both feed the
depth-aware masked-attention decoder. The BUOL occupancy head reads res2..res5 directly.
`HeadConfig.tiny()` is a small test configuration, `HeadConfig.full()` the toolkit sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .adapter import RES_NAMES, ViTFeatureAdapter
from .depth_projector import DepthProjector
from .layers import ShapeSpec
from .occupancy import MultiPlaneOccupancyHead
from .pixel_decoder import MSDeformAttnPixelDecoder
from .transformer_decoder import DepthAwareMultiScaleMaskedTransformerDecoder


@dataclass
class HeadConfig:
    """Sizes of every part of the head (defaults = NVPanoptix3D toolkit)."""

    token_dim: int = 2048
    res_channels: tuple[int, int, int, int] = (256, 512, 1024, 2048)
    num_classes: int = 13
    conv_dim: int = 256
    mask_dim: int = 256
    norm: str = "GN"
    transformer_enc_layers: int = 6
    transformer_nheads: int = 8
    transformer_dim_feedforward: int = 1024
    transformer_dropout: float = 0.0
    common_stride: int = 4
    hidden_dim: int = 256
    num_queries: int = 100
    nheads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 9  # layers built (= config DEC_LAYERS - 1)
    pre_norm: bool = False
    enforce_input_project: bool = False
    depth_dim: int = 256
    occupancy: bool = True
    occupancy_bins: int = 100
    occupancy_size: tuple[int, int] = (120, 160)
    occupancy_fusion_channels: int = 64
    keep_reference_unused: bool = True

    @classmethod
    def full(cls, **overrides) -> HeadConfig:
        """Toolkit sizes: VGGT tokens 2048, res 256/512/1024/2048, 100 queries, 9 layers."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> HeadConfig:
        """A ~0.5 M-parameter configuration for fast CPU tests."""
        base = dict(
            token_dim=32, res_channels=(32, 32, 48, 64), num_classes=5, conv_dim=32, mask_dim=32,
            transformer_enc_layers=1, transformer_nheads=4, transformer_dim_feedforward=48, hidden_dim=32,
            num_queries=10, nheads=4, dim_feedforward=64, dec_layers=3, depth_dim=32, occupancy_bins=8,
            occupancy_size=(12, 16), occupancy_fusion_channels=16,
        )
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict:
        return asdict(self)


class MaskFormerHead(nn.Module):
    """Adapter + pixel decoder + depth projector + depth-aware decoder + occupancy head.

    ``forward(tokens, patch_grid, depth_features, patch_start_idx=0, use_occupancy=True)``:

    * ``tokens``: the 4 backbone layers (VGGT layers 4, 11, 17, 23), each ``[B, S, N, token_dim]``
      with ``N = patch_start_idx + h*w`` (pass ``patch_start_idx=5`` for raw VGGT tokens);
    * ``patch_grid``: ``(h, w)`` patches (26, 32 for a 364x448 input);
    * ``depth_features``: the DPT depth head's 4 fusion maps, finest first, ``[B*S, depth_dim,
      H_i, W_i]`` (208x256, 104x128, 52x64, 26x32 at toolkit sizes).

    Returns the decoder dict (``pred_logits [B*S, Q, K+1]``, ``pred_masks [B*S, Q, 4h, 4w]``,
    ``aux_outputs``, ``segm_decoder_out [B*S, Q, hidden]``, ``mask_features``,
    ``depth_features``, ``enc_features``) plus ``occupancy_logits [B*S, bins, *occupancy_size]``
    (None when disabled) and ``res_features`` (the adapter maps).
    """

    def __init__(self, config: HeadConfig | None = None) -> None:
        super().__init__()
        cfg = config or HeadConfig.full()
        self.config = cfg
        self.adapter = ViTFeatureAdapter(cfg.token_dim, cfg.res_channels)
        input_shape = {
            name: ShapeSpec(c, s) for name, c, s in zip(RES_NAMES, cfg.res_channels, (4, 8, 16, 32))
        }
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            input_shape,
            transformer_dropout=cfg.transformer_dropout,
            transformer_nheads=cfg.transformer_nheads,
            transformer_dim_feedforward=cfg.transformer_dim_feedforward,
            transformer_enc_layers=cfg.transformer_enc_layers,
            conv_dim=cfg.conv_dim,
            mask_dim=cfg.mask_dim,
            norm=cfg.norm,
            transformer_in_features=["res3", "res4", "res5"],
            common_stride=cfg.common_stride,
        )
        self.predictor = DepthAwareMultiScaleMaskedTransformerDecoder(
            cfg.conv_dim,
            True,
            keep_reference_unused=cfg.keep_reference_unused,
            num_classes=cfg.num_classes,
            hidden_dim=cfg.hidden_dim,
            num_queries=cfg.num_queries,
            nheads=cfg.nheads,
            dim_feedforward=cfg.dim_feedforward,
            dec_layers=cfg.dec_layers,
            pre_norm=cfg.pre_norm,
            mask_dim=cfg.mask_dim,
            enforce_input_project=cfg.enforce_input_project,
        )
        # Projected depth maps get the pixel decoder's width so the decoder treats both alike.
        self.depth_projector = DepthProjector(cfg.depth_dim, cfg.conv_dim)
        self.occupancy_module = (
            MultiPlaneOccupancyHead(
                block_channel=tuple(cfg.res_channels[::-1]),
                feature_channels=cfg.occupancy_fusion_channels,
                num_bins=cfg.occupancy_bins,
                target_size=tuple(cfg.occupancy_size),
            )
            if cfg.occupancy
            else None
        )

    def forward(
        self,
        tokens: Sequence[torch.Tensor],
        patch_grid: tuple[int, int],
        depth_features: Sequence[torch.Tensor],
        patch_start_idx: int = 0,
        use_occupancy: bool = True,
    ) -> dict:
        feats = self.adapter(tokens, patch_grid, patch_start_idx)
        occupancy = self.occupancy_module(feats) if (use_occupancy and self.occupancy_module is not None) else None
        mask_features, _, multi_scale = self.pixel_decoder.forward_features(feats)
        level_sizes = [tuple(f.shape[-2:]) for f in multi_scale]
        depth_feat, depth_levels = self.depth_projector(depth_features, tuple(mask_features.shape[-2:]), level_sizes)
        out = self.predictor(multi_scale, depth_levels, mask_features, depth_feat)
        out["occupancy_logits"] = occupancy
        out["res_features"] = feats
        return out


def build_head(preset: str = "full", **overrides) -> MaskFormerHead:
    """``build_head("tiny" | "full", **HeadConfig overrides)``."""
    if preset not in ("tiny", "full"):
        raise ValueError(f"unknown preset {preset!r}: use 'tiny' or 'full'")
    cfg = HeadConfig.tiny(**overrides) if preset == "tiny" else HeadConfig.full(**overrides)
    return MaskFormerHead(cfg)
