"""Losses against scalar loops (float64) and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from frustum3d.losses import (
    FrustumLoss,
    geometry_loss,
    occupancy_loss_dense,
    occupancy_loss_sparse,
    panoptic_dice_loss_dense,
    panoptic_dice_loss_sparse,
    panoptic_mask_loss_dense,
    panoptic_mask_loss_sparse,
    panoptic_ownership_loss_dense,
    panoptic_ownership_loss_sparse,
    semantic_loss_sparse,
    sparse_lookup,
)
from frustum3d.panoptic import panoptic_fusion
from frustum3d.sparse import SparseVoxels


def _bce(x: float, t: float) -> float:
    return -(t * math.log(1 / (1 + math.exp(-x))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-x))))


def _random_sparse(n, channels, stride, grid, batch, seed, out_of_grid=True):
    g = torch.Generator().manual_seed(seed)
    cells = grid // stride
    lo = -1 if out_of_grid else 0
    hi = cells + 1 if out_of_grid else cells
    c = torch.stack([torch.randint(0, batch, (n,), generator=g)]
                    + [torch.randint(lo, hi, (n,), generator=g) for _ in range(3)], 1)
    c[:, 1:] *= stride
    c = torch.unique(c, dim=0)
    f = torch.randn(c.shape[0], channels, generator=g, dtype=torch.float64)
    return SparseVoxels(c, f, stride=stride, spatial_shape=(grid,) * 3, batch_size=batch)


def _dense_at(dense, b, c, stride, fill):
    x, y, z = (v // stride for v in c)
    n = dense.shape[1]
    if 0 <= x < n and 0 <= y < n and 0 <= z < n:
        return float(dense[b, x, y, z])
    return fill


def test_geometry_loss_hand_value():
    c = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]])
    pred = SparseVoxels(c, torch.tensor([[1.0], [3.0]], dtype=torch.float64), 1, (2, 2, 2), 1)
    gt = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    gt[0, 0, 0, 0], gt[0, 1, 0, 0] = 0.5, 12.0  # second GT clipped to 3 -> error 0
    w = torch.ones(1, 2, 2, 2, dtype=torch.float64)
    w[0, 0, 0, 0] = 10.0
    assert math.isclose(geometry_loss(pred, gt, w).item(), (10 * 0.5 + 0) / 2)
    assert math.isclose(geometry_loss(pred, gt, w, clip_target=False).item(), (10 * 0.5 + 9) / 2)


def test_sparse_occupancy_and_geometry_brute_force():
    grid, stride = 8, 2
    sv = _random_sparse(60, 1, stride, grid, 2, 0)
    g = torch.Generator().manual_seed(1)
    tgt = (torch.rand(2, 4, 4, 4, generator=g) > 0.5).double()
    wt = 1 + 4 * torch.rand(2, 4, 4, 4, generator=g, dtype=torch.float64)
    got = occupancy_loss_sparse(sv, tgt, wt).item()
    terms = []
    for (b, *c), (x,) in zip(sv.coords.tolist(), sv.feats.tolist(), strict=True):
        t = _dense_at(tgt, b, c, stride, 0.0)
        w = _dense_at(wt, b, c, stride, 1.0)
        terms.append(_bce(x, t) * w)
    assert math.isclose(got, sum(terms) / len(terms), rel_tol=1e-12)
    # lookup itself
    vals = sparse_lookup(sv, wt, fill=-7.0).tolist()
    for (b, *c), v in zip(sv.coords.tolist(), vals, strict=True):
        assert v == _dense_at(wt, b, c, stride, -7.0)
    # geometry on a stride-1 set
    sv1 = _random_sparse(80, 1, 1, 6, 2, 2, out_of_grid=False)
    tdf = 6 * torch.rand(2, 6, 6, 6, generator=g, dtype=torch.float64)
    w1 = torch.rand(2, 6, 6, 6, generator=g, dtype=torch.float64)
    terms = [abs(p - min(_dense_at(tdf, b, c, 1, 3.0), 3.0)) * _dense_at(w1, b, c, 1, 1.0)
             for (b, *c), (p,) in zip(sv1.coords.tolist(), sv1.feats.tolist(), strict=True)]
    assert math.isclose(geometry_loss(sv1, tdf, w1).item(), sum(terms) / len(terms), rel_tol=1e-12)


def test_dense_occupancy_ignores_outside_frustum():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 1, 4, 4, 4, generator=g, dtype=torch.float64)
    frustum = torch.rand(2, 4, 4, 4, generator=g) > 0.4
    logits = logits.masked_fill(~frustum[:, None], float("-inf"))
    tgt = (torch.rand(2, 4, 4, 4, generator=g) > 0.5).double()
    tgt[~frustum] = 1.0  # would give an infinite loss if counted
    wt = torch.rand(2, 4, 4, 4, generator=g, dtype=torch.float64)
    got = occupancy_loss_dense(logits, tgt, wt).item()
    terms = [_bce(logits[b, 0, x, y, z].item(), tgt[b, x, y, z].item()) * wt[b, x, y, z].item()
             for b, x, y, z in frustum.nonzero().tolist()]
    assert math.isfinite(got)
    assert math.isclose(got, sum(terms) / len(terms), rel_tol=1e-12)


def _panoptic_case(seed: int):
    """Random dense mask logits (5 queries, two samples), GT masks, matches and a valid-voxel mask; the generator
    continues for further draws."""
    g = torch.Generator().manual_seed(seed)
    q = 5
    logits = torch.randn(2, q, 4, 4, 4, generator=g, dtype=torch.float64)
    masks = [torch.rand(3, 4, 4, 4, generator=g) > 0.6, torch.rand(2, 4, 4, 4, generator=g) > 0.6]
    indices = [(torch.tensor([4, 0]), torch.tensor([2, 0])), (torch.tensor([1]), torch.tensor([1]))]
    valid = torch.rand(2, 4, 4, 4, generator=g) > 0.3
    return g, q, logits, masks, indices, valid


def test_panoptic_dense_and_sparse_brute_force():
    g, q, logits, masks, indices, valid = _panoptic_case(4)
    wt = torch.rand(2, 4, 4, 4, generator=g, dtype=torch.float64)
    got = panoptic_mask_loss_dense(logits, masks, indices, wt, valid).item()
    total = 0.0
    for b, (qi, ti) in enumerate(indices):
        vox = valid[b].nonzero().tolist()
        for qq, tt in zip(qi.tolist(), ti.tolist(), strict=True):
            total += sum(_bce(logits[b, qq, x, y, z].item(), float(masks[b][tt, x, y, z])) * wt[b, x, y, z].item()
                         for x, y, z in vox) / len(vox)
    assert math.isclose(got, total / 3, rel_tol=1e-12)

    sv = _random_sparse(70, q, 2, 8, 2, 5)
    got_s = panoptic_mask_loss_sparse(sv, masks, indices, wt, num_masks=4).item()
    total = 0.0
    for b, (qi, ti) in enumerate(indices):
        rows = [(c, f) for (bb, *c), f in zip(sv.coords.tolist(), sv.feats.tolist(), strict=True) if bb == b]
        for qq, tt in zip(qi.tolist(), ti.tolist(), strict=True):
            total += sum(_bce(f[qq], _dense_at(masks[b][tt][None].double(), 0, c, 2, 0.0))
                         * _dense_at(wt, b, c, 2, 1.0) for c, f in rows) / len(rows)
    assert math.isclose(got_s, total / 4, rel_tol=1e-12)


def test_frustum_loss_weights_and_empty_levels_backprop():
    g = torch.Generator().manual_seed(6)
    occ64 = torch.randn(1, 1, 4, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    feats = torch.randn(10, 1, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.stack([torch.zeros(10, dtype=torch.long), torch.arange(10) % 8, torch.arange(10) // 8,
                     torch.zeros(10, dtype=torch.long)], 1)
    occ256 = SparseVoxels(c, feats, 1, (8, 8, 8), 1)
    empty = SparseVoxels(torch.zeros(0, 4, dtype=torch.long),
                         torch.zeros(0, 1, dtype=torch.float64, requires_grad=True), 2, (8, 8, 8), 1)
    tg = {
        "occupancy_64": torch.zeros(1, 4, 4, 4, dtype=torch.float64),
        "occupancy_128": torch.zeros(1, 4, 4, 4, dtype=torch.float64),
        "occupancy_256": torch.ones(1, 8, 8, 8, dtype=torch.float64),
        "geometry": torch.ones(1, 8, 8, 8, dtype=torch.float64),
    }
    out = {"occupancy_64": occ64, "occupancy_128": empty, "occupancy_256": occ256, "geometry": occ256}
    crit = FrustumLoss()
    losses = crit(out, tg)
    assert set(losses) == {"loss_geometry", "loss_occupancy_64", "loss_occupancy_128", "loss_occupancy_256"}
    assert losses["loss_occupancy_128"].item() == 0.0
    assert math.isclose(losses["loss_occupancy_64"].item(), 50 * occupancy_loss_dense(occ64, tg["occupancy_64"]).item())
    assert math.isclose(losses["loss_occupancy_256"].item(),
                        10 * occupancy_loss_sparse(occ256, tg["occupancy_256"]).item())
    assert math.isclose(losses["loss_geometry"].item(), 5 * geometry_loss(occ256, tg["geometry"]).item())
    sum(losses.values()).backward()
    assert occ64.grad is not None and feats.grad is not None
    with pytest.raises(ValueError, match="completion_weights"):
        FrustumLoss(completion_weights=(1.0, 2.0))


def _dice(xs: list[float], ts: list[float]) -> float:
    ps = [1 / (1 + math.exp(-x)) for x in xs]
    return 1 - (2 * sum(p * t for p, t in zip(ps, ts, strict=True)) + 1) / (sum(ps) + sum(ts) + 1)


def test_panoptic_dice_dense_and_sparse_brute_force():
    _, q, logits, masks, indices, valid = _panoptic_case(8)
    got = panoptic_dice_loss_dense(logits, masks, indices, valid).item()
    total = 0.0
    for b, (qi, ti) in enumerate(indices):
        vox = valid[b].nonzero().tolist()
        for qq, tt in zip(qi.tolist(), ti.tolist(), strict=True):
            total += _dice([logits[b, qq, x, y, z].item() for x, y, z in vox],
                           [float(masks[b][tt, x, y, z]) for x, y, z in vox])
    assert math.isclose(got, total / 3, rel_tol=1e-12)

    sv = _random_sparse(70, q, 2, 8, 2, 9)
    got_s = panoptic_dice_loss_sparse(sv, masks, indices, num_masks=4).item()
    total = 0.0
    for b, (qi, ti) in enumerate(indices):
        rows = [(c, f) for (bb, *c), f in zip(sv.coords.tolist(), sv.feats.tolist(), strict=True) if bb == b]
        for qq, tt in zip(qi.tolist(), ti.tolist(), strict=True):
            total += _dice([f[qq] for _, f in rows],
                           [_dense_at(masks[b][tt][None].double(), 0, c, 2, 0.0) for c, _ in rows])
    assert math.isclose(got_s, total / 4, rel_tol=1e-12)


def test_dice_term_is_opt_in_and_backpropagates():
    """``panoptic_dice_weight`` 0 (the toolkit recipe) adds no term; > 0 adds ``loss_panoptic_*_dice`` per level,
    weighted, with gradients; a small object's dice does not shrink with its share of the voxels (the BCE does)."""
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(1, 3, 4, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    masks = [torch.rand(2, 4, 4, 4, generator=g) > 0.5]
    indices = [(torch.tensor([2, 0]), torch.tensor([0, 1]))]
    out, tg = {"panoptic_64": logits}, {"masks_64": masks}
    assert set(FrustumLoss()(out, tg, indices)) == {"loss_panoptic_64"}
    losses = FrustumLoss(panoptic_dice_weight=3.0)(out, tg, indices)
    assert set(losses) == {"loss_panoptic_64", "loss_panoptic_64_dice"}
    assert math.isclose(losses["loss_panoptic_64_dice"].item(),
                        3.0 * panoptic_dice_loss_dense(logits, masks, indices).item(), rel_tol=1e-12)
    losses["loss_panoptic_64_dice"].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0

    # one voxel of 512 is the object; an all-empty prediction: the voxel-mean BCE is near 0, the dice near 1
    small = torch.full((1, 1, 8, 8, 8), -8.0, dtype=torch.float64)
    obj = [torch.zeros(1, 8, 8, 8, dtype=torch.bool)]
    obj[0][0, 3, 3, 3] = True
    one = [(torch.tensor([0]), torch.tensor([0]))]
    assert panoptic_mask_loss_dense(small, obj, one).item() < 0.02
    assert panoptic_dice_loss_dense(small, obj, one).item() > 0.49


def test_dense_masked_means_of_bf16_logits_sum_and_count_in_fp32():
    """4113 valid voxels (not a bf16 number: it rounds to 4128) with the same per-voxel loss: the mean is that
    loss in fp32, not a bf16 quotient of a rounded sum over a rounded count; fp64 inputs keep their precision
    (the tests above)."""
    n = 4096 + 17
    valid = torch.zeros(1, 20, 20, 20, dtype=torch.bool)
    valid.view(-1)[:n] = True
    logits = torch.zeros(1, 1, 20, 20, 20, dtype=torch.bfloat16)
    per_voxel = torch.nn.functional.binary_cross_entropy_with_logits(  # ln 2, rounded to bf16 as computed
        torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.bfloat16)).double().item()
    got = occupancy_loss_dense(logits, torch.zeros(1, 20, 20, 20), valid=valid)
    assert got.dtype == torch.float32 and math.isclose(got.item(), per_voxel, rel_tol=1e-6)
    masks = [torch.zeros(1, 20, 20, 20, dtype=torch.bool)]
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    got = panoptic_mask_loss_dense(logits, masks, indices, valid=valid)
    assert got.dtype == torch.float32 and math.isclose(got.item(), per_voxel, rel_tol=1e-6)


