"""DPT head of VGGT (depth and point maps) and its building blocks.

Reproduces the reference numerics, including its quirks:
* one LayerNorm (``norm``) shared by all four tapped layers;
* per-level 1x1 projection, then a 0.1-scaled sin/cos UV embedding, then resizing by x4 (ConvTranspose),
  x2 (ConvTranspose), identity and /2 (3x3 conv, stride 2, padding 1);
* ``refinenet4`` has no first residual unit; every fusion step upsamples bilinearly with
  ``align_corners=True`` to the next finer level's exact size (the finest one by x2);
* the residual units use an in-place ReLU on their input, so the skip adds ``relu(x)`` rather than ``x``;
* after ``output_conv1`` the map is resized to ``(14h, 14w) / down_ratio`` and the UV embedding is added again;
* the UV embedding's sin/cos are computed in float64 and returned as float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

ACTIVATIONS = ("exp", "inv_log", "xy_inv_log", "norm", "relu", "sigmoid", "linear")
CONF_ACTIVATIONS = ("expp1", "expp0", "sigmoid")
_MAX_INTERP_ELEMENTS = 1_610_612_736  # split very large interpolations over the batch (int32 indexing limit)


def interpolate(x: torch.Tensor, size=None, scale_factor=None, mode: str = "bilinear",
                align_corners: bool | None = True) -> torch.Tensor:
    """``F.interpolate`` that splits the batch when the output would exceed int32 indexing."""
    out_hw = size if size is not None else tuple(int(d * scale_factor) for d in x.shape[-2:])
    total = x.shape[0] * x.shape[1] * out_hw[0] * out_hw[1]
    kwargs = dict(size=size, scale_factor=scale_factor, mode=mode, align_corners=align_corners)
    if total <= _MAX_INTERP_ELEMENTS or x.shape[0] == 1:
        return F.interpolate(x, **kwargs)
    chunks = (total // _MAX_INTERP_ELEMENTS) + 1
    parts = [F.interpolate(c, **kwargs) for c in x.chunk(chunks, dim=0)]
    return torch.cat(parts, dim=0).contiguous()


def uv_grid(width: int, height: int, aspect_ratio: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised image-plane grid ``[height, width, 2]`` (x, y) spanning the image diagonal to unit length.

    x spans +-aspect/sqrt(aspect^2+1), y spans +-1/sqrt(aspect^2+1), both shrunk by (n-1)/n (pixel centres).
    """
    diag = (aspect_ratio**2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diag, 1.0 / diag
    xs = torch.linspace(-span_x * (width - 1) / width, span_x * (width - 1) / width, steps=width, dtype=dtype,
                        device=device)
    ys = torch.linspace(-span_y * (height - 1) / height, span_y * (height - 1) / height, steps=height, dtype=dtype,
                        device=device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1)


def sincos_embed_1d(values: torch.Tensor, dim: int, omega_0: float = 100.0) -> torch.Tensor:
    """``[N] -> [N, dim]`` = [sin(v*w), cos(v*w)] with w = omega_0^(-k/(dim/2)), in float64, returned as float32."""
    work = torch.float32 if values.device.type == "mps" else torch.float64
    omega = torch.arange(dim // 2, dtype=work, device=values.device)
    omega = omega / (dim / 2.0)
    omega = 1.0 / omega_0**omega
    angles = values.reshape(-1).to(work)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def uv_position_embedding(channels: int, height: int, width: int, image_w: int, image_h: int,
                          dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The DPT positional embedding ``[channels, height, width]`` (float32) for a feature map of an image."""
    grid = uv_grid(width, height, image_w / image_h, dtype, device).reshape(-1, 2)
    emb = torch.cat([sincos_embed_1d(grid[:, 0], channels // 2), sincos_embed_1d(grid[:, 1], channels // 2)], dim=-1)
    return emb.view(height, width, channels).permute(2, 0, 1)


def activate_head(raw: torch.Tensor, activation: str, conf_activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Channels-first raw output ``[N, C, H, W]`` -> (values ``[N, H, W, C-1]``, confidence ``[N, H, W]``)."""
    fmap = raw.permute(0, 2, 3, 1)
    values, conf = fmap[..., :-1], fmap[..., -1]
    if activation == "exp":
        values = torch.exp(values)
    elif activation == "inv_log":
        values = torch.sign(values) * torch.expm1(torch.abs(values))
    elif activation == "xy_inv_log":
        xy, z = values.split([2, 1], dim=-1)
        z = torch.sign(z) * torch.expm1(torch.abs(z))
        values = torch.cat([xy * z, z], dim=-1)
    elif activation == "norm":
        values = values / values.norm(dim=-1, keepdim=True)
    elif activation == "relu":
        values = F.relu(values)
    elif activation == "sigmoid":
        values = torch.sigmoid(values)
    elif activation != "linear":
        raise ConfigError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
    if conf_activation == "expp1":
        conf = 1 + conf.exp()
    elif conf_activation == "expp0":
        conf = conf.exp()
    elif conf_activation == "sigmoid":
        conf = torch.sigmoid(conf)
    else:
        raise ConfigError(f"unknown conf_activation {conf_activation!r}; choose one of {CONF_ACTIVATIONS}")
    return values, conf


class ResidualConvUnit(nn.Module):
    """relu -> conv3x3 -> relu -> conv3x3, plus a skip of ``relu(x)`` (the reference's in-place ReLU effect)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        out = self.conv2(F.relu(self.conv1(x)))
        return out + x


class FeatureFusionBlock(nn.Module):
    """DPT fusion: ``(x0 [+ unit1(x1)]) -> unit2 -> bilinear resize (align_corners) -> 1x1 conv``."""

    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.has_residual = has_residual
        self.out_conv = nn.Conv2d(features, features, kernel_size=1, stride=1, padding=0, bias=True)
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor | None = None,
                size: Sequence[int] | None = None) -> torch.Tensor:
        out = x0
        if self.has_residual:
            out = out + self.resConfUnit1(x1)
        out = self.resConfUnit2(out)
        if size is None:
            out = interpolate(out, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            out = interpolate(out, size=tuple(size), mode="bilinear", align_corners=True)
        return self.out_conv(out)


class DPTHead(nn.Module):
    """Dense prediction head on four aggregator layers (VGGT's depth / point head, or a feature extractor).

    ``forward(tokens, images, patch_start_idx)`` returns ``(pred [B,S,H,W,output_dim-1], conf [B,S,H,W])``,
    or feature maps ``[B,S,features,H',W']`` when ``feature_only``. With ``return_features=True`` it also
    returns the four fusion outputs (refinenet1..4, finest first) as ``[B*S, features, h_i, w_i]`` maps.
    """

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        output_dim: int = 4,
        activation: str = "inv_log",
        conf_activation: str = "expp1",
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23),
        pos_embed: bool = True,
        feature_only: bool = False,
        down_ratio: int = 1,
    ) -> None:
        super().__init__()
        if len(out_channels) != 4 or len(intermediate_layer_idx) != 4:
            raise ConfigError("DPTHead needs exactly four out_channels and four intermediate_layer_idx")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
        if conf_activation not in CONF_ACTIVATIONS:
            raise ConfigError(f"unknown conf_activation {conf_activation!r}; choose one of {CONF_ACTIVATIONS}")
        self.patch_size = patch_size
        self.activation = activation
        self.conf_activation = conf_activation
        self._pos_cache: dict[tuple, torch.Tensor] = {}  # scaled position embeddings (_add_pos_embed)
        self.pos_embed = pos_embed
        self.feature_only = feature_only
        self.down_ratio = down_ratio
        self.intermediate_layer_idx = list(intermediate_layer_idx)
        out_channels = list(out_channels)
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList([nn.Conv2d(dim_in, oc, kernel_size=1, stride=1, padding=0) for oc in out_channels])
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(out_channels[0], out_channels[0], kernel_size=4, stride=4, padding=0),
                nn.ConvTranspose2d(out_channels[1], out_channels[1], kernel_size=2, stride=2, padding=0),
                nn.Identity(),
                nn.Conv2d(out_channels[3], out_channels[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.scratch = nn.Module()
        for i, oc in enumerate(out_channels, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(oc, features, kernel_size=3, stride=1, padding=1, bias=False))
        self.scratch.refinenet1 = FeatureFusionBlock(features)
        self.scratch.refinenet2 = FeatureFusionBlock(features)
        self.scratch.refinenet3 = FeatureFusionBlock(features)
        self.scratch.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        if feature_only:
            self.scratch.output_conv1 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1)
        else:
            self.scratch.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, stride=1, padding=1)
            self.scratch.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, 32, kernel_size=3, stride=1, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(32, output_dim, kernel_size=1, stride=1, padding=0),
            )

    def _add_pos_embed(self, x: torch.Tensor, image_w: int, image_h: int, ratio: float = 0.1) -> torch.Tensor:
        # the embedding depends on sizes, dtype and device only: built once per key instead of about 50 kernels
        # per level and forward (a host-bound step pays for every launch); no gradient flows into it
        key = (tuple(x.shape[1:]), image_w, image_h, ratio, x.dtype, x.device)
        emb = self._pos_cache.get(key)
        if emb is None:
            with torch.no_grad():
                emb = uv_position_embedding(x.shape[1], x.shape[-2], x.shape[-1], image_w, image_h, x.dtype,
                                            x.device) * ratio
            if len(self._pos_cache) >= 8:  # a few sizes at a time (inference on mixed sizes): drop the oldest
                self._pos_cache.pop(next(iter(self._pos_cache)))
            self._pos_cache[key] = emb
        return x + emb[None]

    def level_features(self, tokens: Sequence[torch.Tensor | None], patch_start_idx: int, grid_h: int,
                       grid_w: int, image_h: int, image_w: int, frames: slice | None = None) -> list[torch.Tensor]:
        """The four resized per-level maps (after norm, projection, +pos-embed and resizing)."""
        levels = []
        for i, layer in enumerate(self.intermediate_layer_idx):
            t = tokens[layer]
            if t is None:
                raise ValueError(f"aggregator layer {layer} was not cached; add it to cached_layer_indices")
            t = t[:, :, patch_start_idx:]
            if frames is not None:
                t = t[:, frames]
            x = self.norm(t.reshape(t.shape[0] * t.shape[1], -1, t.shape[-1]))
            x = x.permute(0, 2, 1).reshape(x.shape[0], x.shape[-1], grid_h, grid_w)
            x = self.projects[i](x)
            if self.pos_embed:
                x = self._add_pos_embed(x, image_w, image_h)
            levels.append(self.resize_layers[i](x))
        return levels

    def fuse(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Scratch convs + fusion blocks; returns ``[refinenet1, refinenet2, refinenet3, refinenet4]`` outputs."""
        l1 = self.scratch.layer1_rn(levels[0])
        l2 = self.scratch.layer2_rn(levels[1])
        l3 = self.scratch.layer3_rn(levels[2])
        l4 = self.scratch.layer4_rn(levels[3])
        f4 = self.scratch.refinenet4(l4, size=l3.shape[2:])
        f3 = self.scratch.refinenet3(f4, l3, size=l2.shape[2:])
        f2 = self.scratch.refinenet2(f3, l2, size=l1.shape[2:])
        f1 = self.scratch.refinenet1(f2, l1)
        return [f1, f2, f3, f4]

    def _forward_frames(self, tokens, images_hw, batch, frames_n, patch_start_idx, frames=None):
        image_h, image_w = images_hw
        grid_h, grid_w = image_h // self.patch_size, image_w // self.patch_size
        levels = self.level_features(tokens, patch_start_idx, grid_h, grid_w, image_h, image_w, frames)
        fused = self.fuse(levels)
        out = self.scratch.output_conv1(fused[0])
        size = (int(grid_h * self.patch_size / self.down_ratio), int(grid_w * self.patch_size / self.down_ratio))
        out = interpolate(out, size=size, mode="bilinear", align_corners=True)
        if self.pos_embed:
            out = self._add_pos_embed(out, image_w, image_h)
        if self.feature_only:
            return out.view(batch, frames_n, *out.shape[1:]), fused
        raw = self.scratch.output_conv2(out)
        pred, conf = activate_head(raw, self.activation, self.conf_activation)
        return (pred.view(batch, frames_n, *pred.shape[1:]), conf.view(batch, frames_n, *conf.shape[1:])), fused

    def forward(self, aggregated_tokens_list: Sequence[torch.Tensor | None], images: torch.Tensor,
                patch_start_idx: int, frames_chunk_size: int | None = 8, return_features: bool = False):
        """Run the head on ``images`` [B, S, 3, H, W] (used for its size only) and the aggregator tokens.

        Frames are processed ``frames_chunk_size`` at a time to bound memory (no numerical effect).
        """
        if images.dim() == 4:
            images = images.unsqueeze(0)
        batch, frames_n = images.shape[:2]
        hw = images.shape[-2:]
        if frames_chunk_size is None or frames_chunk_size >= frames_n:
            result, fused = self._forward_frames(aggregated_tokens_list, hw, batch, frames_n, patch_start_idx)
            return (result, fused) if return_features else result
        results, fused_all = [], []
        for start in range(0, frames_n, frames_chunk_size):
            stop = min(start + frames_chunk_size, frames_n)
            res, fused = self._forward_frames(aggregated_tokens_list, hw, batch, stop - start, patch_start_idx,
                                              frames=slice(start, stop))
            results.append(res)
            fused_all.append(fused)
        if self.feature_only:
            result = torch.cat(results, dim=1)
        else:
            result = (torch.cat([r[0] for r in results], dim=1), torch.cat([r[1] for r in results], dim=1))
        if not return_features:
            return result
        # fusion maps are [B*S_chunk, ...] per chunk; regroup them to frame order [B*S, ...]
        merged = []
        for level in range(4):
            per_chunk = [f[level].view(batch, -1, *f[level].shape[1:]) for f in fused_all]
            merged.append(torch.cat(per_chunk, dim=1).flatten(0, 1))
        return result, merged
