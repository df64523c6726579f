"""CUDA-only checks (skipped without a GPU): graph replay and xformers agree with eager SDPA."""

from __future__ import annotations

import pytest
import torch
from backbone_vggt import (
    BackboneInputError,
    GraphedAggregator,
    StaticGraph,
    build_aggregator,
    cache_low_precision_weights,
    load_pretrained,
    set_attention_backend,
    xformers_available,
)
from torch.testing import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture()
def cuda_agg(vggt_tiny):
    agg = build_aggregator("vggt_tiny")
    load_pretrained(agg, vggt_tiny["agg_conv"]["state_dict"])
    return agg.cuda().eval()


def test_fp32_parity_on_cuda(cuda_agg, vggt_tiny):
    with torch.no_grad():
        tokens, _ = cuda_agg(vggt_tiny["agg_conv"]["images"].cuda())
    for ours, ref in zip(tokens, vggt_tiny["agg_conv"]["out_fp32"]["tokens"]):
        assert_close(ours.cpu(), ref, rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_graph_replay_matches_eager(cuda_agg, vggt_tiny, amp):
    images = vggt_tiny["agg_conv"]["images"].cuda()
    if amp is not None:
        cache_low_precision_weights(cuda_agg, amp)
    ctx = torch.autocast("cuda", dtype=amp) if amp is not None else torch.autocast("cuda", enabled=False)
    with torch.no_grad(), ctx:
        eager, _ = cuda_agg(images)
    graphed = GraphedAggregator(cuda_agg, images, autocast_dtype=amp)
    replayed, start = graphed(images)
    assert start == 5
    for a, b in zip(eager, replayed):
        assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not xformers_available(), reason="xformers not installed")
def test_xformers_backend_matches_sdpa(cuda_agg, vggt_tiny):
    images = vggt_tiny["agg_conv"]["images"].cuda()
    with torch.no_grad():
        sdpa, _ = cuda_agg(images)
        set_attention_backend(cuda_agg, "xformers")
        xf, _ = cuda_agg(images)
    for a, b in zip(sdpa, xf):
        assert_close(a, b, rtol=1e-5, atol=5e-5)


def test_static_graph_replays_any_output_structure():
    torch.manual_seed(0)
    cuda_agg = build_aggregator("vggt_tiny").cuda().eval()  # random weights: no golden files needed
    images = torch.rand(1, 2, 3, 56, 70, device="cuda")
    layers = [0, 1]

    def fn(x):
        tokens, start = cuda_agg(x, cached_layer_indices=layers)
        return {"first": tokens[0], "start": start, "pair": (tokens[1] * 2, None)}

    with torch.no_grad():
        eager = fn(images)
    graphed = StaticGraph(fn, images)
    out = graphed(images)
    assert out["start"] == eager["start"] and out["pair"][1] is None
    assert_close(out["first"], eager["first"], rtol=0, atol=0)
    assert_close(out["pair"][0], eager["pair"][0], rtol=0, atol=0)
    assert graphed.matches(images) and not graphed.matches(images[:, :1])


def test_static_graph_of_several_inputs():
    # fn(*inputs) for a tuple example: each input is copied into its own static buffer before the replay
    a, mask = torch.randn(3, 4, device="cuda"), torch.rand(3, 4, device="cuda") > 0.5
    graphed = StaticGraph(lambda x, m: (x * 2).masked_fill(~m, 0.0), (a, mask))
    for _ in range(2):
        a, mask = torch.randn(3, 4, device="cuda"), torch.rand(3, 4, device="cuda") > 0.5
        assert torch.equal(graphed(a, mask), (a * 2).masked_fill(~mask, 0.0))
    assert graphed.matches(a, mask) and not graphed.matches(a) and not graphed.matches(a, mask.float())
    with pytest.raises(BackboneInputError, match="capture another graph"):
        graphed(a[:2], mask[:2])