def _ownership_case(seed: int):
    """Dense logits of 5 queries (two samples), class logits (K+1 = 4 columns), *disjoint* GT masks cut from a
    random label volume, matches and a valid-voxel mask."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 4, 4, 4, generator=g, dtype=torch.float64)
    classes = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 4, 4, 4), generator=g)  # 0 = no segment, 1..3 = segment ids
    masks = [torch.stack([labels[b] == k for k in (1, 2, 3)]) for b in range(2)]
    indices = [(torch.tensor([4, 0, 2]), torch.tensor([2, 0, 1])), (torch.tensor([1]), torch.tensor([1]))]
    valid = torch.rand(2, 4, 4, 4, generator=g) > 0.3
    return g, logits, classes, masks, indices, valid


def _ownership_brute(rows, scores, qi, ti, masks_b, at):
    """Sum over matched segments of the mean (over the segment's voxels in ``rows``) of -log softmax_q(log s_q +
    log sigmoid(m_q)) at the segment's query; ``at(mask, c)`` reads a GT mask at voxel ``c``."""
    total = 0.0
    for qq, tt in zip(qi.tolist(), ti.tolist(), strict=True):
        ces = []
        for c, f in rows:
            if at(masks_b[tt], c) <= 0:
                continue
            z = [math.log(scores[k]) - math.log1p(math.exp(-f[k])) for k in range(len(f))]
            ces.append(math.log(sum(math.exp(v) for v in z)) - z[qq])
        total += sum(ces) / len(ces) if ces else 0.0
    return total


