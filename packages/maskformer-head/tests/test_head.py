"""Depth-aware decoder wiring, adapter, depth projector, occupancy head, whole head, compat."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from maskformer_head import (
    DepthAwareMultiScaleMaskedTransformerDecoder,
    DepthProjector,
    HeadConfig,
    MultiPlaneOccupancyHead,
    ViTFeatureAdapter,
    build_head,
    compat,
)
from maskformer_head.adapter import resize_then_unify
from torch import nn
from torch.testing import assert_close


def _depth_aware_from_golden(golden):
    kw = dict(golden["predictor"]["kwargs"])
    m = DepthAwareMultiScaleMaskedTransformerDecoder(kw.pop("in_channels"), kw.pop("mask_classification"), **kw)
    missing, unexpected = m.load_state_dict(golden["predictor"]["state_dict"], strict=False)
    assert not unexpected
    assert all(k.startswith(("depth_", "cross_transformer_attention_layers")) for k in missing)
    return m.eval()


def test_depth_aware_decoder_reduces_to_mask2former_without_depth_attention(golden, monkeypatch):
    """Bypassing the depth cross-attention must give the reference decoder's outputs exactly."""
    m = _depth_aware_from_golden(golden)
    for layer in m.depth_transformer_cross_attention_layers:
        monkeypatch.setattr(layer, "forward", lambda tgt, *args, **kwargs: tgt)
    feats = golden["pixel_decoder"]["out"]
    with torch.no_grad():
        out = m(feats["multi_scale_features"], [torch.randn_like(f) for f in feats["multi_scale_features"]],
                feats["mask_features"])
    ref = golden["predictor"]["out_fp32"]
    assert_close(out["pred_logits"], ref["pred_logits"], rtol=1e-4, atol=1e-4)
    assert_close(out["pred_masks"], ref["pred_masks"], rtol=1e-4, atol=1e-4)
    for a, b in zip(out["aux_outputs"], ref["aux_outputs"]):
        assert_close(a["pred_masks"], b["pred_masks"], rtol=1e-4, atol=1e-4)


def test_depth_attention_uses_depth_memory_and_the_same_mask(golden):
    m = _depth_aware_from_golden(golden)
    seen = {}

    def grab(name):
        def hook(module, args, kwargs):
            seen.setdefault(name, []).append((args[1].clone(), kwargs["memory_mask"].clone()))
        return hook

    m.transformer_cross_attention_layers[1].register_forward_pre_hook(grab("img"), with_kwargs=True)
    m.depth_transformer_cross_attention_layers[1].register_forward_pre_hook(grab("depth"), with_kwargs=True)
    feats = golden["pixel_decoder"]["out"]
    depth = [torch.randn_like(f) for f in feats["multi_scale_features"]]
    with torch.no_grad():
        out1 = m(feats["multi_scale_features"], depth, feats["mask_features"])
        out2 = m(feats["multi_scale_features"], [d * 2 for d in depth], feats["mask_features"])
    (_, img_mask), (dep_mem, dep_mask) = seen["img"][0], seen["depth"][0]
    assert torch.equal(img_mask, dep_mask)
    # layer 1 attends level 1; depth memory = depth level 1 flattened + depth level embedding
    expected = depth[1].flatten(2).permute(2, 0, 1) + m.depth_level_embed.weight[1]
    assert_close(dep_mem, expected)
    assert not torch.allclose(out1["pred_logits"], out2["pred_logits"])
    assert out1["segm_decoder_out"].shape == (2, 10, 32)
    assert out1["enc_features"][0] is feats["multi_scale_features"][0]


