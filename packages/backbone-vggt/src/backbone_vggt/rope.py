"""2D rotary position embedding (RoPE) as VGGT uses it in the aggregator's attention blocks.

Layout (must match the released checkpoint): the first half of every head's channels is rotated by the
token's row (y), the second half by its column (x). Within each half, channels are paired NeoX style
(``rotate_half``: channel i with channel i + d/4, not interleaved). Frequencies are ``base**(-2k/d_half)``
with base 100. Patch tokens use positions (row + 1, col + 1); the camera and register tokens sit at (0, 0),
which is the identity rotation.

Angles are always formed in float32 (float64 only for float64 tokens, like the reference); for half
precision tokens the rotation is done in float32 and cast back, so large angles are never rounded to bf16.
"""

from __future__ import annotations

import torch
from torch import nn


def patch_positions(grid_h: int, grid_w: int, num_special: int, device: torch.device | None = None) -> torch.Tensor:
    """(row, col) int64 positions of one frame's tokens: ``num_special`` zeros, then patches (+1) row-major.

    Returns a tensor of shape ``[num_special + grid_h * grid_w, 2]``.
    """
    # meshgrid rather than repeat_interleave: the latter builds a CPU index under JIT tracing (ONNX export on CUDA)
    rows, cols = torch.meshgrid(torch.arange(grid_h, device=device), torch.arange(grid_w, device=device),
                                indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    patches = torch.stack([rows, cols], dim=-1) + 1
    special = torch.zeros(num_special, 2, dtype=torch.long, device=device)
    return torch.cat([special, patches], dim=0)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """NeoX rotation of the last axis: ``[a, b] -> [-b, a]`` with a, b the two halves."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class RotaryPositionEmbedding2D(nn.Module):
    """Builds cos/sin tables for (row, col) positions and applies the 2D rotation to q or k.

    No parameters or buffers (the checkpoint has none for RoPE).
    """

    def __init__(self, frequency: float = 100.0) -> None:
        super().__init__()
        self.base_frequency = frequency

    def _axis_angles(self, half_dim: int, max_position: int, device: torch.device) -> torch.Tensor:
        """Angle table ``[max_position, half_dim]`` in float32 (pos * inv_freq, duplicated for rotate_half)."""
        exponents = torch.arange(0, half_dim, 2, device=device).float() / half_dim
        inv_freq = 1.0 / (self.base_frequency**exponents)
        pos = torch.arange(max_position, device=device, dtype=torch.float32)
        angles = pos[:, None] * inv_freq[None, :]
        return torch.cat([angles, angles], dim=-1)

    def tables(
        self, positions: torch.Tensor, head_dim: int, dtype: torch.dtype, max_position: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape ``positions.shape[:-1] + [head_dim]`` (y half first, then x half).

        ``dtype`` is the token dtype; the tables are float64 for float64 tokens, else float32.
        ``max_position`` avoids a host sync (``positions.max()``) when the caller knows the grid size.
        """
        if head_dim % 4 != 0:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
        if max_position is None:
            max_position = int(positions.max()) + 1
        half = head_dim // 2
        angles = self._axis_angles(half, max_position, positions.device)
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        angles = angles.to(table_dtype)
        cos_t, sin_t = angles.cos(), angles.sin()
        pos_y, pos_x = positions[..., 0], positions[..., 1]
        cos = torch.cat([cos_t[pos_y], cos_t[pos_x]], dim=-1)
        sin = torch.cat([sin_t[pos_y], sin_t[pos_x]], dim=-1)
        return cos, sin

    @staticmethod
    def signed_sin(sin: torch.Tensor) -> torch.Tensor:
        """``sin`` with the sign that :func:`rotate_half` puts on each channel folded in (``-`` on the first
        quarter of each half): the table :meth:`rotate` takes."""
        quarters = sin.unflatten(-1, (2, 2, sin.shape[-1] // 4))  # [..., half, quarter, channel]
        # device ops only (no sign tensor from the host: this runs inside CUDA-graph captures)
        return torch.stack([-quarters[..., 0, :], quarters[..., 1, :]], dim=-2).flatten(-3)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """:meth:`apply` with a :meth:`signed_sin` table: ``x * cos + swap(x) * signed_sin``, where ``swap``
        exchanges the two quarters of each half (one flip). Three kernels per call instead of the seven of
        chunks, negations and concatenations; the attention blocks call it twice per block and step."""
        in_dtype = x.dtype
        xc = x.to(cos.dtype)
        q = xc.shape[-1] // 4
        swapped = xc.unflatten(-1, (2, 2, q)).flip(-2).flatten(-3)
        return torch.addcmul(xc * cos, swapped, signed_sin).to(in_dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [..., N, head_dim]`` with tables broadcastable to it; each half rotates on its own."""
        in_dtype = x.dtype
        xc = x.to(cos.dtype)
        y_part, x_part = xc.chunk(2, dim=-1)
        rotated = torch.cat([rotate_half(y_part), rotate_half(x_part)], dim=-1)
        out = xc * cos + rotated * sin
        return out.to(in_dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Reference-style call: ``tokens [B, heads, N, D]``, ``positions [B, N, 2]`` int64."""
        cos, sin = self.tables(positions, tokens.shape[-1], tokens.dtype)
        return self.apply(tokens, cos[:, None], sin[:, None])
