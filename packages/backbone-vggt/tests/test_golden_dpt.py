"""DPT depth / point head parity on the reference tokens, including every intermediate tap."""

from __future__ import annotations

import pytest
import torch
from backbone_vggt import DPTHead, load_pretrained
from torch.testing import assert_close

HEAD_TOL = dict(rtol=1e-4, atol=1e-4)  # golden README, float32 head outputs
FP64_TOL = dict(rtol=1e-10, atol=1e-10)


def _head(case: dict, dtype=torch.float32) -> DPTHead:
    head = DPTHead(**case["kwargs"])
    load_pretrained(head, case["state_dict"], strict=True)
    return head.to(dtype).eval()


@pytest.mark.parametrize("name", ["depth_head", "point_head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dpt_head_matches_reference(vggt_tiny, name, dtype):
    case = vggt_tiny[name]
    agg = vggt_tiny["agg_conv"]
    key = "out_fp32" if dtype == torch.float32 else "out_fp64"
    head = _head(case, dtype)
    with torch.no_grad():
        pred, conf = head(agg[key]["tokens"], images=agg["images"].to(dtype), patch_start_idx=5,
                          frames_chunk_size=case["frames_chunk_size"])
    ref = case[key]
    assert pred.shape == ref["pred"].shape and conf.shape == ref["conf"].shape
    tol = HEAD_TOL if dtype == torch.float32 else FP64_TOL
    assert_close(pred, ref["pred"], **tol)
    assert_close(conf, ref["conf"], **tol)
    # the position embeddings are built on the first call and reused (one per level): the second call is the same
    assert len(head._pos_cache) == 4
    with torch.no_grad():
        again = head(agg[key]["tokens"], images=agg["images"].to(dtype), patch_start_idx=5,
                     frames_chunk_size=case["frames_chunk_size"])
    assert torch.equal(again[0], pred) and torch.equal(again[1], conf) and len(head._pos_cache) == 4


def test_depth_head_taps_match_reference(vggt_tiny):
    case = vggt_tiny["depth_head"]
    agg = vggt_tiny["agg_conv"]
    head = _head(case)
    taps: dict[str, torch.Tensor] = {}
    hooks = []
    for name in case["out_fp32"]["taps"]:
        module = head.get_submodule(name)
        hooks.append(module.register_forward_hook(lambda m, i, o, n=name: taps.__setitem__(n, o.detach().clone())))
    with torch.no_grad():
        _, fused = head(agg["out_fp32"]["tokens"], images=agg["images"], patch_start_idx=5, return_features=True)
    for h in hooks:
        h.remove()
    for name, ref in case["out_fp32"]["taps"].items():
        assert taps[name].shape == ref[0].shape, name
        assert_close(taps[name], ref[0], **HEAD_TOL, msg=lambda m, n=name: f"{n}: {m}")
    # the exposed multi-scale fusion features are the refinenet outputs, finest first
    for level, ref_name in enumerate(["scratch.refinenet1", "scratch.refinenet2", "scratch.refinenet3",
                                      "scratch.refinenet4"]):
        assert_close(fused[level], case["out_fp32"]["taps"][ref_name][0], **HEAD_TOL)


def test_frame_chunking_has_no_numerical_effect(vggt_tiny):
    case = vggt_tiny["point_head"]
    agg = vggt_tiny["agg_conv"]
    head = _head(case, torch.float64)  # float64 so conv algorithm choice per batch size cannot blur the check
    tokens, images = agg["out_fp64"]["tokens"], agg["images"].double()
    with torch.no_grad():
        (p1, c1), f1 = head(tokens, images=images, patch_start_idx=5, frames_chunk_size=1, return_features=True)
        (p8, c8), f8 = head(tokens, images=images, patch_start_idx=5, frames_chunk_size=8, return_features=True)
    assert_close(p1, p8, **FP64_TOL)
    assert_close(c1, c8, **FP64_TOL)
    assert_close(p8, case["out_fp64"]["pred"], **FP64_TOL)
    for a, b in zip(f1, f8):
        assert_close(a, b, **FP64_TOL)


def test_feature_only_mode(vggt_tiny):
    agg = vggt_tiny["agg_conv"]
    kwargs = dict(vggt_tiny["depth_head"]["kwargs"], feature_only=True, down_ratio=2, pos_embed=False)
    head = DPTHead(**kwargs).eval()
    assert not hasattr(head.scratch, "output_conv2")
    assert head.scratch.output_conv1.weight.shape == (32, 32, 3, 3)
    with torch.no_grad():
        feats = head(agg["out_fp32"]["tokens"], images=agg["images"], patch_start_idx=5)
        fused = head.fuse(head.level_features(agg["out_fp32"]["tokens"], 5, 5, 7, 70, 98))
        expected = torch.nn.functional.interpolate(head.scratch.output_conv1(fused[0]), size=(35, 49),
                                                   mode="bilinear", align_corners=True)
    assert feats.shape == (1, 2, 32, 35, 49)
    assert_close(feats[0], expected, rtol=1e-6, atol=1e-6)


def test_missing_cached_layer_is_a_clear_error(vggt_tiny):
    head = _head(vggt_tiny["depth_head"])
    tokens = list(vggt_tiny["agg_conv"]["out_fp32"]["tokens"])
    tokens[1] = None
    with pytest.raises(ValueError, match="layer 1 was not cached"):
        head(tokens, images=vggt_tiny["agg_conv"]["images"], patch_start_idx=5)
