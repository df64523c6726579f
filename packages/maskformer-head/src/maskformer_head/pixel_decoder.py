"""Mask2Former's multi-scale deformable-attention pixel decoder.

res3..res5 are projected (1x1 conv + GroupNorm), encoded jointly by a stack of post-norm
deformable-attention layers (low resolution first: res5, res4, res3), and the finest encoder
output is merged into res2 by an FPN step (lateral 1x1 conv + bilinear upsampling + 3x3 conv).
``mask_features`` is a 1x1 conv of the stride-4 map. Runs in float32 even under autocast,
like the reference (deformable attention is only defined there for fp32/fp64).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    Conv2dNorm,
    PositionEmbeddingSine,
    ShapeSpec,
    as_shape_spec,
    c2_xavier_fill,
    get_norm,
    xavier_fill_matrices,
)
from .ms_deform_attn import MSDeformAttn


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention, then a ReLU FFN."""

    def __init__(
        self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
        n_heads: int = 8, n_points: int = 4,
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, padding_mask=None):
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class MSDeformAttnEncoder(nn.Module):
    """Stack of encoder layers sharing one set of reference points."""

    def __init__(self, layers: list[MSDeformAttnEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @staticmethod
    def reference_points(spatial_shapes, batch: int, device, dtype) -> torch.Tensor:
        """Pixel centres of every level normalised to [0, 1], (x, y); ``[B, sum HW, L, 2]``.

        The padding masks are all empty (valid ratio 1), as in the reference."""
        refs = []
        for h, w in spatial_shapes:
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                indexing="ij",
            )
            refs.append(torch.stack((ref_x.reshape(-1) / w, ref_y.reshape(-1) / h), -1))
        ref = torch.cat(refs, 0).to(dtype)
        return ref[None, :, None, :].expand(batch, -1, len(spatial_shapes), -1)

    def forward(self, src, spatial_shapes, pos, padding_mask=None):
        ref = self.reference_points(spatial_shapes, src.shape[0], src.device, src.dtype)
        out = src
        for layer in self.layers:
            out = layer(out, pos, ref, spatial_shapes, padding_mask)
        return out


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Flattens the levels, adds level embeddings to the positions and runs the encoder."""

    def __init__(
        self, d_model=256, nhead=8, num_encoder_layers=6, dim_feedforward=1024, dropout=0.1,
        num_feature_levels=4, enc_n_points=4,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.encoder = MSDeformAttnEncoder(
            [
                MSDeformAttnEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points)
                for _ in range(num_encoder_layers)
            ]
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        xavier_fill_matrices(self)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[torch.Tensor], pos_embeds: list[torch.Tensor]):
        spatial_shapes = [(int(s.shape[2]), int(s.shape[3])) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos_flat = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1) for lvl, p in enumerate(pos_embeds)],
            1,
        )
        memory = self.encoder(src_flat, spatial_shapes, pos_flat)
        return memory, spatial_shapes


class MSDeformAttnPixelDecoder(nn.Module):
    """Pixel decoder with the reference constructor arguments.

    ``input_shape`` maps feature names to ``ShapeSpec`` / ``(channels, stride)`` / dicts.
    ``forward_features(features)`` returns ``(mask_features [B, mask_dim, H/4, W/4],
    encoder output at the coarsest level, multi_scale_features [1/32, 1/16, 1/8])``.
    """

    def __init__(
        self,
        input_shape: Mapping[str, ShapeSpec | tuple[int, int] | dict],
        *,
        transformer_dropout: float = 0.0,
        transformer_nheads: int = 8,
        transformer_dim_feedforward: int = 1024,
        transformer_enc_layers: int = 6,
        conv_dim: int = 256,
        mask_dim: int = 256,
        norm: str = "GN",
        transformer_in_features: list[str] | tuple[str, ...] = ("res3", "res4", "res5"),
        common_stride: int = 4,
    ) -> None:
        super().__init__()
        shapes = {k: as_shape_spec(v) for k, v in input_shape.items()}
        missing = [f for f in transformer_in_features if f not in shapes]
        if missing:
            raise ValueError(f"transformer_in_features {missing} not in input_shape keys {sorted(shapes)}")
        ordered = sorted(shapes.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in ordered]
        self.feature_channels = [v.channels for _, v in ordered]
        tr = [(k, v) for k, v in ordered if k in transformer_in_features]
        self.transformer_in_features = [k for k, _ in tr]
        tr_channels = [v.channels for _, v in tr]
        self.transformer_feature_strides = [v.stride for _, v in tr]
        self.transformer_num_feature_levels = len(tr)

        # Low resolution first: input_proj.0 <-> coarsest transformer feature.
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for c in tr_channels[::-1]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            dropout=transformer_dropout,
            nhead=transformer_nheads,
            dim_feedforward=transformer_dim_feedforward,
            num_encoder_layers=transformer_enc_layers,
            num_feature_levels=self.transformer_num_feature_levels,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.mask_dim = mask_dim
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1, stride=1, padding=0)
        c2_xavier_fill(self.mask_features)
        self.maskformer_num_feature_levels = 3
        self.common_stride = common_stride
        stride = min(self.transformer_feature_strides)
        self.num_fpn_levels = int(math.log2(stride) - math.log2(common_stride))

        use_bias = norm == ""
        lateral, output = [], []
        for idx, in_ch in enumerate(self.feature_channels[: self.num_fpn_levels]):
            lat = Conv2dNorm(in_ch, conv_dim, kernel_size=1, bias=use_bias, norm=get_norm(norm, conv_dim))
            out = Conv2dNorm(
                conv_dim, conv_dim, kernel_size=3, stride=1, padding=1, bias=use_bias,
                norm=get_norm(norm, conv_dim), activation=F.relu,
            )
            c2_xavier_fill(lat)
            c2_xavier_fill(out)
            self.add_module(f"adapter_{idx + 1}", lat)
            self.add_module(f"layer_{idx + 1}", out)
            lateral.append(lat)
            output.append(out)
        # Coarse-to-fine order for the forward loop (plain lists: no duplicate keys).
        self._lateral_convs = lateral[::-1]
        self._output_convs = output[::-1]

    def forward_features(self, features: Mapping[str, torch.Tensor], taps: dict | None = None):
        """Run the decoder in float32 (autocast disabled). ``taps``, if given, is filled with
        intermediate maps (``input_proj.{i}``, ``adapter_{k}``, ``layer_{k}``, ``pos_embed``)."""
        missing = [f for f in self.in_features if f not in features]
        if missing:
            raise ValueError(f"pixel decoder: features {missing} missing (got {sorted(features)})")
        device_type = next(iter(features.values())).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self._forward_fp32(features, taps)

    def _forward_fp32(self, features, taps):
        srcs, pos = [], []
        for idx, name in enumerate(self.transformer_in_features[::-1]):
            x = features[name].float()
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x))
            if taps is not None:
                taps[f"input_proj.{idx}"] = srcs[-1]
        if taps is not None:
            taps["pos_embed"] = pos
        memory, shapes = self.transformer(srcs, pos)
        bs = memory.shape[0]
        chunks = memory.split([h * w for h, w in shapes], dim=1)
        out = [z.transpose(1, 2).reshape(bs, -1, h, w) for z, (h, w) in zip(chunks, shapes)]
        fpn_names = self.in_features[: self.num_fpn_levels][::-1]
        for idx, name in enumerate(fpn_names):
            x = features[name].float()
            lateral = self._lateral_convs[idx](x)
            y = lateral + F.interpolate(out[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            y = self._output_convs[idx](y)
            if taps is not None:
                k = self.num_fpn_levels - idx
                taps[f"adapter_{k}"] = lateral
                taps[f"layer_{k}"] = y
            out.append(y)
        multi_scale_features = out[: self.maskformer_num_feature_levels]
        return self.mask_features(out[-1]), out[0], multi_scale_features

    def forward(self, features: Mapping[str, torch.Tensor]):
        """Same as ``forward_features``."""
        return self.forward_features(features)
