"""Aggregator parity with the reference goldens (conv patch embed and DINOv2 patch embed), fp32 and fp64."""

from __future__ import annotations

import pytest
import torch
from backbone_vggt import Aggregator, DinoVisionTransformer, load_pretrained, patch_positions
from torch.testing import assert_close

TOKEN_TOL = dict(rtol=1e-5, atol=5e-5)  # golden README, float32 tokens
FP64_TOL = dict(rtol=1e-10, atol=1e-10)  # all float32 casts of the reference are reproduced


def _conv_aggregator(case: dict, dtype=torch.float32) -> Aggregator:
    agg = Aggregator(**case["kwargs"])
    load_pretrained(agg, case["state_dict"], strict=True)
    return agg.to(dtype).eval()


def _dino_aggregator(case: dict, dtype=torch.float32) -> Aggregator:
    vit = DinoVisionTransformer(**case["patch_embed_kwargs"])
    agg = Aggregator(**dict(case["kwargs"], patch_embed=vit))
    load_pretrained(agg, case["state_dict"], strict=True)
    return agg.to(dtype).eval()


def _max_err(ours, ref) -> float:
    return max(float((a.double() - b.double()).abs().max()) for a, b in zip(ours, ref))


def test_rope_positions_match_reference(vggt_tiny):
    case = vggt_tiny["agg_conv"]
    h, w = (s // 14 for s in case["images"].shape[-2:])
    assert torch.equal(patch_positions(h, w, case["patch_start_idx"]), case["rope_positions"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_aggregator_matches_reference(vggt_tiny, dtype):
    case = vggt_tiny["agg_conv"]
    agg = _conv_aggregator(case, dtype)
    ref = case["out_fp32" if dtype == torch.float32 else "out_fp64"]
    tol = TOKEN_TOL if dtype == torch.float32 else FP64_TOL
    images = case["images"].to(dtype)
    with torch.no_grad():
        tokens, start = agg(images)
        normed = (images - agg._resnet_mean) / agg._resnet_std
        patch_tokens = agg.patch_embed(normed.flatten(0, 1))
    assert start == case["patch_start_idx"] == 5
    assert len(tokens) == 4 and all(t is not None for t in tokens)
    for ours, theirs in zip(tokens, ref["tokens"]):
        assert ours.dtype == dtype and ours.shape == theirs.shape == (1, 2, 40, 256)
        assert_close(ours, theirs, **tol)
    assert_close(patch_tokens, ref["patch_tokens"], **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dino_aggregator_matches_reference(vggt_tiny, dtype):
    case = vggt_tiny["agg_dino"]
    agg = _dino_aggregator(case, dtype)
    ref = case["out_fp32" if dtype == torch.float32 else "out_fp64"]
    tol = TOKEN_TOL if dtype == torch.float32 else FP64_TOL
    images = case["images"].to(dtype)
    with torch.no_grad():
        tokens, _ = agg(images)
        normed = (images - agg._resnet_mean) / agg._resnet_std
        patch_tokens = agg.patch_embed(normed.flatten(0, 1))["x_norm_patchtokens"]
    for ours, theirs in zip(tokens, ref["tokens"]):
        assert ours.shape == theirs.shape == (1, 2, 53, 128)
        assert_close(ours, theirs, **tol)
    assert_close(patch_tokens, ref["patch_tokens"], **tol)


def test_uncached_layers_are_none(vggt_tiny):
    case = vggt_tiny["agg_conv"]
    agg = Aggregator(**dict(case["kwargs"], cached_layer_indices=[1]))
    load_pretrained(agg, case["state_dict"])
    with torch.no_grad():
        tokens, _ = agg.eval()(case["images"])
        override, _ = agg(case["images"], cached_layer_indices=[0])
    assert tokens[0] is None and tokens[2] is None
    assert_close(tokens[1], case["out_fp32"]["tokens"][1], **TOKEN_TOL)
    assert_close(tokens[3], case["out_fp32"]["tokens"][3], **TOKEN_TOL)  # the last layer is always kept
    assert override[0] is not None and override[1] is None


def test_aggregator_accepts_unbatched_frames(vggt_tiny):
    case = vggt_tiny["agg_conv"]
    agg = _conv_aggregator(case)
    with torch.no_grad():
        tokens, _ = agg(case["images"][0])
    assert_close(tokens[-1], case["out_fp32"]["tokens"][-1], **TOKEN_TOL)


def test_attention_backends_agree(vggt_tiny):
    from backbone_vggt import set_attention_backend

    case = vggt_tiny["agg_dino"]
    agg = _dino_aggregator(case, torch.float64)
    set_attention_backend(agg, "math")
    with torch.no_grad():
        tokens, _ = agg(case["images"].double())
    for ours, theirs in zip(tokens, case["out_fp64"]["tokens"]):
        assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
