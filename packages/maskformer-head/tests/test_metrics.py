"""2D PQ and depth-aware PQ: brute force, torchmetrics, accumulation, depth voiding."""

from __future__ import annotations

import math

import pytest
import torch
from maskformer_head import DepthAwarePanopticQuality, image_pq_stats, image_segment_matching

THINGS, STUFFS, NUM = [1, 2, 3], [4, 5], 7  # class 0 and 6 are void


def _segments(sem, inst, things, stuffs):
    """{(class, instance or 0 for stuff): bool mask} by explicit enumeration."""
    segs = {}
    for c in things + stuffs:
        cls_mask = sem == c
        if not cls_mask.any():
            continue
        if c in stuffs:
            segs[(c, 0)] = cls_mask
        else:
            for i in inst[cls_mask].unique().tolist():
                segs[(c, i)] = cls_mask & (inst == i)
    return segs


def brute_stats(ps, pi, gs, gi, things=THINGS, stuffs=STUFFS, num=NUM, void_mode="symmetric"):
    """Panoptic evaluation written out segment pair by segment pair."""
    stats = torch.zeros(num, 4, dtype=torch.float64)
    preds, gts = _segments(ps, pi, things, stuffs), _segments(gs, gi, things, stuffs)
    gt_void = ~torch.isin(gs, torch.tensor(things + stuffs))
    pred_void = ~torch.isin(ps, torch.tensor(things + stuffs))
    symmetric = void_mode == "symmetric"
    matched_p, matched_g = set(), set()
    for gk, gm in gts.items():
        for pk, pm in preds.items():
            if gk[0] != pk[0]:
                continue
            inter = (gm & pm).sum().item()
            union = (gm | pm).sum().item() - (pm & gt_void).sum().item()
            if symmetric:
                union -= (gm & pred_void).sum().item()
            if inter / union > 0.5:
                stats[gk[0], 0] += inter / union
                stats[gk[0], 1] += 1
                matched_p.add(pk)
                matched_g.add(gk)
    for gk in gts:
        mostly_void = (gts[gk] & pred_void).sum().item() / gts[gk].sum().item() > 0.5
        if gk not in matched_g and not (symmetric and mostly_void):
            stats[gk[0], 3] += 1
    for pk, pm in preds.items():
        if pk not in matched_p and (pm & gt_void).sum().item() / pm.sum().item() <= 0.5:
            stats[pk[0], 2] += 1
    return stats


