"""Small building blocks shared by the pixel decoder and the query decoder.

`ShapeSpec` describes one backbone feature map (channels, stride), `Conv2dNorm` is a
convolution with an optional normalisation and activation kept as children (so the
state_dict keys read ``<conv>.weight`` and ``<conv>.norm.weight`` like the reference), and
`PositionEmbeddingSine` is the DETR sine positional encoding used by both decoders.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ShapeSpec:
    """Channel count and stride (relative to the input image) of one feature map."""

    channels: int
    stride: int


def as_shape_spec(value: ShapeSpec | tuple[int, int] | dict) -> ShapeSpec:
    """Accept a ShapeSpec, a ``(channels, stride)`` pair or a ``{"channels", "stride"}`` dict."""
    if isinstance(value, ShapeSpec):
        return value
    if isinstance(value, dict):
        try:
            return ShapeSpec(int(value["channels"]), int(value["stride"]))
        except KeyError as err:
            raise ValueError(f"input_shape entry {value!r} needs keys 'channels' and 'stride'") from err
    if isinstance(value, tuple | list) and len(value) == 2:
        return ShapeSpec(int(value[0]), int(value[1]))
    raise ValueError(f"input_shape entry {value!r} must be ShapeSpec, (channels, stride) or a dict")


def get_norm(norm: str, channels: int) -> nn.Module | None:
    """Build the normalisation named by the reference configs ("GN" = GroupNorm(32), "" = none)."""
    if norm in ("", None):
        return None
    if norm == "GN":
        return nn.GroupNorm(32, channels)
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"unknown norm {norm!r}: use 'GN', 'BN' or ''")


def c2_xavier_fill(module: nn.Module) -> None:
    """Caffe2-style Xavier init (kaiming-uniform with a=1), bias zero."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


def xavier_fill_matrices(module: nn.Module) -> None:
    """Xavier-uniform init of every parameter with more than one dimension (the attention layers' rule)."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class Conv2dNorm(nn.Conv2d):
    """A Conv2d followed by an optional ``norm`` child and an activation (conv -> norm -> act)."""

    def __init__(
        self,
        *args,
        norm: nn.Module | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class PositionEmbeddingSine(nn.Module):
    """DETR sine/cosine positional encoding of a feature map's pixel grid.

    Output ``[B, 2*num_pos_feats, H, W]`` = cat(pos_y, pos_x), sin on even and cos on odd
    frequencies interleaved; positions are the running pixel count normalised by the last
    value (+1e-6) times 2*pi. Always computed in float32 (the reference does the same even
    for float64 inputs); only the shape and device of ``x`` are used.
    """

    def __init__(
        self, num_pos_feats: int = 64, temperature: float = 10000.0, normalize: bool = False,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: normalize must be True when scale is given")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        if mask is None:
            mask = torch.zeros((b, h, w), device=x.device, dtype=torch.bool)
        not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class MLP(nn.Module):
    """Plain multi-layer perceptron with ReLU between layers (keys ``layers.{i}``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x