def test_adapter_shapes_and_uv_embedding():
    torch.manual_seed(0)
    adapter = ViTFeatureAdapter(16, out_channels=(8, 8, 12, 16)).eval()
    ph, pw = 3, 5
    tokens = [torch.randn(2, 1, 2 + ph * pw, 16) for _ in range(4)]
    feats = adapter(tokens, (ph, pw), patch_start_idx=2)
    assert feats["res2"].shape == (2, 8, 12, 20)
    assert feats["res3"].shape == (2, 8, 6, 10)
    assert feats["res4"].shape == (2, 12, 3, 5)
    assert feats["res5"].shape == (2, 16, 2, 3)
    # res4 path is norm -> 1x1 -> + 0.1*UV embedding -> identity -> 1x1: rebuild it with numpy
    x = adapter.norm(tokens[2][:, :, 2:].reshape(2, ph * pw, 16)).permute(0, 2, 1).reshape(2, 16, ph, pw)
    x = adapter.projects[2](x)
    aspect = pw / ph
    diag = math.hypot(aspect, 1.0)
    xs = np.linspace(-aspect / diag * (pw - 1) / pw, aspect / diag * (pw - 1) / pw, pw)
    ys = np.linspace(-1 / diag * (ph - 1) / ph, 1 / diag * (ph - 1) / ph, ph)
    omega = 1.0 / 100.0 ** (np.arange(4) / 4.0)
    emb = np.zeros((16, ph, pw))
    for i in range(ph):
        for j in range(pw):
            ax, ay = xs[j] * omega, ys[i] * omega
            emb[:, i, j] = np.concatenate([np.sin(ax), np.cos(ax), np.sin(ay), np.cos(ay)])
    expected = adapter.unify_layers[2](x + 0.1 * torch.from_numpy(emb).float())
    assert_close(feats["res4"], expected, rtol=1e-5, atol=1e-5)
    # the embedding is built once per size (all four layers add it at the patch grid) and reused: the same
    # outputs again, and another grid gets its own entry, which does not change the first grid's outputs
    assert len(adapter._pos_cache) == 1
    other = adapter([torch.randn(1, 1, 2 + 4 * 4, 16) for _ in range(4)], (4, 4), patch_start_idx=2)
    assert other["res4"].shape == (1, 12, 4, 4) and len(adapter._pos_cache) == 2
    again = adapter(tokens, (ph, pw), patch_start_idx=2)
    assert all(torch.equal(again[k], feats[k]) for k in feats)