def _random_scene(g, h=12, w=14, blocks=4):
    """Blocky random panoptic maps so that some segments overlap well and some do not."""
    sem = torch.randint(0, NUM, (h // blocks + 1, w // blocks + 1), generator=g)
    inst = torch.randint(0, 3, sem.shape, generator=g)
    up = lambda t: t.repeat_interleave(blocks, 0).repeat_interleave(blocks, 1)[:h, :w]  # noqa: E731
    return up(sem), up(inst)


def _perturb(g, sem, inst, p=0.15):
    flip = torch.rand(sem.shape, generator=g) < p
    return (torch.where(flip, torch.randint(0, NUM, sem.shape, generator=g), sem),
            torch.where(flip, torch.randint(0, 3, sem.shape, generator=g), inst))


@pytest.mark.parametrize("void_mode", ["symmetric", "coco"])
@pytest.mark.parametrize("seed", range(10))
def test_image_stats_match_brute_force(seed, void_mode):
    g = torch.Generator().manual_seed(seed)
    gs, gi = _random_scene(g)
    ps, pi = _perturb(g, gs, gi, p=0.05 + 0.05 * (seed % 4))
    ours = image_pq_stats(ps, pi, gs, gi, NUM, torch.tensor(THINGS), torch.tensor(STUFFS), void_mode=void_mode)
    ref = brute_stats(ps, pi, gs, gi, void_mode=void_mode)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("void_mode", ["symmetric", "coco"])
@pytest.mark.parametrize("seed", range(4))
def test_segment_matching_iou_matches_brute_force(seed, void_mode):
    # every (GT, predicted) pair's IoU, not only the matched ones: what nvp3d's thing outcomes read
    g = torch.Generator().manual_seed(100 + seed)
    gs, gi = _random_scene(g)
    ps, pi = _perturb(g, gs, gi, p=0.2)
    m = image_segment_matching(ps, pi, gs, gi, torch.tensor(THINGS), torch.tensor(STUFFS), void_mode=void_mode)
    preds, gts = _segments(ps, pi, THINGS, STUFFS), _segments(gs, gi, THINGS, STUFFS)
    gt_void = ~torch.isin(gs, torch.tensor(THINGS + STUFFS))
    pred_void = ~torch.isin(ps, torch.tensor(THINGS + STUFFS))
    assert m["iou"].shape == (len(gts), len(preds))
    assert sorted(m["gt_labels"].tolist()) == sorted(k[0] for k in gts)
    n_match = 0
    for gk, gm in gts.items():
        for pk, pm in preds.items():
            inter = (gm & pm).sum().item()
            union = (gm | pm).sum().item() - (pm & gt_void).sum().item()
            if void_mode == "symmetric":
                union -= (gm & pred_void).sum().item()
            ref = inter / union if inter else 0.0
            # segments are enumerated in sorted (class, instance) order on both sides
            gi_, pi_ = sorted(gts).index(gk), sorted(preds).index(pk)
            assert m["iou"][gi_, pi_].item() == pytest.approx(ref, abs=1e-12)
            assert bool(m["match"][gi_, pi_]) == (gk[0] == pk[0] and ref > 0.5)
            n_match += gk[0] == pk[0] and ref > 0.5
    assert n_match > 0 and int(m["match"].sum()) == n_match


def test_update_returns_plain_pq_matching_per_image():
    # the matching behind the t = -1 statistics, handed back so that callers need not match a second time
    g = torch.Generator().manual_seed(7)
    scenes = [_random_scene(g) for _ in range(2)]
    gs = torch.stack([s[0] for s in scenes])
    gi = torch.stack([s[1] for s in scenes])
    ps, pi = _perturb(g, gs, gi)
    depth = torch.ones(gs.shape)
    metric = DepthAwarePanopticQuality(NUM, THINGS, STUFFS)
    plain = metric.update(ps, pi, gs, gi, depth, depth)
    assert len(plain) == 2
    for b, m in enumerate(plain):
        ref = image_segment_matching(ps[b], pi[b], gs[b], gi[b], torch.tensor(THINGS), torch.tensor(STUFFS))
        assert all(torch.equal(m[k], ref[k]) for k in ref)
    assert DepthAwarePanopticQuality(NUM, THINGS, STUFFS, thresholds=(0.5,)).update(ps, pi, gs, gi, depth, depth) == []


def test_void_prediction_overlap_is_not_false_positive():
    gs = torch.zeros(4, 4, dtype=torch.long)  # all void
    gs[:, :2] = 1
    gi = torch.zeros_like(gs)
    ps = torch.full_like(gs, 2)  # class-2 prediction lying 50% on void, 50% on class 1
    pi = torch.zeros_like(gs)
    stats = image_pq_stats(ps, pi, gs, gi, NUM, torch.tensor(THINGS), torch.tensor(STUFFS))
    assert stats[2, 2] == 1  # exactly half on void -> still a false positive (rule is "> 0.5")
    ps[:, 1] = 0  # now 75% of the prediction is on void
    stats = image_pq_stats(ps, pi, gs, gi, NUM, torch.tensor(THINGS), torch.tensor(STUFFS))
    # ... and the class-1 ground truth, half predicted void and half class 2, is a false negative
    assert stats[2, 2] == 0 and stats[1, 3] == 1
    ps[:, 0] = 0  # ground truth now entirely predicted void: no false negative in symmetric mode
    sym = image_pq_stats(ps, pi, gs, gi, NUM, torch.tensor(THINGS), torch.tensor(STUFFS))
    coco = image_pq_stats(ps, pi, gs, gi, NUM, torch.tensor(THINGS), torch.tensor(STUFFS), void_mode="coco")
    assert sym[1, 3] == 0 and coco[1, 3] == 1


def test_matches_torchmetrics_panoptic_quality():
    tm = pytest.importorskip("torchmetrics.detection")
    g = torch.Generator().manual_seed(7)
    metric = DepthAwarePanopticQuality(NUM, THINGS, STUFFS, thresholds=[-1.0])
    ref = tm.PanopticQuality(things=set(THINGS), stuffs=set(STUFFS), allow_unknown_preds_category=True,
                             return_per_class=True)
    preds, targets = [], []
    for _ in range(6):
        gs, gi = _random_scene(g)
        ps, pi = _perturb(g, gs, gi)
        # torchmetrics has one void id; map our void classes onto a single unknown one
        gs_tm = torch.where(torch.isin(gs, torch.tensor(THINGS + STUFFS)), gs, torch.full_like(gs, 0))
        ps_tm = torch.where(torch.isin(ps, torch.tensor(THINGS + STUFFS)), ps, torch.full_like(ps, 0))
        metric.update(ps, pi, gs, gi)
        preds.append(torch.stack([ps_tm, pi], -1))
        targets.append(torch.stack([gs_tm, gi], -1))
    ref.update(torch.stack(preds), torch.stack(targets))
    per_class_ref = ref.compute().flatten()
    stats = metric.stats[0]
    classes = sorted(THINGS + STUFFS)
    iou, tp, fp, fn = stats[classes].unbind(-1)
    den = tp + 0.5 * fp + 0.5 * fn
    ours = torch.where(den > 0, iou / den.clamp_min(1e-12), torch.zeros_like(den))
    torch.testing.assert_close(ours.float(), per_class_ref.float(), rtol=1e-5, atol=1e-6)
    assert metric.compute()[-1.0]["pq"] == pytest.approx(ours[den > 0].mean().item(), rel=1e-12)


def test_accumulation_across_batches_and_processes_is_a_sum():
    g = torch.Generator().manual_seed(3)
    scenes = []
    for _ in range(5):
        gs, gi = _random_scene(g)
        ps, pi = _perturb(g, gs, gi)
        gd = torch.rand(gs.shape, generator=g) * 4 + 0.5
        gd[0] = 0  # invalid depth row
        pd = gd * (1 + (torch.rand(gs.shape, generator=g) - 0.5) * 0.6)
        scenes.append((ps, pi, gs, gi, pd, gd))
    whole = DepthAwarePanopticQuality(NUM, THINGS, STUFFS)
    whole.update(*[torch.stack([s[k] for s in scenes]) for k in range(6)])
    rank0, rank1 = (DepthAwarePanopticQuality(NUM, THINGS, STUFFS) for _ in range(2))
    for s in scenes[:2]:
        rank0.update(*s)
    for s in scenes[2:]:
        rank1.update(*s)
    rank0.merge(rank1)
    torch.testing.assert_close(rank0.stats, whole.stats)
    res = whole.compute()
    assert set(res) == {-1.0, 0.5, 0.25, 0.1, "averages"}
    assert res["averages"]["pq"] == pytest.approx((res[0.5]["pq"] + res[0.25]["pq"] + res[0.1]["pq"]) / 3)


def test_depth_thresholds_void_bad_pixels():
    g = torch.Generator().manual_seed(11)
    gs, gi = _random_scene(g)
    ps, pi = gs.clone(), gi.clone()  # perfect segmentation
    gd = torch.rand(gs.shape, generator=g) * 4 + 0.5
    gd[:, :2] = 0
    rel = torch.rand(gs.shape, generator=g) * 0.6  # relative errors 0..0.6
    pd = gd * (1 + rel)
    metric = DepthAwarePanopticQuality(NUM, THINGS, STUFFS)
    metric.update(ps, pi, gs, gi, pd, gd)
    for ti, t in enumerate(metric.thresholds):
        if t > 0:
            bad = (gd > 0) & (rel > t)
            ps_t = torch.where(bad, torch.zeros_like(ps), ps)  # 0 is a void class here
            ref = brute_stats(ps_t, pi, gs, gi)
        else:
            ref = brute_stats(ps, pi, gs, gi)
        torch.testing.assert_close(metric.stats[ti], ref, rtol=0, atol=1e-12)
    res = metric.compute()
    assert res[-1.0]["pq"] == pytest.approx(1.0)
    assert res[0.1]["pq"] <= res[0.25]["pq"] <= res[0.5]["pq"] <= 1.0


def test_empty_and_bad_configuration():
    metric = DepthAwarePanopticQuality(NUM, THINGS, STUFFS, thresholds=[-1.0])
    assert math.isnan(metric.compute()[-1.0]["pq"])
    with pytest.raises(ValueError, match="both thing and stuff"):
        DepthAwarePanopticQuality(NUM, [1, 2], [2, 3])
    with pytest.raises(ValueError, match="need pred_depth"):
        DepthAwarePanopticQuality(NUM, THINGS, STUFFS).update(*(torch.zeros(2, 2, dtype=torch.long),) * 4)



_WORKER = """
import sys, torch, torch.distributed as dist
from maskformer_head import DepthAwarePanopticQuality
rank, world, init, data, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=world)
cfg, scenes = torch.load(data)
metric = DepthAwarePanopticQuality(*cfg, thresholds=[-1.0])
for s in scenes[rank::world]:
    metric.update(*s)
metric.sync()
if rank == 0:
    torch.save(metric.stats, out)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_sync_sums_statistics_over_processes(tmp_path):
    """Two gloo processes each see half of the images; after sync() rank 0 holds the total."""
    import subprocess
    import sys

    g = torch.Generator().manual_seed(5)
    scenes = []
    for _ in range(4):
        gs, gi = _random_scene(g)
        scenes.append((*_perturb(g, gs, gi), gs, gi))
    data, out, init = tmp_path / "data.pt", tmp_path / "stats.pt", tmp_path / "init"
    torch.save(((NUM, THINGS, STUFFS), scenes), data)
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), "2", str(init), str(data), str(out)])
        for r in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    single = DepthAwarePanopticQuality(NUM, THINGS, STUFFS, thresholds=[-1.0])
    for s in scenes:
        single.update(*s)
    torch.testing.assert_close(torch.load(out), single.stats)
