"""ViT-token to multi-scale feature-map bridge (the toolkit's ``DPTHead2PixelDecoder``).

Four backbone layers of patch tokens ``[B, S, P, C']`` become res2..res5 maps at strides
4/8/16/32 of the backbone input: shared LayerNorm, per-layer 1x1 projection, + 0.1 x the UV
sine/cosine embedding (the VGGT DPT convention), then a resize (ConvTranspose x4, x2,
identity, 3x3 conv stride 2) and a 1x1 conv to the configured channels. Frames are folded
into the batch (``B*S``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

RES_NAMES = ("res2", "res3", "res4", "res5")


def uv_grid(width: int, height: int, aspect_ratio: float, dtype=None, device=None) -> torch.Tensor:
    """``[H, W, 2]`` (x, y) grid spanning +-aspect/diag in x and +-1/diag in y, shrunk by (n-1)/n."""
    diag = (aspect_ratio**2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diag, 1.0 / diag
    xs = torch.linspace(-span_x * (width - 1) / width, span_x * (width - 1) / width, width, dtype=dtype, device=device)
    ys = torch.linspace(-span_y * (height - 1) / height, span_y * (height - 1) / height, height, dtype=dtype,
                        device=device)
    u, v = torch.meshgrid(xs, ys, indexing="xy")
    return torch.stack((u, v), dim=-1)


def _sincos(pos: torch.Tensor, dim: int, omega_0: float) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / omega_0**omega
    angles = pos.reshape(-1).to(torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def uv_embedding(grid: torch.Tensor, dim: int, omega_0: float = 100.0) -> torch.Tensor:
    """Sine/cosine embedding ``[H, W, dim]`` = cat(emb(x), emb(y)), angles in float64."""
    h, w, _ = grid.shape
    flat = grid.reshape(-1, 2)
    emb = torch.cat([_sincos(flat[:, 0], dim // 2, omega_0), _sincos(flat[:, 1], dim // 2, omega_0)], dim=-1)
    return emb.view(h, w, dim)


class ViTFeatureAdapter(nn.Module):
    """Backbone tokens -> ``{"res2", "res3", "res4", "res5"}`` feature maps.

    Args:
        dim_in: token width C' (2048 for VGGT: frame and global attention concatenated).
        out_channels: channels of res2..res5 (toolkit: 256, 512, 1024, 2048).
        pos_embed: add the 0.1-scaled UV embedding after the projection.
    """

    def __init__(
        self, dim_in: int, out_channels: Sequence[int] = (256, 512, 1024, 2048), pos_embed: bool = True
    ) -> None:
        super().__init__()
        if len(out_channels) != 4:
            raise ValueError(f"out_channels needs 4 entries (res2..res5), got {list(out_channels)}")
        self.dim_in = dim_in
        self.out_channels = list(out_channels)
        self.pos_embed = pos_embed
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, dim_in, kernel_size=1) for _ in range(4))
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(dim_in, dim_in, kernel_size=4, stride=4, padding=0),
                nn.ConvTranspose2d(dim_in, dim_in, kernel_size=2, stride=2, padding=0),
                nn.Identity(),
                nn.Conv2d(dim_in, dim_in, kernel_size=3, stride=2, padding=1),
            ]
        )
        self.unify_layers = nn.ModuleList(nn.Conv2d(dim_in, c, kernel_size=1) for c in out_channels)
        self._pos_cache: dict[tuple, torch.Tensor] = {}  # scaled position embeddings (_add_pos)

    def _add_pos(self, x: torch.Tensor, aspect_ratio: float, ratio: float = 0.1) -> torch.Tensor:
        # depends on sizes, dtype and device only: built once per key instead of about 40 kernels per level and
        # forward (the small networks' steps are bound by kernel launches); no gradient flows into it
        key = (tuple(x.shape[1:]), aspect_ratio, ratio, x.dtype, x.device)
        emb = self._pos_cache.get(key)
        if emb is None:
            h, w = x.shape[-2:]
            with torch.no_grad():
                grid = uv_grid(w, h, aspect_ratio, dtype=x.dtype, device=x.device)
                emb = (uv_embedding(grid, x.shape[1]).to(x.dtype) * ratio).permute(2, 0, 1)
            if len(self._pos_cache) >= 8:  # a few sizes at a time (inference on mixed sizes): drop the oldest
                self._pos_cache.pop(next(iter(self._pos_cache)))
            self._pos_cache[key] = emb
        return x + emb[None]

    def forward(
        self, tokens: Sequence[torch.Tensor], patch_grid: tuple[int, int], patch_start_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        """``tokens``: 4 tensors ``[B, S, N, C']`` (N = patch_start_idx + h*w, patches row-major);
        ``patch_grid`` = (h, w). Returns maps ``[B*S, C_l, H_l, W_l]``: res2 (4h, 4w), res3
        (2h, 2w), res4 (h, w), res5 (ceil(h/2), ceil(w/2))."""
        if len(tokens) != 4:
            raise ValueError(f"ViTFeatureAdapter expects 4 token layers, got {len(tokens)}")
        ph, pw = patch_grid
        aspect = pw / ph  # the image aspect ratio W/H (patches are square)
        feats = {}
        for i, layer in enumerate(tokens):
            if layer.ndim != 4 or layer.shape[-1] != self.dim_in:
                raise ValueError(f"token layer {i}: expected [B, S, N, {self.dim_in}], got {tuple(layer.shape)}")
            x = layer[:, :, patch_start_idx:]
            if x.shape[2] != ph * pw:
                raise ValueError(f"token layer {i}: {x.shape[2]} patch tokens, patch_grid {patch_grid} needs {ph * pw}")
            x = self.norm(x.reshape(-1, ph * pw, self.dim_in))
            x = x.permute(0, 2, 1).reshape(x.shape[0], self.dim_in, ph, pw)
            x = self.projects[i](x)
            if self.pos_embed:
                x = self._add_pos(x, aspect)
            feats[RES_NAMES[i]] = resize_then_unify(x, self.resize_layers[i], self.unify_layers[i])
        return feats


def _is_patch_upsampler(m: nn.Module) -> bool:
    """A transposed convolution whose kernel equals its stride (no overlap, no padding): each input pixel
    writes its own ``k x k`` output block, so the layer is one matrix product per input pixel."""
    return (isinstance(m, nn.ConvTranspose2d) and m.kernel_size == m.stride and m.padding == (0, 0)
            and m.output_padding == (0, 0) and m.dilation == (1, 1) and m.groups == 1)


def _is_pointwise(m: nn.Module) -> bool:
    """A 1x1 convolution that keeps the map's size (no stride, no padding): a matrix product per pixel."""
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0)
            and m.groups == 1)


