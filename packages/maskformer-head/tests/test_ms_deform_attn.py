"""Deformable attention sampling against an explicit per-point bilinear loop (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from maskformer_head import MSDeformAttn, ms_deform_attn_sample
from maskformer_head.pixel_decoder import MSDeformAttnEncoder


def _bilinear_zero_pad(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """img [D, H, W]; (x, y) normalised in [0, 1]; pixel coordinate = loc*size - 0.5."""
    d, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(d, dtype=img.dtype)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            wgt = (1 - abs(px - xx)) * (1 - abs(py - yy))
            if 0 <= xx < w and 0 <= yy < h:
                out += wgt * img[:, yy, xx]
    return out


def test_sampling_matches_explicit_loop():
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 3), (4, 5)]
    n, m, d, lq, p = 2, 2, 3, 4, 3
    value = torch.randn(n, sum(h * w for h, w in shapes), m, d, generator=g, dtype=torch.float64)
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2  # some outside
    attw = torch.rand(n, lq, m, len(shapes), p, generator=g, dtype=torch.float64)
    out = ms_deform_attn_sample(value, shapes, loc, attw)
    starts = [0, shapes[0][0] * shapes[0][1]]
    ref = torch.zeros(n, lq, m * d, dtype=torch.float64)
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                acc = torch.zeros(d, dtype=torch.float64)
                for lvl, (h, w) in enumerate(shapes):
                    img = value[b, starts[lvl] : starts[lvl] + h * w, head].T.reshape(d, h, w)
                    for pt in range(p):
                        x, y = loc[b, q, head, lvl, pt].tolist()
                        acc += attw[b, q, head, lvl, pt] * _bilinear_zero_pad(img, x, y)
                ref[b, q, head * d : (head + 1) * d] = acc
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_layer_offsets_are_in_level_pixels():
    """With zero offsets weights and a chosen bias, every point samples a known pixel."""
    attn = MSDeformAttn(d_model=4, n_levels=1, n_heads=1, n_points=1).double()
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0]))  # one pixel to the right
        attn.value_proj.weight.copy_(torch.eye(4))
        attn.value_proj.bias.zero_()
        attn.output_proj.weight.copy_(torch.eye(4))
        attn.output_proj.bias.zero_()
    h, w = 3, 5
    src = torch.randn(1, h * w, 4, dtype=torch.float64)
    ref = MSDeformAttnEncoder.reference_points([(h, w)], 1, "cpu", torch.float64)
    out = attn(torch.zeros(1, h * w, 4, dtype=torch.float64), ref, src, [(h, w)])
    grid = src.view(h, w, 4)
    expected = torch.zeros_like(grid)
    expected[:, :-1] = grid[:, 1:]  # the right neighbour, zero beyond the border
    # reference points are built in float32 like the reference, hence ~1e-7 differences
    torch.testing.assert_close(out.view(h, w, 4), expected, rtol=0, atol=1e-6)


def test_reference_points_are_pixel_centres():
    ref = MSDeformAttnEncoder.reference_points([(2, 4)], 1, "cpu", torch.float32)
    assert ref.shape == (1, 8, 1, 2)
    assert ref[0, 0, 0].tolist() == pytest.approx([0.125, 0.25])
    assert ref[0, 7, 0].tolist() == pytest.approx([0.875, 0.75])