@pytest.mark.parametrize("k", [4, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_resize_then_unify_equals_the_two_layers(k, bias):
    """The composed x4 / x2 branch (one product of the two weights) against the transposed convolution followed
    by the 1x1 convolution, in float64: outputs and every gradient."""
    torch.manual_seed(0)
    resize = nn.ConvTranspose2d(12, 12, kernel_size=k, stride=k, bias=bias).double()
    unify = nn.Conv2d(12, 5, kernel_size=1, bias=bias).double()
    x = torch.randn(3, 12, 4, 7, dtype=torch.float64, requires_grad=True)
    got = resize_then_unify(x, resize, unify)
    want = unify(resize(x))
    assert got.shape == want.shape == (3, 5, 4 * k, 7 * k)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    params = [x, *resize.parameters(), *unify.parameters()]
    grads_got = torch.autograd.grad(got, params, g)
    grads_want = torch.autograd.grad(want, params, g)
    for a, b in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_resize_then_unify_leaves_other_layers_alone():
    """An overlapping transposed convolution, a strided convolution or a padding 1x1 does not compose: the layers
    run as given."""
    torch.manual_seed(0)
    x = torch.randn(1, 6, 5, 5)
    unify = nn.Conv2d(6, 3, kernel_size=1)
    for resize in (nn.ConvTranspose2d(6, 6, kernel_size=4, stride=2, padding=1), nn.Conv2d(6, 6, 3, 2, 1),
                   nn.Identity()):
        assert torch.equal(resize_then_unify(x, resize, unify), unify(resize(x)))
    # nor does a 1x1 convolution that pads (it grows the map)
    upsample, padded = nn.ConvTranspose2d(6, 6, kernel_size=2, stride=2), nn.Conv2d(6, 3, kernel_size=1, padding=1)
    assert torch.equal(resize_then_unify(x, upsample, padded), padded(upsample(x)))


def test_adapter_rejects_wrong_token_count():
    adapter = ViTFeatureAdapter(8, out_channels=(8, 8, 8, 8))
    with pytest.raises(ValueError, match="patch tokens"):
        adapter([torch.randn(1, 1, 10, 8)] * 4, (3, 4))


def test_depth_projector_alignment_against_manual():
    torch.manual_seed(0)
    proj = DepthProjector(8, 8).eval()
    depth = [torch.randn(1, 8, 16, 20), torch.randn(1, 8, 8, 10), torch.randn(1, 8, 4, 5), torch.randn(1, 8, 2, 3)]
    levels = [(1, 2), (2, 3), (4, 5)]
    raw, aligned = proj(depth, (8, 10), levels)
    assert raw is depth[-1]
    assert [tuple(a.shape[-2:]) for a in aligned] == levels
    # aligned[0] (coarsest) comes from the coarsest depth map, via its own convs
    y = proj.proj_convs1[3](depth[3])
    y = torch.nn.functional.interpolate(y, (1, 2), mode="bilinear", align_corners=False)
    assert_close(aligned[0], proj.proj_convs2[3](y))


@pytest.mark.parametrize("bins,size", [(100, (12, 16)), (7, (9, 11))])
def test_occupancy_head_is_configurable(bins, size):
    head = MultiPlaneOccupancyHead((32, 24, 16, 16), feature_channels=8, num_bins=bins, target_size=size)
    feats = {"res2": torch.randn(2, 16, 8, 10), "res3": torch.randn(2, 16, 4, 5), "res4": torch.randn(2, 24, 2, 3),
             "res5": torch.randn(2, 32, 1, 2)}
    out = head(feats)
    assert out.shape == (2, bins, *size)
    out.mean().backward()
    assert head.decoder.conv.weight.grad.abs().sum() > 0


def _tiny_inputs(cfg: HeadConfig, b=2, ph=4, pw=6, start=5):
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randn(b, 1, start + ph * pw, cfg.token_dim, generator=g) for _ in range(4)]
    depth = [torch.randn(b, cfg.depth_dim, ph * 8 // s, pw * 8 // s, generator=g) for s in (1, 2, 4, 8)]
    return tokens, (ph, pw), depth


def test_tiny_head_forward_backward_and_loss():
    from maskformer_head import HungarianMatcher, SetCriterion

    torch.manual_seed(0)
    head = build_head("tiny")
    cfg = head.config
    tokens, grid, depth = _tiny_inputs(cfg)
    out = head(tokens, grid, depth, patch_start_idx=5)
    assert out["pred_logits"].shape == (2, cfg.num_queries, cfg.num_classes + 1)
    assert out["pred_masks"].shape == (2, cfg.num_queries, 16, 24)
    assert len(out["aux_outputs"]) == cfg.dec_layers
    assert out["segm_decoder_out"].shape == (2, cfg.num_queries, cfg.hidden_dim)
    assert out["occupancy_logits"].shape == (2, cfg.occupancy_bins, *cfg.occupancy_size)
    targets = [
        {"labels": torch.tensor([1, 3]), "masks": torch.rand(2, 64, 96) > 0.5, "depths": torch.rand(1, 64, 96),
         "occupancy": (torch.rand(cfg.occupancy_bins, *cfg.occupancy_size) > 0.5).float(),
         "depth_map": torch.rand(*cfg.occupancy_size)}
        for _ in range(2)
    ]
    out["pred_depths"] = torch.rand(2, 1, 64, 96, requires_grad=True)
    weights = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0, "loss_depth": 5.0, "loss_mp_occ": 5.0}
    crit = SetCriterion(cfg.num_classes, HungarianMatcher(2, 5, 5, 64), weights, 0.1,
                        ["labels", "masks", "depths", "mp_occ"], 64, 3.0, 0.75)
    losses = crit(out, targets)
    assert len(losses) == 5 + 3 * cfg.dec_layers
    crit.weighted_total(losses).backward()
    trained = [n for n, p in head.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    for prefix in ("adapter.", "pixel_decoder.", "predictor.depth_transformer", "depth_projector.",
                   "occupancy_module."):
        assert any(n.startswith(prefix) for n in trained), prefix


def test_head_without_occupancy_and_without_reference_unused_modules():
    head = build_head("tiny", occupancy=False, keep_reference_unused=False)
    tokens, grid, depth = _tiny_inputs(head.config)
    out = head(tokens, grid, depth, patch_start_idx=5)
    assert out["occupancy_logits"] is None
    assert not any(k.startswith("predictor.depth_embed") for k in head.state_dict())


def test_compat_round_trip_with_toolkit_prefixes():
    head = build_head("tiny")
    ref = compat.to_reference(head.state_dict())
    assert any(k.startswith("backbone.dpt2pixeldecoder.") for k in ref)
    assert "sem_seg_head.predictor.depth_level_embed.weight" in ref
    ref["backbone.aggregator.frame_blocks.0.norm1.weight"] = torch.zeros(1)  # not part of the head
    back = compat.from_reference(ref)
    fresh = build_head("tiny")
    fresh.load_state_dict(back, strict=True)
    for k, v in head.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    with pytest.raises(ValueError, match="no key"):
        compat.from_reference({"foo.bar": torch.zeros(1)})


@pytest.mark.slow
def test_full_head_forward_backward_at_toolkit_sizes():
    """res2 104x128 ... res5 13x16, 100 queries, 9 layers, 100-bin occupancy at 120x160 (CPU).

    Everything runs forward at toolkit sizes; to keep this CPU test near 1.5 minutes on two
    cores, the backward pass covers the pixel decoder, depth projector and decoder, while the
    2048-channel adapter and the occupancy head are frozen here (their backward is exercised
    by the tiny-head test and timed at full size by tools/bench_head.py).
    """
    torch.set_num_threads(2)
    torch.manual_seed(0)
    head = build_head("full")
    head.adapter.requires_grad_(False)
    head.occupancy_module.requires_grad_(False)
    tokens = [torch.randn(1, 1, 5 + 26 * 32, 2048) for _ in range(4)]
    depth = [torch.randn(1, 256, 208, 256), torch.randn(1, 256, 104, 128), torch.randn(1, 256, 52, 64),
             torch.randn(1, 256, 26, 32)]
    out = head(tokens, (26, 32), depth, patch_start_idx=5)
    feats = out["res_features"]
    assert [tuple(feats[k].shape[1:]) for k in ("res2", "res3", "res4", "res5")] == [
        (256, 104, 128), (512, 52, 64), (1024, 26, 32), (2048, 13, 16)]
    assert [tuple(f.shape[-2:]) for f in out["enc_features"]] == [(13, 16), (26, 32), (52, 64)]
    assert out["pred_logits"].shape == (1, 100, 14)
    assert out["pred_masks"].shape == (1, 100, 104, 128)
    assert len(out["aux_outputs"]) == 9
    assert out["segm_decoder_out"].shape == (1, 100, 256)
    assert out["depth_features"].shape == (1, 256, 26, 32)
    assert out["occupancy_logits"].shape == (1, 100, 120, 160)
    assert torch.isfinite(out["pred_masks"]).all() and torch.isfinite(out["occupancy_logits"]).all()
    loss = out["pred_masks"].sigmoid().mean() + out["pred_logits"].logsumexp(-1).mean()
    loss = loss + sum(a["pred_masks"].mean() for a in out["aux_outputs"])
    loss.backward()
    assert head.pixel_decoder.transformer.encoder.layers[0].self_attn.sampling_offsets.weight.grad.abs().sum() > 0
    assert head.pixel_decoder.input_proj[0][0].weight.grad.abs().sum() > 0
    assert head.depth_projector.proj_convs1[3].conv_block[0].weight.grad.abs().sum() > 0
    assert head.predictor.depth_transformer_cross_attention_layers[8].multihead_attn.in_proj_weight.grad.abs().sum() > 0