def test_ownership_ce_dense_and_sparse_brute_force():
    """The voxel-ownership cross-entropy against a float64 scalar loop, on a dense level (valid voxels only) and
    at sparse voxels (including voxels outside the GT grid, which belong to no segment)."""
    _, logits, classes, masks, indices, valid = _ownership_case(3)
    prob = classes.softmax(-1)
    scores = prob[..., 1:-1].amax(-1)  # best real class (neither free space nor no-object)
    log_scores = torch.log(scores)
    got = panoptic_ownership_loss_dense(logits, masks, indices, log_scores, valid).item()
    total = 0.0
    for b, (qi, ti) in enumerate(indices):
        rows = [((x, y, z), logits[b, :, x, y, z].tolist()) for x, y, z in valid[b].nonzero().tolist()]
        total += _ownership_brute(rows, scores[b].tolist(), qi, ti, masks[b], lambda m, c: float(m[c]))
    assert total > 0
    assert math.isclose(got, total / 4, rel_tol=1e-12)  # 4 matched pairs

    sv = _random_sparse(70, 5, 2, 8, 2, 5)
    got_s = panoptic_ownership_loss_sparse(sv, masks, indices, log_scores, num_masks=2.5).item()
    total = 0.0
    for b, (qi, ti) in enumerate(indices):
        rows = [(tuple(c), f) for (bb, *c), f in zip(sv.coords.tolist(), sv.feats.tolist(), strict=True) if bb == b]
        total += _ownership_brute(rows, scores[b].tolist(), qi, ti, masks[b],
                                  lambda m, c: _dense_at(m[None].double(), 0, c, 2, 0.0))
    assert total > 0
    assert math.isclose(got_s, total / 2.5, rel_tol=1e-12)


