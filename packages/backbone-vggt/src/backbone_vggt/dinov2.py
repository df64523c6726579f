"""DINOv2 vision transformer with register tokens, as used for VGGT's patch embedding.

Token order inside the ViT is ``[cls, registers, patches]``. The learned position table covers the class slot
and a square ``img_size/patch`` grid; for other input sizes its grid part is resampled in float32 with
bicubic + antialias interpolation to the input's patch grid (class slot kept apart). Registers get no
position. Everything uses LayerNorm eps 1e-6 and LayerScale (``init_values`` 1.0 in VGGT).

``dinov2_vits14_reg`` / ``vitb14_reg`` / ``vitl14_reg`` / ``vitg2_reg`` name the standard widths; VGGT-1B uses
ViT-L/14 with 4 registers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import BackboneInputError, ConfigError
from .layers import Block

# width, depth, heads of the standard DINOv2 sizes (all with mlp ratio 4 and a plain GELU MLP here)
DINOV2_SIZES: dict[str, tuple[int, int, int]] = {
    "dinov2_vits14_reg": (384, 12, 6),
    "dinov2_vitb14_reg": (768, 12, 12),
    "dinov2_vitl14_reg": (1024, 24, 16),
    "dinov2_vitg2_reg": (1536, 40, 24),
}


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: conv with kernel = stride = patch size, output ``[B, h*w, C]``."""

    def __init__(self, img_size: int = 518, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 1024) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_size(x, self.patch_size, self.in_chans)
        return self.proj(x).flatten(2).transpose(1, 2)


def check_image_size(x: torch.Tensor, patch_size: int, channels: int = 3) -> None:
    """Raise ``BackboneInputError`` unless ``x`` is ``[N, channels, H, W]`` with H, W multiples of the patch."""
    if x.dim() != 4:
        raise BackboneInputError(f"expected images [N, {channels}, H, W], got shape {tuple(x.shape)}")
    _, c, h, w = x.shape
    if c != channels:
        raise BackboneInputError(f"expected {channels} image channels (RGB), got {c} in shape {tuple(x.shape)}")
    if h % patch_size or w % patch_size or h == 0 or w == 0:
        raise BackboneInputError(
            f"image size {h}x{w} is not a multiple of the patch size {patch_size}; resize or crop to e.g. "
            f"{max(patch_size, round(h / patch_size) * patch_size)}x{max(patch_size, round(w / patch_size) * patch_size)}"
        )


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT with registers; ``forward`` returns the dict of normalised class/register/patch tokens."""

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        init_values: float | None = 1.0,
        num_register_tokens: int = 4,
        interpolate_antialias: bool = True,
        interpolate_offset: float = 0.0,
        block_chunks: int = 0,
    ) -> None:
        super().__init__()
        if block_chunks != 0:
            raise ConfigError("block_chunks > 0 (chunked DINOv2 blocks) is not supported; VGGT uses 0")
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.gradient_checkpointing = True
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.blocks = nn.ModuleList(
            [
                Block(
                    embed_dim, num_heads, mlp_ratio, qkv_bias, proj_bias, ffn_bias,
                    init_values=init_values, norm_eps=1e-6,
                )
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        # present in the checkpoint (masked-image pretraining); unused at inference
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim), requires_grad=False)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self._frozen_pos: dict[tuple[int, int], torch.Tensor] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int, dtype: torch.dtype) -> torch.Tensor:
        """Position table ``[1, 1 + grid_h*grid_w, C]`` for a ``grid_h x grid_w`` patch grid.

        The stored table is used as is for its own square grid; otherwise its grid part is resampled
        (float32, bicubic, antialias as configured) and cast to ``dtype``. Cached per grid when no gradient
        flows into the table (inference), keyed on the parameter's storage and version.
        """
        table = self.pos_embed
        side = int(math.sqrt(table.shape[1] - 1))
        if grid_h == side and grid_w == side:
            return table
        frozen = self._frozen_pos.get((int(grid_h), int(grid_w)))  # int(): sizes are tensors under tracing
        if frozen is not None:
            return frozen.to(dtype)
        cacheable = not (torch.is_grad_enabled() and table.requires_grad) and table.device.type != "meta"
        key = (grid_h, grid_w, dtype, table.device, table.data_ptr(), table._version)
        if cacheable and key in self._pos_cache:
            return self._pos_cache[key]
        table32 = table.float()
        cls_pos = table32[:, :1]
        grid = table32[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            scale = ((grid_h + self.interpolate_offset) / side, (grid_w + self.interpolate_offset) / side)
            resized = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=self.interpolate_antialias)
        else:
            resized = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", antialias=self.interpolate_antialias)
        resized = resized.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        out = torch.cat([cls_pos, resized], dim=1).to(dtype)
        if cacheable:
            self._pos_cache.clear()  # keep only the latest size: the table is small but weights may change
            self._pos_cache[key] = out
        return out

    @torch.no_grad()
    def freeze_pos_encoding(self, grid_h: int, grid_w: int) -> None:
        """Compute the ``grid_h x grid_w`` position table now and use it as a constant from then on.

        For graph export at a fixed input size: ONNX has no antialiased bicubic resize, so the resampled
        table enters the graph as a constant instead of an op. Call :meth:`unfreeze_pos_encoding` (or
        change the weights and call this again) to go back.
        """
        self._frozen_pos.pop((grid_h, grid_w), None)
        self._frozen_pos[(grid_h, grid_w)] = self.interpolate_pos_encoding(grid_h, grid_w, torch.float32).detach().clone()

    def unfreeze_pos_encoding(self) -> None:
        """Forget the tables fixed by :meth:`freeze_pos_encoding`."""
        self._frozen_pos.clear()

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch-embed, prepend the class token, add positions, then insert the registers after the class."""
        _, _, h, w = x.shape
        batch = x.shape[0]
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(h // self.patch_size, w // self.patch_size, tokens.dtype)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(batch, -1, -1)
            tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
        return tokens

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the ViT; returns normalised class, register and patch tokens plus the pre-norm tokens."""
        check_image_size(x, self.patch_size, self.patch_embed.in_chans)
        tokens = self.prepare_tokens(x)
        for blk in self.blocks:
            if self.training and self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(blk, tokens, use_reentrant=False)
            else:
                tokens = blk(tokens)
        normed = self.norm(tokens)
        first_patch = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1:first_patch],
            "x_norm_patchtokens": normed[:, first_patch:],
            "x_prenorm": tokens,
        }

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_features(x)


def build_dinov2(name: str, img_size: int = 518, patch_size: int = 14, num_register_tokens: int = 4,
                 **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT by hub-style name (``dinov2_vitl14_reg`` ...), configured like VGGT's patch embed."""
    if name not in DINOV2_SIZES:
        raise ConfigError(f"unknown DINOv2 patch embed {name!r}; choose one of {sorted(DINOV2_SIZES)} or 'conv'")
    width, depth, heads = DINOV2_SIZES[name]
    options = dict(interpolate_antialias=True, interpolate_offset=0.0, block_chunks=0, init_values=1.0)
    options.update(kwargs)
    return DinoVisionTransformer(
        img_size=img_size, patch_size=patch_size, embed_dim=width, depth=depth, num_heads=heads,
        mlp_ratio=4.0, num_register_tokens=num_register_tokens, **options,
    )
