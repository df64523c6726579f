"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch.

Every query attends to ``n_points`` sampled locations per head and per feature level; the
locations are a learned offset around a reference point, the weights a softmax over
levels x points. Sampling is ``grid_sample`` (bilinear, zero padding, align_corners=False)
on ``2*loc - 1`` with (x, y) locations normalised to [0, 1] by each level's (W, H), which is
exactly the convention of the reference CUDA kernel (pixel ``loc*size - 0.5``, zero outside).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def ms_deform_attn_sample(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted bilinear sampling of multi-level values.

    Args:
        value: ``[N, sum(H_l*W_l), M, D]`` per-head values, levels concatenated in order.
        spatial_shapes: ``[(H_l, W_l)]`` of each level.
        sampling_locations: ``[N, Lq, M, L, P, 2]`` (x, y) in [0, 1].
        attention_weights: ``[N, Lq, M, L, P]`` (already softmax-normalised over L*P).

    Returns:
        ``[N, Lq, M*D]``.
    """
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    sizes = [h * w for h, w in spatial_shapes]
    value_levels = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        # [N, HW, M, D] -> [N*M, D, H, W]
        v = value_levels[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention layer (keys: sampling_offsets, attention_weights,
    value_proj, output_proj, as in the reference)."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def _normalizer(self, spatial_shapes: list[tuple[int, int]], dtype: torch.dtype, device: torch.device
                    ) -> torch.Tensor:
        """``[L, 2]`` (W, H) per level, made once per (shapes, dtype, device) and then reused.

        Cached because building it is a host-to-device copy, which a CUDA-graph capture cannot contain (the
        first, eager warm-up call fills the cache); the values are the same as building it every call.
        """
        key = (tuple((int(h), int(w)) for h, w in spatial_shapes), dtype, device)
        cache = self.__dict__.setdefault("_normalizers", {})
        table = cache.get(key)
        if table is None:
            table = cache[key] = torch.tensor([[w, h] for h, w in key[0]], dtype=dtype, device=device)
        return table

    def reset_parameters(self) -> None:
        """Offsets start on a ring of per-head directions, scaled by the point index."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query ``[N, Lq, C]``, reference_points ``[N, Lq, L, 2]`` (x, y in [0, 1]),
        input_flatten ``[N, sum HW, C]``; returns ``[N, Lq, C]``."""
        n, lq, _ = query.shape
        _, len_in, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, len_in, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        # (W, H) per level, so offsets are in units of that level's pixels.
        normalizer = self._normalizer(spatial_shapes, query.dtype, query.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        out = ms_deform_attn_sample(value, spatial_shapes, locations, weights)
        return self.output_proj(out)
