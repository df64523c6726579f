"""PRQ / RSQ / RRQ: hand-checkable cases and a brute-force reference over random small volumes."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from frustum3d.metrics import (
    FRONT3D_CLASSES,
    STATS_COLUMNS,
    PanopticReconstructionQuality,
    PRQInputError,
    Segments,
    downsample_frustum,
    downsample_shell,
    frame_statistics,
    ground_truth_segments,
    ground_truth_voxel_segments,
    mask_iou,
    prediction_segments,
    segment_masks,
    segment_overlaps,
    thicken,
    voxel_segment_masks,
)

STUFF = (10, 11)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------------
# Brute-force reference: python loops over segments and voxels, numpy only.
# ----------------------------------------------------------------------------------------------------


def brute_gt_segments(inst: np.ndarray, sem: np.ndarray, stuff) -> list[tuple[int, int]]:
    """(panoptic id, label) pairs in mapping order and the panoptic volume, by loops."""
    panoptic = np.zeros(inst.shape, dtype=np.int64)
    mapping: list[tuple[int, int]] = []
    raw_ids = sorted(set(inst.flatten().tolist()) - {0})
    for rank, raw in enumerate(raw_ids, start=1):
        where = inst == raw
        panoptic[where] = rank + len(stuff)
        votes = [c for c in sem[where].tolist() if c != 0 and c not in stuff]
        if votes:
            counts = Counter(votes)
            best = max(counts.values())
            mapping.append((rank + len(stuff), min(c for c, k in counts.items() if k == best)))
    for index, c in enumerate(stuff):
        if (sem == c).any():
            panoptic[sem == c] = index + 1
            mapping.append((index + 1, c))
    return mapping, panoptic


def brute_mask(panoptic, seg_id, tdf, frustum, iso, factor) -> np.ndarray:
    dist = np.where(panoptic == seg_id, tdf.astype(np.float32), np.float32(3.0))
    shell = np.abs(dist) < iso
    if factor > 1:
        n = [s // factor for s in shell.shape]
        pooled = np.zeros(n, dtype=bool)
        for i, j, k in itertools.product(*(range(s) for s in n)):
            window = shell[
                max(i * factor - 1, 0) : i * factor + factor,
                max(j * factor - 1, 0) : j * factor + factor,
                max(k * factor - 1, 0) : k * factor + factor,
            ]
            pooled[i, j, k] = window.any()
        shell = pooled
        frustum = frustum[::factor, ::factor, ::factor]
    out = np.zeros(shell.shape, dtype=bool)
    for p in zip(*np.nonzero(shell)):
        for o in itertools.product(range(3), repeat=3):
            q = tuple(a + b for a, b in zip(p, o))
            if all(0 <= a < s for a, s in zip(q, shell.shape)):
                out[q] = True
    return out & frustum


def brute_prq(samples, classes, stuff, iso=1.0, factor=1, threshold=0.25):
    stats = {c: [0.0, 0, 0, 0, 0] for c in classes}
    for inst, sem, gt_tdf, pred_pan, pred_map, pred_tdf, frustum in samples:
        gt_map, gt_pan = brute_gt_segments(inst, sem, stuff)
        gt = [(brute_mask(gt_pan, i, gt_tdf, frustum, iso, factor), c) for i, c in gt_map]
        pred = [(brute_mask(pred_pan, i, pred_tdf, frustum, iso, factor), c) for i, c in pred_map.items()]
        used = set()
        matched_gt = set()
        for g, (gm, gc) in enumerate(gt):
            stats[gc][4] += 1
            for p, (pm, pc) in enumerate(pred):
                if p in used or pc != gc:
                    continue
                union = (gm | pm).sum()
                iou = float((gm & pm).sum()) / float(union) if union else 0.0
                if iou > threshold:
                    stats[gc][0] += iou
                    stats[gc][1] += 1
                    used.add(p)
                    matched_gt.add(g)
                    break
        for g, (_, gc) in enumerate(gt):
            if g not in matched_gt:
                stats[gc][3] += 1
        for p, (_, pc) in enumerate(pred):
            if p not in used:
                stats[pc][2] += 1
    per = {}
    for c, (iou, tp, fp, fn, n) in stats.items():
        if tp + fp + fn == 0 or n == 0:
            continue
        d = tp + 0.5 * fp + 0.5 * fn
        per[c] = (iou / d, iou / tp if tp else 0.0, tp / d)
    means = [sum(v[k] for v in per.values()) / len(per) for k in range(3)]
    return means, per, stats


def random_scene(rng: np.random.Generator, n: int):
    """Small random scene: box things with noisy labels, wall / floor slabs, a perturbed prediction."""
    inst = np.zeros((n, n, n), dtype=np.int32)
    sem = np.zeros((n, n, n), dtype=np.int32)
    for _ in range(rng.integers(2, 6)):
        lo = rng.integers(0, n - 2, 3)
        hi = np.minimum(lo + rng.integers(2, 6, 3), n)
        region = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        inst[region] = rng.integers(1, 40)
        main = rng.integers(1, 10)
        labels = np.where(rng.random(inst[region].shape) < 0.75, main, rng.integers(0, 12, inst[region].shape))
        sem[region] = labels
    if rng.random() < 0.8:
        sem[:2][inst[:2] == 0] = 10
        sem[0, :, :] = np.where(rng.random((n, n)) < 0.1, 10, sem[0])  # some thing voxels labelled wall
    if rng.random() < 0.8:
        sem[:, -2:][inst[:, -2:] == 0] = 11
    gt_tdf = (rng.integers(0, 25, (n, n, n)) / 8.0).astype(np.float32)

    # prediction: GT-like ids, shifted by up to one voxel, some relabelled, extra and missing segments
    shift = rng.integers(-1, 2, 3)
    source = np.where(sem >= 10, sem - 9, np.where(inst > 0, inst + 2, 0))
    pred_pan = np.roll(source, shift, axis=(0, 1, 2)).astype(np.int32)
    pred_pan[rng.random(pred_pan.shape) < 0.05] = 0
    mapping = {}
    for seg_id in sorted(set(pred_pan.flatten().tolist()) - {0}):
        if rng.random() < 0.1:
            continue  # voxels of an unmapped id are not a segment
        if seg_id <= 2:
            mapping[seg_id] = seg_id + 9
        else:
            mapping[seg_id] = int(rng.integers(1, 10)) if rng.random() < 0.5 else int(np.bincount(
                np.clip(sem[inst == seg_id - 2], 1, 9) if (inst == seg_id - 2).any() else [1]).argmax())
    if rng.random() < 0.5:
        mapping[99] = int(rng.integers(1, 12))  # id without voxels: empty mask
    if rng.random() < 0.5:
        mapping[pred_pan.max() + 1 if pred_pan.max() > 0 else 50] = 8
    pred_tdf = (gt_tdf + rng.integers(-4, 5, gt_tdf.shape) / 8.0) * np.where(rng.random(gt_tdf.shape) < 0.3, -1, 1)
    pred_tdf = np.clip(pred_tdf, -3.0, 3.0).astype(np.float32)
    frustum = rng.random((n, n, n)) < 0.85
    return inst, sem, gt_tdf, pred_pan, mapping, pred_tdf, frustum


def _to_torch(sample):
    inst, sem, gt_tdf, pred_pan, mapping, pred_tdf, frustum = sample
    return (
        torch.from_numpy(inst),
        torch.from_numpy(sem),
        torch.from_numpy(gt_tdf),
        torch.from_numpy(pred_pan),
        mapping,
        torch.from_numpy(pred_tdf),
        torch.from_numpy(frustum),
    )


@pytest.mark.parametrize(("factor", "iso", "n"), [(1, 1.0, 9), (2, 2.0, 10)])
def test_matches_brute_force_on_random_scenes(factor: int, iso: float, n: int) -> None:
    rng = np.random.default_rng(1234 + factor)
    samples = [random_scene(rng, n) for _ in range(8)]
    stuff = STUFF if factor == 1 else (10, 11, 12)
    metric = PanopticReconstructionQuality(FRONT3D_CLASSES, stuff, iso_value=iso, downsample_factor=factor)
    for sample in samples:
        metric.add(*_to_torch(sample))
    (pq, sq, rq), per, stats = brute_prq(samples, FRONT3D_CLASSES, stuff, iso=iso, factor=factor)

    got = metric.stats
    for c, row in stats.items():
        assert got[c, 1:].tolist() == [float(v) for v in row[1:]], f"class {c} counts"
        assert abs(float(got[c, 0]) - row[0]) <= 1e-12
    assert sum(row[1] for row in stats.values()) > 5, "random scenes should produce matches"
    result = metric.compute()
    assert abs(result["PRQ"] - pq) <= 1e-12
    assert abs(result["RSQ"] - sq) <= 1e-12
    assert abs(result["RRQ"] - rq) <= 1e-12
    assert result["num_classes_counted"] == len(per)


def test_gt_segments_and_masks_match_brute_force() -> None:
    rng = np.random.default_rng(7)
    for _ in range(5):
        inst, sem, gt_tdf, _, _, _, frustum = random_scene(rng, 8)
        segments = ground_truth_segments(torch.from_numpy(inst), torch.from_numpy(sem), STUFF)
        mapping, panoptic = brute_gt_segments(inst, sem, STUFF)
        assert list(zip(segments.ids.tolist(), segments.labels.tolist())) == mapping
        assert np.array_equal(segments.panoptic.numpy(), panoptic)
        masks = segment_masks(segments, torch.from_numpy(gt_tdf), torch.from_numpy(frustum))
        for mask, (seg_id, _) in zip(masks, mapping):
            assert np.array_equal(mask.numpy(), brute_mask(panoptic, seg_id, gt_tdf, frustum, 1.0, 1))


def test_downsample_path_matches_torch_pooling() -> None:
    """f=2: shell max-pooled with F.max_pool3d(k3, s2, p1), frustum nearest-resized with F.interpolate."""
    rng = np.random.default_rng(3)
    n = 12
    panoptic = torch.from_numpy(rng.integers(0, 4, (n, n, n)).astype(np.int32))
    tdf = torch.from_numpy((rng.integers(0, 25, (n, n, n)) / 8.0).astype(np.float32))
    frustum = torch.from_numpy(rng.random((n, n, n)) < 0.7)
    segments = Segments(panoptic, torch.tensor([1, 2, 3]), torch.tensor([1, 2, 10]))
    masks = segment_masks(segments, tdf, frustum, iso_value=2.0, downsample_factor=2)
    small_frustum = F.interpolate(frustum[None, None].float(), size=[n // 2] * 3, mode="nearest")[0, 0].bool()
    for j, seg_id in enumerate((1, 2, 3)):
        shell = ((panoptic == seg_id) & (torch.where(panoptic == seg_id, tdf, 3.0).abs() < 2.0)).float()
        pooled = F.max_pool3d(shell[None, None], kernel_size=3, stride=2, padding=1)[0, 0].bool()
        thick = F.max_pool3d(F.pad(pooled.float(), (2, 0, 2, 0, 2, 0))[None, None], 3, stride=1)[0, 0].bool()
        assert torch.equal(masks[j], thick & small_frustum)


# ----------------------------------------------------------------------------------------------------
# Hand-checkable cases on a [10, 1, 1] line grid: a shell voxel x thickens to x, x+1, x+2.
# ----------------------------------------------------------------------------------------------------


def _line(ids: dict[int, range], n: int = 10) -> torch.Tensor:
    volume = torch.zeros(n, 1, 1, dtype=torch.int32)
    for seg_id, xs in ids.items():
        volume[list(xs), 0, 0] = seg_id
    return volume


def _line_metric_add(metric, gt_things: dict[int, tuple[range, int]], pred: dict[int, tuple[range, int]]):
    """GT instances (raw id -> (shell range, class)), prediction (id -> (shell range, class))."""
    n = 10
    inst = _line({raw: xs for raw, (xs, _) in gt_things.items()}, n)
    sem = torch.zeros_like(inst)
    for _, (xs, c) in gt_things.items():
        sem[list(xs), 0, 0] = c
    zeros = torch.zeros(n, 1, 1)
    pred_pan = _line({i: xs for i, (xs, _) in pred.items()}, n)
    mapping = {i: c for i, (_, c) in pred.items()}
    return metric.add(inst, sem, zeros, pred_pan, mapping, zeros, None)


def test_identical_prediction_scores_one() -> None:
    metric = PanopticReconstructionQuality(FRONT3D_CLASSES, STUFF)
    _line_metric_add(metric, {5: (range(0, 3), 3), 9: (range(5, 7), 1)}, {1: (range(0, 3), 3), 2: (range(5, 7), 1)})
    result = metric.compute()
    assert (result["PRQ"], result["RSQ"], result["RRQ"]) == (1.0, 1.0, 1.0)
    assert result["PRQ_th"] == 1.0 and math.isnan(result["PRQ_st"])
    assert result["per_class"][3]["tp"] == 1 and result["per_class"][1]["tp"] == 1


def test_iou_exactly_quarter_is_not_a_match() -> None:
    # GT shell 0..2 -> mask 0..4 (5 voxels); pred shell 3..5 -> mask 3..7; inter {3,4} = 2, union 8.
    metric = PanopticReconstructionQuality(FRONT3D_CLASSES, STUFF)
    stats = _line_metric_add(metric, {4: (range(0, 3), 2)}, {1: (range(3, 6), 2)})
    assert stats[2].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    result = metric.compute()
    assert (result["PRQ"], result["RSQ"], result["RRQ"]) == (0.0, 0.0, 0.0)
    # one voxel closer: inter 3, union 7 -> matched
    metric.reset()
    stats = _line_metric_add(metric, {4: (range(0, 3), 2)}, {1: (range(2, 5), 2)})
    assert stats[2].tolist() == [3 / 7, 1.0, 0.0, 0.0, 1.0]


def test_first_match_in_mapping_order_wins() -> None:
    gt = {4: (range(0, 3), 2)}  # mask 0..4
    worse = (range(3, 5), 2)  # mask 3..6: IoU 2/7 > 0.25
    exact = (range(0, 3), 2)  # mask 0..4: IoU 1
    metric = PanopticReconstructionQuality(FRONT3D_CLASSES, STUFF)
    stats = _line_metric_add(metric, gt, {1: worse, 2: exact})
    assert stats[2].tolist() == [2 / 7, 1.0, 1.0, 0.0, 1.0]  # the earlier, worse one is the TP
    stats = _line_metric_add(metric, gt, {2: exact, 1: worse})
    assert stats[2].tolist() == [1.0, 1.0, 1.0, 0.0, 1.0]  # mapping order, not id order


def test_class_with_only_false_positives_is_excluded() -> None:
    metric = PanopticReconstructionQuality(FRONT3D_CLASSES, STUFF)
    _line_metric_add(metric, {4: (range(0, 3), 2)}, {1: (range(0, 3), 2), 2: (range(6, 8), 8)})
    result = metric.compute()
    assert result["per_class"][8]["fp"] == 1 and not result["per_class"][8]["counted"]
    assert result["PRQ"] == 1.0 and result["num_classes_counted"] == 1


def test_voxel_at_grid_edge_thickens_only_inside_the_grid() -> None:
    n = 5
    panoptic = torch.zeros(n, n, n, dtype=torch.int32)
    panoptic[n - 1, n - 1, n - 1] = 1
    panoptic[n - 2, 0, n - 2] = 2
    segments = Segments(panoptic, torch.tensor([1, 2]), torch.tensor([1, 2]))
    masks = segment_masks(segments, torch.zeros(n, n, n))
    assert masks[0].sum() == 1 and bool(masks[0][n - 1, n - 1, n - 1])
    expected = torch.zeros(n, n, n, dtype=torch.bool)
    expected[n - 2 :, 0:3, n - 2 :] = True
    assert torch.equal(masks[1], expected)


def test_gt_segment_rules() -> None:
    n = 6
    inst = torch.zeros(n, n, n, dtype=torch.int32)
    sem = torch.zeros_like(inst)
    inst[0, 0, 0:4] = 7
    sem[0, 0, 0:4] = torch.tensor([3, 3, 10, 0])  # majority 3; the wall voxel goes to the wall segment
    inst[1, 0, 0:2] = 2
    sem[1, 0, 0:2] = 10  # only stuff labels: not a segment
    inst[2, 0, 0:4] = 30
    sem[2, 0, 0:4] = torch.tensor([5, 4, 5, 4])  # tie -> smallest label
    sem[5, 5, 5] = 11
    segments = ground_truth_segments(inst, sem, STUFF)
    # sorted raw ids 2, 7, 30 -> ranks 1, 2, 3 -> panoptic ids 3, 4, 5; id 3 has no segment
    assert segments.ids.tolist() == [4, 5, 1, 2]
    assert segments.labels.tolist() == [3, 4, 10, 11]
    assert segments.panoptic[0, 0].tolist()[:4] == [4, 4, 1, 4]
    assert segments.panoptic[1, 0, 0] == 1


def test_empty_gt_mask_counts_in_n_and_as_false_negative() -> None:
    n = 4
    inst = torch.zeros(n, n, n, dtype=torch.int32)
    sem = torch.zeros_like(inst)
    inst[0, 0, 0] = 1
    sem[0, 0, 0] = 6
    frustum = torch.ones(n, n, n, dtype=torch.bool)
    frustum[:3, :3, :3] = False  # the thing's thickened mask lies outside the frustum
    metric = PanopticReconstructionQuality(FRONT3D_CLASSES, STUFF)
    stats = metric.add(inst, sem, torch.zeros(n, n, n), torch.zeros_like(inst), {}, torch.zeros(n, n, n), frustum)
    assert stats[6].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_per_sample_stats_sum_to_the_one_shot_result() -> None:
    rng = np.random.default_rng(11)
    samples = [_to_torch(random_scene(rng, 8)) for _ in range(6)]
    one_shot = PanopticReconstructionQuality(FRONT3D_CLASSES, STUFF)
    per_sample = [one_shot.add(*s) for s in samples]
    summed = torch.stack(per_sample).sum(0)
    assert torch.equal(summed[:, 1:], one_shot.stats[:, 1:])
    torch.testing.assert_close(summed[:, 0], one_shot.stats[:, 0], rtol=0, atol=1e-12)

    # two "processes", merged / loaded
    left = PanopticReconstructionQuality(FRONT3D_CLASSES, STUFF)
    right = PanopticReconstructionQuality(FRONT3D_CLASSES, STUFF)
    for i, s in enumerate(samples):
        (left if i % 2 else right).add(*s)
    merged = PanopticReconstructionQuality(FRONT3D_CLASSES, STUFF)
    merged.load_stats(left.stats + right.stats)
    left.merge(right)
    for metric in (left, merged):
        assert torch.equal(metric.stats[:, 1:], one_shot.stats[:, 1:])
        a, b = metric.compute(), one_shot.compute()
        for key in ("PRQ", "RSQ", "RRQ", "PRQ_th", "PRQ_st"):
            assert abs(a[key] - b[key]) <= 1e-12
    one_shot.reset()
    assert one_shot.stats.abs().sum() == 0


def test_thing_stuff_split_is_the_mean_over_each_group() -> None:
    metric = PanopticReconstructionQuality(FRONT3D_CLASSES, STUFF)
    stats = torch.zeros(13, 5, dtype=torch.float64)
    stats[1] = torch.tensor([0.5, 1, 1, 0, 1], dtype=torch.float64)  # pq 0.5/1.5
    stats[3] = torch.tensor([0.0, 0, 0, 2, 2], dtype=torch.float64)  # pq 0
    stats[10] = torch.tensor([1.8, 2, 0, 0, 2], dtype=torch.float64)  # pq 0.9
    stats[8] = torch.tensor([0.0, 0, 4, 0, 0], dtype=torch.float64)  # fp only: excluded
    metric.load_stats(stats)
    result = metric.compute()
    assert result["PRQ_th"] == pytest.approx((0.5 / 1.5 + 0.0) / 2, abs=1e-15)
    assert result["PRQ_st"] == pytest.approx(0.9, abs=1e-15)
    assert result["PRQ"] == pytest.approx((0.5 / 1.5 + 0.0 + 0.9) / 3, abs=1e-15)
    assert result["RSQ_th"] == pytest.approx(0.25, abs=1e-15)  # (0.5 / 1 + 0) / 2
    assert result["RRQ_st"] == 1.0


def test_bad_inputs_raise_clear_errors() -> None:
    metric = PanopticReconstructionQuality(FRONT3D_CLASSES, STUFF)
    vol = torch.zeros(4, 4, 4, dtype=torch.int32)
    tdf = torch.zeros(4, 4, 4)
    with pytest.raises(PRQInputError, match="not in `classes`"):
        metric.add(vol, vol, tdf, vol, {1: 42}, tdf)
    with pytest.raises(PRQInputError, match="segment id 0"):
        metric.add(vol, vol, tdf, vol, {0: 1}, tdf)
    with pytest.raises(PRQInputError, match="differs"):
        metric.add(vol, vol[:3], tdf, vol, {}, tdf)
    with pytest.raises(PRQInputError, match="truncation"):
        PanopticReconstructionQuality(FRONT3D_CLASSES, STUFF, iso_value=2.0, truncation=1.0)
    with pytest.raises(PRQInputError, match="divisible"):
        PanopticReconstructionQuality(FRONT3D_CLASSES, STUFF, downsample_factor=2).add(
            torch.zeros(5, 5, 5, dtype=torch.int32), torch.zeros(5, 5, 5, dtype=torch.int32),
            torch.zeros(5, 5, 5), torch.zeros(5, 5, 5, dtype=torch.int32), {}, torch.zeros(5, 5, 5))
    with pytest.raises(PRQInputError, match="isthing=False"):
        PanopticReconstructionQuality(FRONT3D_CLASSES, (1,))
    with pytest.raises(PRQInputError, match="shape"):
        metric.load_stats(torch.zeros(3, 5))


def test_many_segments_use_several_bit_words() -> None:
    """More than 63 segments per sample (several int64 words) still match the brute force."""
    rng = np.random.default_rng(5)
    n = 12
    inst = np.zeros((n, n, n), dtype=np.int32)
    sem = np.zeros((n, n, n), dtype=np.int32)
    for k in range(80):
        x, y, z = rng.integers(0, n, 3)
        inst[x, y, z] = k + 1
        sem[x, y, z] = 1 + k % 9
    gt_tdf = np.zeros((n, n, n), dtype=np.float32)
    pred_pan = np.roll(inst, 1, axis=0)
    mapping = {k + 1: 1 + k % 9 for k in range(80)}
    frustum = np.ones((n, n, n), dtype=bool)
    sample = (inst, sem, gt_tdf, pred_pan, mapping, gt_tdf, frustum)
    metric = PanopticReconstructionQuality(FRONT3D_CLASSES, STUFF)
    metric.add(*_to_torch(sample))
    (pq, sq, rq), _, stats = brute_prq([sample], FRONT3D_CLASSES, STUFF)
    for c, row in stats.items():
        assert metric.stats[c, 1:].tolist() == [float(v) for v in row[1:]]
    assert abs(metric.compute()["PRQ"] - pq) <= 1e-12


def test_input_forms_give_identical_results() -> None:
    """numpy inputs, [M, 2] mapping rows, huge raw instance ids and 4D [1, X, Y, Z] volumes."""
    rng = np.random.default_rng(21)
    inst, sem, gt_tdf, pred_pan, mapping, pred_tdf, frustum = random_scene(rng, 8)
    reference = PanopticReconstructionQuality(FRONT3D_CLASSES, STUFF)
    expected = reference.add(*_to_torch((inst, sem, gt_tdf, pred_pan, mapping, pred_tdf, frustum)))
    rows = torch.tensor(list(mapping.items()), dtype=torch.long)
    huge = inst.astype(np.int64) * 1_000_000_007  # same order of raw ids, far beyond a lookup table
    variants = [
        (inst, sem, gt_tdf, pred_pan, mapping, pred_tdf, frustum),
        (torch.from_numpy(huge), sem, gt_tdf, pred_pan, rows, pred_tdf, frustum),
        (inst[None], sem[None], gt_tdf[None], pred_pan[None], mapping, pred_tdf[None], frustum[None]),
    ]
    for variant in variants:
        metric = PanopticReconstructionQuality(FRONT3D_CLASSES, STUFF)
        assert torch.equal(metric.add(*variant), expected)


# ----------------------------------------------------------------------------------------------------
# Per-frame statistics from ready GT masks, the voxel-form GT segments and the dense mask helpers.
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("factor", "iso", "n"), [(1, 1.0, 9), (2, 2.0, 10)])
def test_frame_statistics_matches_brute_force(factor: int, iso: float, n: int) -> None:
    rng = np.random.default_rng(99 + factor)
    stuff = STUFF if factor == 1 else (10, 11, 12)
    metric = PanopticReconstructionQuality(FRONT3D_CLASSES, stuff, iso_value=iso, downsample_factor=factor)
    matched = 0
    for _ in range(6):
        sample = random_scene(rng, n)
        inst, sem, gt_tdf, pred_pan, mapping, pred_tdf, frustum = sample
        gt_map, gt_pan = brute_gt_segments(inst, sem, stuff)
        gt_masks = torch.from_numpy(np.stack([brute_mask(gt_pan, i, gt_tdf, frustum, iso, factor) for i, _ in gt_map])
                                    if gt_map else np.zeros((0,) + (n // factor,) * 3, dtype=bool))
        gt_labels = torch.tensor([c for _, c in gt_map], dtype=torch.long)
        stats, details = frame_statistics(gt_masks, gt_labels, torch.from_numpy(pred_pan), mapping,
                                          torch.from_numpy(pred_tdf), torch.from_numpy(frustum),
                                          num_classes=metric.num_classes, iso_value=iso, downsample_factor=factor)
        assert stats.dtype == torch.float64 and stats.shape == (metric.num_classes, len(STATS_COLUMNS))
        _, _, brute = brute_prq([sample], FRONT3D_CLASSES, stuff, iso=iso, factor=factor)
        for c, row in brute.items():
            assert stats[c, 1:].tolist() == [float(v) for v in row[1:]], f"class {c} counts"
            assert abs(float(stats[c, 0]) - row[0]) <= 1e-12
        # the same rows, bit for bit, as the metric scoring the raw GT volumes
        assert torch.equal(stats, metric.evaluate(*_to_torch(sample)).stats)
        assert details["gt_labels"] == gt_labels.tolist() and len(details["pred_labels"]) == len(mapping)
        matched += len(details["matches"])
    assert matched > 3, "random scenes should produce matches"


def test_segment_masks_agree_with_bit_packed_overlaps() -> None:
    """segment_masks (shell scatter + boxed thickening) and segment_overlaps (bit words) are two paths to one
    definition: the dense masks' sizes and pairwise intersections equal the packed counts."""
    rng = np.random.default_rng(11)
    for factor, iso, n in ((1, 1.0, 12), (2, 2.0, 12), (4, 1.5, 16)):
        inst, sem, gt_tdf, pred_pan, mapping, pred_tdf, frustum = random_scene(rng, n)
        gt = ground_truth_segments(torch.from_numpy(inst), torch.from_numpy(sem), STUFF)
        pred = prediction_segments(torch.from_numpy(pred_pan), mapping)
        kw = dict(iso_value=iso, downsample_factor=factor)
        gm = segment_masks(gt, torch.from_numpy(gt_tdf), torch.from_numpy(frustum), **kw)
        pm = segment_masks(pred, torch.from_numpy(pred_tdf), torch.from_numpy(frustum), **kw)
        overlaps = segment_overlaps(gt, torch.from_numpy(gt_tdf), pred, torch.from_numpy(pred_tdf),
                                    torch.from_numpy(frustum), **kw)
        assert gm.sum((1, 2, 3)).tolist() == overlaps.gt_sizes.tolist()
        assert pm.sum((1, 2, 3)).tolist() == overlaps.pred_sizes.tolist()
        inter = (gm[:, None] & pm[None]).sum((2, 3, 4))
        assert torch.equal(inter, overlaps.intersection)
        assert torch.equal(mask_iou(gm, pm), overlaps.iou())


