"""DINOv2-with-registers parity: position-table interpolation (down / exact / up) and all token outputs."""

from __future__ import annotations

import pytest
import torch
from backbone_vggt import DinoVisionTransformer, load_pretrained
from torch.testing import assert_close

TOL32 = dict(rtol=1e-5, atol=5e-5)


@pytest.fixture(scope="module")
def vits(dinov2_golden):
    out = {}
    for dtype in (torch.float32, torch.float64):
        vit = DinoVisionTransformer(**dinov2_golden["kwargs"])
        load_pretrained(vit, dinov2_golden["state_dict"], strict=True)
        out[dtype] = vit.to(dtype).eval()
    return out


@pytest.mark.parametrize("case", ["down", "exact", "up"])
def test_dinov2_fp32(vits, dinov2_golden, case):
    inp = dinov2_golden["inputs"][case]
    vit = vits[torch.float32]
    with torch.no_grad():
        out = vit(inp["x"])
        h, w = (s // 14 for s in inp["x"].shape[-2:])
        table = vit.interpolate_pos_encoding(h, w, torch.float32)
    ref = inp["fp32"]
    # the position table is a deterministic resampling: agrees to float32 rounding
    assert_close(table, ref["pos_embed_interpolated"], rtol=1e-6, atol=1e-6)
    for key in ("x_norm_patchtokens", "x_norm_clstoken", "x_norm_regtokens", "x_prenorm"):
        assert out[key].shape == ref[key].shape
        assert_close(out[key], ref[key], **TOL32)


@pytest.mark.parametrize("case", ["down", "exact", "up"])
def test_dinov2_fp64(vits, dinov2_golden, case):
    inp = dinov2_golden["inputs"][case]
    with torch.no_grad():
        out = vits[torch.float64](inp["x"].double())
    # the reference interpolates the table in float32 even in float64 runs; so do we
    assert_close(out["x_norm_patchtokens"], inp["fp64"]["x_norm_patchtokens"], rtol=1e-10, atol=1e-10)


def test_position_table_cache_reused_and_invalidated(vits, dinov2_golden):
    vit = vits[torch.float32]
    with torch.no_grad():
        first = vit.interpolate_pos_encoding(5, 7, torch.float32)
        again = vit.interpolate_pos_encoding(5, 7, torch.float32)
        assert again is first
        saved = vit.pos_embed.detach().clone()
        vit.pos_embed.add_(1.0)  # in-place update bumps the version: the cache must not serve stale values
        moved = vit.interpolate_pos_encoding(5, 7, torch.float32)
        vit.pos_embed.copy_(saved)
    assert_close(moved[:, 0], first[:, 0] + 1.0)
    assert_close(moved, first + 1.0, rtol=1e-5, atol=1e-5)


def test_frozen_position_table_is_a_constant_equal_to_the_interpolated_one(vits, dinov2_golden):
    """freeze_pos_encoding (used for fixed-size ONNX export) returns exactly the interpolated table and the
    traced graph no longer contains the antialiased bicubic resize, which ONNX cannot express."""
    vits = vits[torch.float32]
    x = dinov2_golden["inputs"]["down"]["x"].float()
    grid = (x.shape[-2] // 14, x.shape[-1] // 14)
    expected = vits.interpolate_pos_encoding(*grid, torch.float32).detach().clone()
    vits.freeze_pos_encoding(*grid)
    vits.requires_grad_(False)  # a traced lambda holds the weights as constants
    try:
        assert torch.equal(vits.interpolate_pos_encoding(*grid, torch.float32), expected)
        with torch.no_grad():
            traced = torch.jit.trace(lambda t: vits.prepare_tokens(t), x, check_trace=False)
        assert "upsample_bicubic2d_aa" not in str(traced.graph)
    finally:
        vits.unfreeze_pos_encoding()
        vits.requires_grad_(True)
    assert not vits._frozen_pos
