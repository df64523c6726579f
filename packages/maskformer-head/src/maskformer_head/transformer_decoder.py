"""Masked-attention query decoders: Mask2Former's and the depth-aware (Uni-3D / NVPanoptix3D) one.

Both keep ``num_queries`` learnable queries (content ``query_feat`` + position ``query_embed``)
and, for every layer ``i``, attend to feature level ``i % 3`` (1/32, 1/16, 1/8). Attention is
restricted to the foreground of the previous layer's mask prediction (bilinearly resized to
that level, sigmoid < 0.5 = blocked; rows blocked everywhere are reopened). Layout is
sequence-first ``[L, B, C]`` with ``nn.MultiheadAttention`` so weights load key for key.

``dec_layers`` is the number of layers *built* (a config's DEC_LAYERS minus one): the decoder
makes ``dec_layers + 1`` predictions and returns the first ``dec_layers`` as ``aux_outputs``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP, PositionEmbeddingSine, c2_xavier_fill, xavier_fill_matrices


class SelfAttentionLayer(nn.Module):
    """Query self-attention; positions on q and k only; post-norm unless ``normalize_before``."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        xavier_fill_matrices(self)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        qk = x if query_pos is None else x + query_pos
        out = tgt + self.dropout(self.self_attn(qk, qk, value=x, need_weights=False)[0])
        return out if self.normalize_before else self.norm(out)


class CrossAttentionLayer(nn.Module):
    """Query-to-memory attention; memory positions on keys, query positions on queries."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        xavier_fill_matrices(self)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``memory_mask`` is boolean ``[B*heads, Q, HW]`` with True = may not attend."""
        x = self.norm(tgt) if self.normalize_before else tgt
        q = x if query_pos is None else x + query_pos
        k = memory if pos is None else memory + pos
        attn = self.multihead_attn(q, k, value=memory, attn_mask=memory_mask, need_weights=False)[0]
        out = tgt + self.dropout(attn)
        return out if self.normalize_before else self.norm(out)


class FFNLayer(nn.Module):
    """Two-layer ReLU feed-forward block with a residual connection."""

    def __init__(
        self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.0, normalize_before: bool = False
    ) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        xavier_fill_matrices(self)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        out = tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return out if self.normalize_before else self.norm(out)


