"""Depth errors of the 2D stage (``nvp3d.evaluation.depth2d``) against a per-pixel brute force."""

from __future__ import annotations

import math

import pytest
import torch
from nvp3d.evaluation.depth2d import DepthErrors


def test_depth_errors_match_brute_force_over_valid_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(3):
        gt = torch.rand(6, 8, generator=g) * 5.0
        gt[torch.rand(6, 8, generator=g) < 0.3] = 0.0  # pixels without GT depth do not count
        pred = (gt + torch.randn(6, 8, generator=g) * 0.4).clamp_min(0.05)
        pairs.append((pred, gt))
    acc = DepthErrors()
    for pred, gt in pairs:
        acc.update(pred, gt)
    errs, rels, good, scaled_rels, log_scales = [], [], 0, [], []
    for pred, gt in pairs:
        valid = [(p, t) for p, t in zip(pred.flatten().tolist(), gt.flatten().tolist()) if t > 0]
        ratios = sorted(t / p for p, t in valid)
        scale = ratios[(len(ratios) - 1) // 2]  # the lower middle value, as torch.median
        log_scales.append(abs(math.log(scale)))
        for p, t in valid:
            errs.append(abs(p - t))
            rels.append(abs(p - t) / t)
            scaled_rels.append(abs(scale * p - t) / t)
            good += max(p / t, t / p) < 1.25
    kpi = acc.kpis("test")
    assert kpi["test_depth_mae"] == pytest.approx(sum(errs) / len(errs), rel=1e-6)
    assert kpi["test_depth_rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errs) / len(errs)), rel=1e-6)
    assert kpi["test_depth_abs_rel"] == pytest.approx(sum(rels) / len(rels), rel=1e-6)
    assert kpi["test_depth_delta1"] == pytest.approx(100.0 * good / len(errs), rel=1e-9)
    assert kpi["test_depth_abs_rel_scaled"] == pytest.approx(sum(scaled_rels) / len(scaled_rels), rel=1e-6)
    assert kpi["test_depth_log_scale"] == pytest.approx(sum(log_scales) / len(log_scales), rel=1e-6)
    assert int(acc.stats[0]) == len(errs)

    # a prediction off by one factor everywhere: all of its error is scale
    acc.reset()
    gt = torch.tensor([[1.0, 2.0, 0.0, 4.0]])
    acc.update(gt * 1.5, gt)
    kpi = acc.kpis("test")
    assert kpi["test_depth_abs_rel"] == pytest.approx(0.5)
    assert kpi["test_depth_abs_rel_scaled"] == pytest.approx(0.0, abs=1e-12)
    assert kpi["test_depth_log_scale"] == pytest.approx(math.log(1.5))

    acc.reset()
    assert all(math.isnan(v) for v in acc.kpis("val").values())  # no valid pixel: NaN, not 0
    with pytest.raises(ValueError, match="differ in shape"):
        acc.update(torch.ones(2, 3), torch.ones(3, 2))