def test_ownership_ce_trains_the_fusion_argmax():
    """A confident wall query whose mask is high on a chair's voxels owns them in the panoptic fusion; the
    per-pair BCE barely sees those voxels, the ownership term pushes the wall's logits down there and the chair's
    up; after a few gradient steps on the ownership term alone, the fusion gives the chair its voxels."""
    wall, chair = 0, 1
    labels = torch.zeros(8, 8, 8, dtype=torch.long)
    labels[0] = 1  # a wall slab of 64 voxels
    labels[3, 3, 3] = labels[3, 3, 4] = 2  # a two-voxel chair
    masks = [torch.stack([labels == 1, labels == 2])]
    indices = [(torch.tensor([wall, chair]), torch.tensor([0, 1]))]
    class_logits = torch.full((1, 2, 13 + 1), -4.0, dtype=torch.float64)
    class_logits[0, wall, 10] = 4.0  # wall, score ~0.999
    class_logits[0, chair, 3] = 1.0  # chair, score ~0.6
    mask = torch.full((1, 2, 8, 8, 8), -6.0, dtype=torch.float64)
    mask[0, wall][labels == 1] = 6.0
    mask[0, wall][labels == 2] = 3.0  # the wall leaks onto the chair
    mask[0, chair][labels == 2] = 2.0
    mask.requires_grad_(True)

    def chair_owned() -> int:
        tdf = torch.where(labels > 0, 0.0, 3.0)
        fused = panoptic_fusion(class_logits[0].float(), mask[0].detach().float(), tdf, object_mask_threshold=0.5)
        return int((fused.semantic == 3).sum())

    assert chair_owned() == 0
    crit = FrustumLoss(panoptic_ce_weight=1.0)
    tg = {"masks_64": masks}
    with pytest.raises(ValueError, match="class_logits"):
        crit({"panoptic_64": mask}, tg, indices)
    assert "loss_panoptic_64_ce" not in FrustumLoss()({"panoptic_64": mask}, tg, indices, class_logits=class_logits)
    loss = crit({"panoptic_64": mask}, tg, indices, class_logits=class_logits)["loss_panoptic_64_ce"]
    loss.backward()
    at_chair = labels == 2
    assert (mask.grad[0, wall][at_chair] > 0).all() and (mask.grad[0, chair][at_chair] < 0).all()
    with torch.no_grad():
        for _ in range(50):
            mask.grad = None
            with torch.enable_grad():
                crit({"panoptic_64": mask}, tg, indices, class_logits=class_logits)["loss_panoptic_64_ce"].backward()
            mask -= 20.0 * mask.grad
    assert chair_owned() == 2


