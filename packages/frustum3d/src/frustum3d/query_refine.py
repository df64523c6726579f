"""``QueryRefiner``: the 2D queries refined by masked cross-attention onto the reconstructed level-64 voxels.

The decoder labels a voxel by dot products of its features with the *2D* query embeddings (projected per level).
Those embeddings describe what the image shows of an instance; a part the image does not show (occluded, or
behind the visible surface) has voxel features that the 2D query was never fitted to, so the stuff queries
around it win the voxel. Here each query first reads the 3D features of the voxels its own level-64 mask already
covers (Mask2Former's masked attention: a query attends only to voxels where its mask logit is positive, or to
every voxel when its mask is empty), so the finer levels' masks come from an embedding that has seen the
instance's reconstructed extent.

Not in the toolkit (``model.frustum3d.query_refine_layers``; 0 = off). Every layer is a pre-norm residual
cross-attention + MLP whose output projections start at zero, so a new refiner returns its input queries and a
decoder with it starts as the reference does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["QueryRefiner", "QueryRefineLayer", "masked_attention_mask"]


def masked_attention_mask(mask_logits: Tensor) -> Tensor:
    """``[N, Q]`` mask logits at the voxels -> bool ``[Q, N]``: True where a query may attend (its mask logit is
    positive); a query whose mask is empty attends to every voxel (else its softmax has no entries)."""
    allowed = (mask_logits > 0).T
    return allowed | ~allowed.any(dim=1, keepdim=True)


class QueryRefineLayer(nn.Module):
    """One pre-norm residual step: masked cross-attention of the queries onto voxel features, then an MLP."""

    def __init__(self, query_dim: int, voxel_dim: int, num_heads: int) -> None:
        super().__init__()
        if query_dim % num_heads:
            raise ValueError(f"query_dim {query_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = int(num_heads)
        self.norm_q = nn.LayerNorm(query_dim)
        self.norm_v = nn.LayerNorm(voxel_dim)
        self.to_q = nn.Linear(query_dim, query_dim)
        self.to_kv = nn.Linear(voxel_dim, 2 * query_dim)
        self.out = nn.Linear(query_dim, query_dim)
        self.norm_mlp = nn.LayerNorm(query_dim)
        self.mlp = nn.Sequential(nn.Linear(query_dim, 2 * query_dim), nn.GELU(), nn.Linear(2 * query_dim, query_dim))
        for last in (self.out, self.mlp[2]):  # residual branches start at zero: the layer begins as the identity
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, queries: Tensor, voxel_feats: Tensor, allowed: Tensor) -> Tensor:
        """``queries`` ``[Q, D]`` of one batch item, ``voxel_feats`` ``[N, C]`` its voxels, ``allowed`` bool
        ``[Q, N]`` (:func:`masked_attention_mask`) -> refined ``[Q, D]``."""
        q_len, dim = queries.shape
        h = self.num_heads
        q = self.to_q(self.norm_q(queries)).view(q_len, h, dim // h).transpose(0, 1)  # [H, Q, d]
        k, v = self.to_kv(self.norm_v(voxel_feats)).view(-1, 2, h, dim // h).permute(1, 2, 0, 3)  # [H, N, d] each
        attended = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=allowed[None])
        queries = queries + self.out(attended.transpose(0, 1).reshape(q_len, dim))
        return queries + self.mlp(self.norm_mlp(queries))


class QueryRefiner(nn.Module):
    """``layers`` :class:`QueryRefineLayer` steps; the attention masks come from the level-64 mask logits.

    Args:
        query_dim: width of the 2D query embeddings.
        voxel_dim: channels of the level-64 voxel features (the decoder's ``4 f``).
        layers: number of refinement steps (>= 1).
        num_heads: attention heads (8, or 1 when ``query_dim`` is not a multiple of 8).
    """

    def __init__(self, query_dim: int, voxel_dim: int, layers: int = 1, num_heads: int | None = None) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"a QueryRefiner needs at least one layer, got {layers}")
        heads = num_heads if num_heads is not None else (8 if query_dim % 8 == 0 else 1)
        self.layers = nn.ModuleList(QueryRefineLayer(query_dim, voxel_dim, heads) for _ in range(layers))

    def forward(self, queries: Tensor, voxel_feats: Tensor, row_ranges: Sequence[tuple[int, int]],
                mask_logits: Tensor) -> Tensor:
        """Args:
            queries: ``[B, Q, D]`` the 2D query embeddings.
            voxel_feats: ``[N, C]`` features of the kept level-64 voxels of every batch item, sorted by batch item.
            row_ranges: each batch item's rows ``[start, end)`` (:func:`frustum3d.losses.batch_row_ranges`): slices,
                not boolean row masks, whose backward scatters a full-size copy.
            mask_logits: ``[N, Q]`` each query's level-64 mask logit at those voxels.

        Returns ``[B, Q, D]``; a batch item without voxels keeps its queries.
        """
        refined = []
        for b in range(queries.shape[0]):
            start, end = row_ranges[b] if b < len(row_ranges) else (0, 0)
            q = queries[b]
            if end > start:
                feats, allowed = voxel_feats[start:end], masked_attention_mask(mask_logits[start:end])
                for layer in self.layers:
                    q = layer(q, feats, allowed)
            refined.append(q)
        return torch.stack(refined)