def _input_projections(n: int, in_channels: int, hidden_dim: int, enforce: bool) -> nn.ModuleList:
    """Per-level 1x1 projections, or key-less identities when channels already match."""
    projs = nn.ModuleList()
    for _ in range(n):
        if in_channels != hidden_dim or enforce:
            conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
            c2_xavier_fill(conv)
            projs.append(conv)
        else:
            projs.append(nn.Sequential())
    return projs


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Mask2Former's masked-attention decoder (reference constructor arguments).

    ``forward(x, mask_features)`` with ``x`` = 3 maps ``[B, in_channels, H_l, W_l]``
    (1/32, 1/16, 1/8) and ``mask_features [B, mask_dim, H, W]`` returns ``pred_logits
    [B, Q, K+1]``, ``pred_masks [B, Q, H, W]``, ``aux_outputs`` (``dec_layers`` dicts) and
    ``segm_decoder_out`` = the final LayerNorm-ed query embeddings ``[B, Q, hidden_dim]``.
    """

    num_feature_levels = 3

    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
    ) -> None:
        super().__init__()
        if not mask_classification:
            raise ValueError("mask_classification=False is not supported (the reference heads always classify)")
        if hidden_dim % nheads != 0:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by nheads ({nheads})")
        self.mask_classification = True
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.num_classes = num_classes
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, 0.0, pre_norm) for _ in range(dec_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, 0.0, pre_norm) for _ in range(dec_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, 0.0, pre_norm) for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = _input_projections(self.num_feature_levels, in_channels, hidden_dim, enforce_input_project)
        self.hidden_dim = hidden_dim
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    # -- shared pieces -------------------------------------------------------------------
    def _memory(self, feats: Sequence[torch.Tensor], projs: nn.ModuleList, level_embed: nn.Embedding):
        """Flatten each level to ``[HW, B, C]`` after projection + level embedding."""
        return [
            (projs[i](feats[i]).flatten(2) + level_embed.weight[i][None, :, None]).permute(2, 0, 1)
            for i in range(self.num_feature_levels)
        ]

    def _positions(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.pe_layer(f).flatten(2).permute(2, 0, 1) for f in feats]

    def forward_prediction_heads(self, output: torch.Tensor, mask_features: torch.Tensor, target_size):
        """Class logits, mask logits, next attention mask and normalised queries."""
        decoder_output = self.decoder_norm(output).transpose(0, 1)
        outputs_class = self.class_embed(decoder_output)
        mask_embed = self.mask_embed(decoder_output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        attn_mask = F.interpolate(outputs_mask, size=target_size, mode="bilinear", align_corners=False)
        attn_mask = attn_mask.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1) < 0.5
        return outputs_class, outputs_mask, attn_mask.detach(), decoder_output

    def _check_levels(self, x: Sequence[torch.Tensor]) -> None:
        if len(x) != self.num_feature_levels:
            raise ValueError(f"decoder expects {self.num_feature_levels} feature levels, got {len(x)}")

    @staticmethod
    def _open_blocked_rows(attn_mask: torch.Tensor) -> torch.Tensor:
        """Rows where every key is blocked would give NaNs: let them attend everywhere."""
        full = attn_mask.all(-1, keepdim=True)
        return attn_mask & ~full

    def _pack(self, classes, masks, decoder_out, **extra) -> dict:
        out = {
            "pred_logits": classes[-1],
            "pred_masks": masks[-1],
            "aux_outputs": [{"pred_logits": a, "pred_masks": b} for a, b in zip(classes[:-1], masks[:-1])],
            "segm_decoder_out": decoder_out,
        }
        out.update(extra)
        return out

    def forward(self, x: Sequence[torch.Tensor], mask_features: torch.Tensor, mask=None) -> dict:
        self._check_levels(x)
        size_list = [f.shape[-2:] for f in x]
        pos = self._positions(x)
        src = self._memory(x, self.input_proj, self.level_embed)
        bs = src[0].shape[1]
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
        cls, msk, attn_mask, dec = self.forward_prediction_heads(output, mask_features, size_list[0])
        classes, masks = [cls], [msk]
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            attn_mask = self._open_blocked_rows(attn_mask)
            output = self.transformer_cross_attention_layers[i](
                output, src[level], memory_mask=attn_mask, pos=pos[level], query_pos=query_pos
            )
            output = self.transformer_self_attention_layers[i](output, query_pos=query_pos)
            output = self.transformer_ffn_layers[i](output)
            cls, msk, attn_mask, dec = self.forward_prediction_heads(
                output, mask_features, size_list[(i + 1) % self.num_feature_levels]
            )
            classes.append(cls)
            masks.append(msk)
        return self._pack(classes, masks, dec)


class DepthAwareMultiScaleMaskedTransformerDecoder(MultiScaleMaskedTransformerDecoder):
    """The NVPanoptix3D / Uni-3D decoder: each layer adds a masked cross-attention to the
    depth features aligned with the current level (own level embedding and input projection),
    between the image cross-attention and the self-attention.

    ``forward(x, multi_scale_depth_features, mask_features, depth_features=None)``; the output
    dict additionally carries ``mask_features``, ``depth_features`` and ``enc_features`` (= x).

    ``keep_reference_unused=True`` also builds the modules the toolkit builds but never calls
    (``cross_transformer_attention_layers``, ``depth_decoder_norm``, ``depth_embed``) so that a
    toolkit checkpoint loads strictly; they receive no gradient (use
    ``find_unused_parameters=True`` under DDP, or pass False when not loading toolkit weights).
    """

    def __init__(self, in_channels: int, mask_classification: bool = True, *, keep_reference_unused: bool = True,
                 **kwargs) -> None:
        super().__init__(in_channels, mask_classification, **kwargs)
        hidden_dim = kwargs["hidden_dim"]
        nheads = kwargs["nheads"]
        pre_norm = kwargs["pre_norm"]
        self.depth_transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, 0.0, pre_norm) for _ in range(self.num_layers)
        )
        self.depth_level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.depth_input_proj = _input_projections(
            self.num_feature_levels, in_channels, hidden_dim, kwargs["enforce_input_project"]
        )
        self.keep_reference_unused = keep_reference_unused
        if keep_reference_unused:
            self.cross_transformer_attention_layers = nn.ModuleList(
                SelfAttentionLayer(hidden_dim, nheads, 0.0, pre_norm) for _ in range(self.num_layers)
            )
            self.depth_decoder_norm = nn.LayerNorm(hidden_dim)
            self.depth_embed = MLP(hidden_dim, hidden_dim, kwargs["mask_dim"], 3)

    def forward(  # type: ignore[override]
        self,
        x: Sequence[torch.Tensor],
        multi_scale_depth_features: Sequence[torch.Tensor],
        mask_features: torch.Tensor,
        depth_features: torch.Tensor | None = None,
        mask=None,
    ) -> dict:
        self._check_levels(x)
        self._check_levels(multi_scale_depth_features)
        for f, d in zip(x, multi_scale_depth_features):
            if f.shape[-2:] != d.shape[-2:]:
                raise ValueError(f"depth feature level {tuple(d.shape[-2:])} != image level {tuple(f.shape[-2:])}")
        size_list = [f.shape[-2:] for f in x]
        pos = self._positions(x)
        src = self._memory(x, self.input_proj, self.level_embed)
        depth_src = self._memory(multi_scale_depth_features, self.depth_input_proj, self.depth_level_embed)
        bs = src[0].shape[1]
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
        cls, msk, attn_mask, dec = self.forward_prediction_heads(output, mask_features, size_list[0])
        classes, masks = [cls], [msk]
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            attn_mask = self._open_blocked_rows(attn_mask)
            output = self.transformer_cross_attention_layers[i](
                output, src[level], memory_mask=attn_mask, pos=pos[level], query_pos=query_pos
            )
            output = self.depth_transformer_cross_attention_layers[i](
                output, depth_src[level], memory_mask=attn_mask, pos=pos[level], query_pos=query_pos
            )
            output = self.transformer_self_attention_layers[i](output, query_pos=query_pos)
            output = self.transformer_ffn_layers[i](output)
            cls, msk, attn_mask, dec = self.forward_prediction_heads(
                output, mask_features, size_list[(i + 1) % self.num_feature_levels]
            )
            classes.append(cls)
            masks.append(msk)
        return self._pack(
            classes, masks, dec, mask_features=mask_features, depth_features=depth_features, enc_features=list(x)
        )