def test_voxel_form_equals_dense_ground_truth() -> None:
    """ground_truth_voxel_segments + voxel_segment_masks on the labelled voxels of (flipped) volumes with a
    signed distance field == ground_truth_segments + segment_masks on the dense volumes."""
    rng = np.random.default_rng(5)
    for factor, iso, n in ((1, 1.0, 10), (2, 2.0, 12)):
        inst, sem, gt_tdf, _, _, pred_tdf, frustum = random_scene(rng, n)
        inst, sem, tdf = inst[::-1, ::-1], sem[::-1, ::-1], pred_tdf[::-1]  # views; signed distances
        dense = ground_truth_segments(torch.from_numpy(inst.copy()), torch.from_numpy(sem.copy()), STUFF)
        expected = segment_masks(dense, torch.from_numpy(tdf.copy()), torch.from_numpy(frustum),
                                 iso_value=iso, downsample_factor=factor)
        labelled = np.flatnonzero((sem != 0) | (inst != 0))
        where = np.unravel_index(labelled, sem.shape)
        voxel = ground_truth_voxel_segments(torch.from_numpy(labelled), torch.from_numpy(inst[where]),
                                            torch.from_numpy(sem[where]), sem.shape, STUFF)
        assert torch.equal(voxel.labels, dense.labels) and torch.equal(voxel.instance_ids, dense.instance_ids)
        distance = torch.from_numpy(tdf[np.unravel_index(voxel.voxels.numpy(), sem.shape)].copy())
        got = voxel_segment_masks(voxel, distance, torch.from_numpy(frustum), iso_value=iso, downsample_factor=factor)
        assert torch.equal(got, expected)
        assert bool((torch.from_numpy(tdf.copy()) < 0).any()), "the case should exercise negative distances"
    with pytest.raises(PRQInputError, match="distance has 2 values for"):
        voxel_segment_masks(voxel, torch.zeros(2), iso_value=1.0)


