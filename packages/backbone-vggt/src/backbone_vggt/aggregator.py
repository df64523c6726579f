"""VGGT's Aggregator: patch embedding, then alternating frame-wise and global attention over all frames.

Per frame the token sequence is ``[camera(1), registers(R), patches(h*w)]`` so ``patch_start_idx = 1 + R``.
The camera and register tokens each have two learned slots: slot 0 for the first frame of every sequence
(the reference frame), slot 1 for all other frames. Frame blocks attend within one frame (``[B*S, P, C]``),
global blocks across all frames of a sequence (``[B, S*P, C]``). Layer ``i`` outputs the concatenation of
frame-block ``i`` and global-block ``i`` tokens, ``[B, S, P, 2C]``; only the layers in
``cached_layer_indices`` (plus the last) are returned, the others are ``None``.

Images are RGB in [0, 1]; ImageNet mean/std normalisation happens here (non-persistent buffers).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .dinov2 import DINOV2_SIZES, PatchEmbed, build_dinov2, check_image_size
from .errors import BackboneInputError, ConfigError
from .layers import Block
from .rope import RotaryPositionEmbedding2D, patch_positions

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def expand_slot_tokens(token: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """``[1, 2, n, C]`` learned tokens -> ``[B*S, n, C]``: slot 0 for frame 0, slot 1 for frames 1..S-1."""
    first = token[:, 0:1].expand(batch, 1, *token.shape[2:])
    rest = token[:, 1:].expand(batch, frames - 1, *token.shape[2:])
    return torch.cat([first, rest], dim=1).reshape(batch * frames, *token.shape[2:])


class Aggregator(nn.Module):
    """Alternating-attention transformer over ``[B, S, 3, H, W]`` images (H, W multiples of ``patch_size``).

    ``forward`` returns ``(tokens_per_layer, patch_start_idx)``. Keyword arguments and parameter names
    follow the reference so the released checkpoint's ``aggregator.*`` keys load directly.
    """

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 4,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        patch_embed: str | nn.Module = "dinov2_vitl14_reg",
        aa_order: Sequence[str] = ("frame", "global"),
        aa_block_size: int = 1,
        qk_norm: bool = True,
        rope_freq: float = 100,
        init_values: float = 0.01,
        cached_layer_indices: Iterable[int] = (4, 11, 17, 23),
    ) -> None:
        super().__init__()
        aa_order = list(aa_order)
        if not aa_order or any(kind not in ("frame", "global") for kind in aa_order):
            raise ConfigError(f"aa_order must list 'frame' and/or 'global', got {aa_order}")
        if depth % aa_block_size:
            raise ConfigError(f"depth {depth} is not a multiple of aa_block_size {aa_block_size}")
        self.patch_embed = self._build_patch_embed(patch_embed, img_size, patch_size, num_register_tokens, embed_dim)
        self.rope = RotaryPositionEmbedding2D(frequency=rope_freq) if rope_freq > 0 else None
        blocks = dict(
            dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias,
            ffn_bias=ffn_bias, init_values=init_values, qk_norm=qk_norm, rope=self.rope,
        )
        self.frame_blocks = nn.ModuleList([Block(**blocks) for _ in range(depth)])
        self.global_blocks = nn.ModuleList([Block(**blocks) for _ in range(depth)])
        self.depth = depth
        self.embed_dim = embed_dim
        self.aa_order = aa_order
        self.patch_size = patch_size
        self.aa_block_size = aa_block_size
        self.aa_block_num = depth // aa_block_size
        self.cached_layer_indices = {int(i) for i in cached_layer_indices} | {depth - 1}
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, embed_dim))
        self.register_token = nn.Parameter(torch.zeros(1, 2, num_register_tokens, embed_dim))
        nn.init.normal_(self.camera_token, std=1e-6)
        nn.init.normal_(self.register_token, std=1e-6)
        self.patch_start_idx = 1 + num_register_tokens
        self.register_buffer("_resnet_mean", torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("_resnet_std", torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)
        # the reference always checkpoints blocks in training mode; switch off to trade memory for speed
        self.gradient_checkpointing = True

    def reset_image_stats(self, device: torch.device | str | None = None) -> None:
        """(Re)create the ImageNet mean/std buffers, e.g. after building on the meta device and loading with
        ``assign=True`` (non-persistent buffers are not in the checkpoint, so they stay on meta otherwise)."""
        device = self.camera_token.device if device is None else device
        self._resnet_mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 1, 3, 1, 1)
        self._resnet_std = torch.tensor(IMAGENET_STD, device=device).view(1, 1, 3, 1, 1)

    @staticmethod
    def _build_patch_embed(
        patch_embed: str | nn.Module, img_size: int, patch_size: int, num_register_tokens: int, embed_dim: int
    ) -> nn.Module:
        if isinstance(patch_embed, nn.Module):
            return patch_embed
        if not isinstance(patch_embed, str):
            raise ConfigError(f"patch_embed must be a name or an nn.Module, got {type(patch_embed).__name__}")
        if "conv" in patch_embed:
            return PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim)
        if patch_embed not in DINOV2_SIZES:
            raise ConfigError(f"unknown patch_embed {patch_embed!r}; use 'conv' or one of {sorted(DINOV2_SIZES)}")
        if DINOV2_SIZES[patch_embed][0] != embed_dim:
            raise ConfigError(
                f"patch_embed {patch_embed!r} has width {DINOV2_SIZES[patch_embed][0]} but embed_dim is {embed_dim}"
            )
        vit = build_dinov2(patch_embed, img_size=img_size, patch_size=patch_size,
                           num_register_tokens=num_register_tokens)
        vit.mask_token.requires_grad_(False)
        return vit

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 4:
            images = images.unsqueeze(0)
        if images.dim() != 5:
            raise BackboneInputError(f"expected images [B, S, 3, H, W] or [S, 3, H, W], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise BackboneInputError(
                f"expected float RGB images in [0, 1], got dtype {images.dtype}; convert with images.float() / 255"
            )
        check_image_size(images[0], self.patch_size)
        return images

    def rope_tables(self, grid_h: int, grid_w: int, frames: int, dtype: torch.dtype, device: torch.device):
        """cos and signed sin tables (:meth:`~backbone_vggt.rope.RotaryPositionEmbedding2D.rotate`'s) for one frame
        (``[P, head_dim]``) and for S frames in a row (``[S*P, head_dim]``)."""
        if self.rope is None:
            return None, None
        head_dim = self.frame_blocks[0].attn.head_dim
        pos = patch_positions(grid_h, grid_w, self.patch_start_idx, device=device)
        cos, sin = self.rope.tables(pos, head_dim, dtype, max_position=max(grid_h, grid_w) + 1)
        sin = self.rope.signed_sin(sin)
        return (cos, sin), (cos.repeat(frames, 1), sin.repeat(frames, 1))

    def _run_block(self, block: Block, tokens: torch.Tensor, rope) -> torch.Tensor:
        if self.training and self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, tokens, rope, use_reentrant=False)
        return block(tokens, rope=rope)

    def forward(
        self, images: torch.Tensor, cached_layer_indices: Iterable[int] | None = None
    ) -> tuple[list[torch.Tensor | None], int]:
        """``images`` [B, S, 3, H, W] in [0, 1] -> (list of ``depth`` entries [B, S, P, 2C] or None, patch_start_idx).

        ``cached_layer_indices`` overrides the constructor's choice for this call (the last layer is always kept).
        """
        images = self._check_images(images)
        cached = self.cached_layer_indices if cached_layer_indices is None else (
            {int(i) for i in cached_layer_indices} | {self.depth - 1})
        b, s, c, h, w = images.shape
        images = (images - self._resnet_mean) / self._resnet_std
        patch_tokens = self.patch_embed(images.reshape(b * s, c, h, w))
        if isinstance(patch_tokens, dict):
            patch_tokens = patch_tokens["x_norm_patchtokens"]
        camera = expand_slot_tokens(self.camera_token, b, s)
        registers = expand_slot_tokens(self.register_token, b, s)
        tokens = torch.cat([camera, registers, patch_tokens], dim=1)
        n_tok, dim = tokens.shape[1], tokens.shape[2]
        frame_rope, global_rope = self.rope_tables(h // self.patch_size, w // self.patch_size, s,
                                                   tokens.dtype, tokens.device)

        outputs: list[torch.Tensor | None] = []
        frame_idx = global_idx = 0
        for _ in range(self.aa_block_num):
            frame_inter: list[torch.Tensor] = []
            global_inter: list[torch.Tensor] = []
            for kind in self.aa_order:
                if kind == "frame":
                    tokens = tokens.reshape(b * s, n_tok, dim)
                    for _ in range(self.aa_block_size):
                        tokens = self._run_block(self.frame_blocks[frame_idx], tokens, frame_rope)
                        frame_idx += 1
                        frame_inter.append(tokens.view(b, s, n_tok, dim))
                else:
                    tokens = tokens.reshape(b, s * n_tok, dim)
                    for _ in range(self.aa_block_size):
                        tokens = self._run_block(self.global_blocks[global_idx], tokens, global_rope)
                        global_idx += 1
                        global_inter.append(tokens.view(b, s, n_tok, dim))
            for frame_out, global_out in zip(frame_inter, global_inter):
                layer = len(outputs)
                outputs.append(torch.cat([frame_out, global_out], dim=-1) if layer in cached else None)
        return outputs, self.patch_start_idx
