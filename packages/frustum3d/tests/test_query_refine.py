"""QueryRefiner: the masked cross-attention against a float64 loop over queries and heads; identity at first."""

from __future__ import annotations

import math

import torch
from frustum3d.query_refine import QueryRefineLayer, QueryRefiner, masked_attention_mask


def _randomised(layer: QueryRefineLayer, seed: int = 0) -> QueryRefineLayer:
    """A layer with every weight random (its zero-started projections too), so each part shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return layer


def test_mask_lets_a_query_attend_inside_its_mask_or_everywhere_when_it_is_empty():
    logits = torch.tensor([[1.0, -1.0, -2.0], [-0.5, 2.0, -1.0], [0.0, 3.0, -4.0], [2.0, -1.0, -0.1]])  # [N=4, Q=3]
    allowed = masked_attention_mask(logits)
    assert allowed.shape == (3, 4)
    for q in range(3):
        inside = [bool(logits[n, q] > 0) for n in range(4)]
        want = inside if any(inside) else [True] * 4  # 0 is not inside; query 2 has no positive voxel
        assert allowed[q].tolist() == want, q


def test_layer_matches_a_loop_over_queries_and_heads_in_float64():
    torch.manual_seed(0)
    dim, cdim, heads, nq, nv = 8, 6, 2, 5, 9
    layer = _randomised(QueryRefineLayer(dim, cdim, heads)).double()
    queries, feats = torch.randn(nq, dim, dtype=torch.float64), torch.randn(nv, cdim, dtype=torch.float64)
    allowed = masked_attention_mask(torch.randn(nv, nq, dtype=torch.float64))
    got = layer(queries, feats, allowed)

    def ln(x, norm):
        return (x - x.mean()) / math.sqrt(float(x.var(unbiased=False)) + norm.eps) * norm.weight + norm.bias

    d = dim // heads
    want = torch.empty_like(queries)
    for i in range(nq):
        q = layer.to_q(ln(queries[i], layer.norm_q))
        heads_out = []
        for h in range(heads):
            scores, values = [], []
            for n in range(nv):
                if allowed[i, n]:
                    kv = layer.to_kv(ln(feats[n], layer.norm_v))
                    k, v = kv[:dim], kv[dim:]
                    scores.append(float(q[h * d:(h + 1) * d] @ k[h * d:(h + 1) * d]) / math.sqrt(d))
                    values.append(v[h * d:(h + 1) * d])
            w = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
            heads_out.append(sum(wj * vj for wj, vj in zip(w, values, strict=True)))
        x = queries[i] + layer.out(torch.cat(heads_out))
        want[i] = x + layer.mlp(ln(x, layer.norm_mlp))
    assert torch.allclose(got, want, atol=1e-10), (got - want).abs().max()


def test_refiner_starts_as_the_identity_and_refines_each_batch_item_from_its_own_voxels():
    torch.manual_seed(1)
    refiner = QueryRefiner(16, 6, layers=2)
    queries = torch.randn(3, 4, 16)
    feats, rows = torch.randn(10, 6), [(0, 6), (6, 6), (6, 10)]  # items 0 and 2 have voxels, item 1 none
    logits = torch.randn(10, 4)
    assert torch.equal(refiner(queries, feats, rows, logits), queries)  # zero-started residual branches
    for layer in refiner.layers:
        _randomised(layer, seed=2)
    out = refiner(queries, feats, rows, logits)
    assert torch.equal(out[1], queries[1])  # batch item 1 has no voxels: its queries stay as they are
    assert not torch.allclose(out[0], queries[0]) and not torch.allclose(out[2], queries[2])
    alone = refiner(queries[2:], feats[6:], [(0, 4)], logits[6:])
    assert torch.allclose(out[2], alone[0], atol=1e-6)  # item 2 reads only its own voxels