def test_dense_mask_helpers_are_the_metric_operations() -> None:
    rng = np.random.default_rng(8)
    shell = torch.from_numpy(rng.random((8, 10, 6)) < 0.1)
    thick = F.max_pool3d(F.pad(shell.float(), (2, 0, 2, 0, 2, 0))[None, None], 3, stride=1)[0, 0].bool()
    assert torch.equal(thicken(shell), thick)
    pooled = F.max_pool3d(shell.float()[None, None], kernel_size=3, stride=2, padding=1)[0, 0].bool()
    assert torch.equal(downsample_shell(shell, 2), pooled)
    near = F.interpolate(shell.float()[None, None], size=[4, 5, 3], mode="nearest")[0, 0].bool()
    assert torch.equal(downsample_frustum(shell, 2), near)
    with pytest.raises(PRQInputError, match="not divisible by downsample_factor=4"):
        downsample_shell(shell, 4)


def test_frame_statistics_bad_inputs() -> None:
    pan = torch.zeros(4, 4, 4, dtype=torch.int32)
    pan[1, 1, 1] = 1
    tdf = torch.zeros(4, 4, 4)
    masks = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    kw = dict(num_classes=12, iso_value=1.0)
    with pytest.raises(PRQInputError, match=r"gt_masks are \(1, 2, 2, 2\) but the predictions evaluate at"):
        frame_statistics(masks[:, ::2, ::2, ::2], [3], pan, {1: 3}, tdf, None, **kw)
    with pytest.raises(PRQInputError, match="2 gt_labels for 1 gt_masks"):
        frame_statistics(masks, [3, 4], pan, {1: 3}, tdf, None, **kw)
    with pytest.raises(PRQInputError, match=r"predicted segment classes \[12\] are outside 1..11"):
        frame_statistics(masks, [3], pan, {1: 12}, tdf, None, **kw)
    with pytest.raises(PRQInputError, match=r"ground-truth segment classes \[0\]"):
        frame_statistics(masks, [0], pan, {1: 3}, tdf, None, **kw)