def resize_then_unify(x: torch.Tensor, resize: nn.Module, unify: nn.Module) -> torch.Tensor:
    """``unify(resize(x))``, computed without the wide intermediate map where both layers are linear and
    compose.

    The res2 / res3 branches upsample ``dim_in`` channels x4 / x2 with a transposed convolution, then a 1x1
    convolution narrows them to the level's channels. Both are linear, so the pair is one transposed convolution
    ``dim_in -> C_l`` whose weight is their product: the upsampled ``dim_in``-wide map is never built. It has the
    same parameters (checkpoints unchanged) and the same values up to float rounding. The non-overlapping
    transposed convolution runs as one matrix product and a pixel shuffle: a CPU's transposed convolution was the
    slowest part of the tiny preset's 2D training step (the adapter's fwd+bwd 40.7 -> 24.7 ms on one CPU thread,
    stop 41; docs/speed.md).
    """
    if not (_is_patch_upsampler(resize) and _is_pointwise(unify)):
        return unify(resize(x))
    u = unify.weight[:, :, 0, 0]  # [C_l, dim_in]
    kh, kw = resize.kernel_size
    w = torch.einsum("imhw,om->iohw", resize.weight, u)  # [dim_in, C_l, kh, kw]
    bias = None
    if resize.bias is not None:
        bias = u @ resize.bias
    if unify.bias is not None:
        bias = unify.bias if bias is None else bias + unify.bias
    b, c, h, wd = x.shape
    c_out = w.shape[1]
    y = x.permute(0, 2, 3, 1).reshape(b * h * wd, c) @ w.reshape(c, c_out * kh * kw)
    y = y.view(b, h, wd, c_out, kh, kw).permute(0, 3, 1, 4, 2, 5).reshape(b, c_out, h * kh, wd * kw)
    return y if bias is None else y + bias.view(1, c_out, 1, 1)