def test_semantic_loss_sparse_brute_force():
    """The per-voxel semantic cross-entropy: the mean over the voxels whose GT class (looked up at their grid cell)
    is labelled and within the head's classes, plain or each voxel weighted by 1 / sqrt(its class's count), in
    float64; 0 (with a gradient) for a set without such voxels."""
    sv = _random_sparse(80, 5, 1, 6, 2, 3, out_of_grid=False)
    g = torch.Generator().manual_seed(4)
    sem = torch.randint(0, 7, (2, 6, 6, 6), generator=g)  # 0 unlabelled; 5 and 6 past the 5 classes
    terms = []
    for (b, *c), row in zip(sv.coords.tolist(), sv.feats.tolist(), strict=True):
        label = int(sem[b, c[0], c[1], c[2]])
        if 0 < label < 5:
            terms.append((label, math.log(sum(math.exp(v) for v in row)) - row[label]))
    assert terms
    plain = semantic_loss_sparse(sv, sem.to(torch.uint8), balance=False).item()
    assert math.isclose(plain, sum(t for _, t in terms) / len(terms), rel_tol=1e-12)
    count = {c: sum(1 for lab, _ in terms if lab == c) for c, _ in terms}
    weights = [1 / math.sqrt(count[lab]) for lab, _ in terms]
    balanced = sum(w * t for w, (_, t) in zip(weights, terms, strict=True)) / sum(weights)
    assert math.isclose(semantic_loss_sparse(sv, sem.to(torch.uint8)).item(), balanced, rel_tol=1e-12)
    empty = torch.zeros(2, 6, 6, 6, dtype=torch.uint8)
    feats = sv.feats.clone().requires_grad_(True)
    loss = semantic_loss_sparse(sv.replace_feats(feats), empty)
    loss.backward()
    assert loss.item() == 0.0 and feats.grad is not None and not feats.grad.any()
