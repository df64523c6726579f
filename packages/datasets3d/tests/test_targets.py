"""Target builders against dense / brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets3d.collate import collate_samples
from datasets3d.eval_targets import build_eval_segments, reference_segment_mask, thicken
from datasets3d.targets2d import build_instances_2d, resize_nearest
from datasets3d.targets3d import POOL_64, POOL_128, LabelIndex, pool_mask


@pytest.mark.parametrize("k,s,p", [POOL_128, POOL_64])
def test_pool_mask_equals_dense_max_pool(k, s, p):
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = np.zeros((24, 20, 28), dtype=bool)
        lo = rng.integers(0, [20, 16, 24])
        hi = lo + rng.integers(1, 5, size=3)
        m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = rng.random(tuple(hi - lo)) < 0.5
        m[lo[0], lo[1], lo[2]] = True
        idx = np.nonzero(m)
        bbox = tuple((int(a.min()), int(a.max()) + 1) for a in idx)
        dense = F.max_pool3d(torch.from_numpy(m)[None, None].float(), k, s, p)[0, 0].numpy() > 0
        np.testing.assert_array_equal(pool_mask(m, bbox, k, s, p), dense)


@pytest.mark.parametrize("layout", ["contiguous", "flip01", "flip12", "strided"])
def test_label_index_matches_brute_force(layout):
    """Labelled voxels, their ids and flat indices agree with a scan of the materialised volumes."""
    rng = np.random.default_rng(1)
    shape = (12, 16, 20)
    sem = (rng.integers(1, 5, shape) * (rng.random(shape) < 0.1)).astype(np.int32)
    ins = (rng.integers(1, 4, shape) * (rng.random(shape) < 0.1)).astype(np.int32)
    if layout == "flip01":
        sem, ins = np.flip(sem, (0, 1)), np.flip(ins, (0, 1))
    elif layout == "flip12":
        sem, ins = np.flip(sem, (1, 2)), np.flip(ins, (1, 2))
    elif layout == "strided":
        sem, ins = np.repeat(sem[:, ::2], 2, axis=1), np.asfortranarray(ins)
    index = LabelIndex(sem, ins)
    dense_sem, dense_ins = np.ascontiguousarray(sem), np.ascontiguousarray(ins)
    expected = np.flatnonzero((dense_sem != 0) | (dense_ins != 0))
    order = np.argsort(index.flat)
    np.testing.assert_array_equal(index.flat[order], expected)
    np.testing.assert_array_equal(index.sem[order], dense_sem.reshape(-1)[expected])
    np.testing.assert_array_equal(index.ins[order], dense_ins.reshape(-1)[expected])


def test_thicken_is_shifted_dilation_and_clipped_at_border():
    g = torch.zeros(6, 6, 6, dtype=torch.bool)
    g[5, 5, 5] = True
    assert thicken(g).sum() == 1  # the last voxel thickens only onto itself
    g = torch.zeros(6, 6, 6, dtype=torch.bool)
    g[1, 1, 1] = True
    t = thicken(g)
    assert t.sum() == 27 and t[1:4, 1:4, 1:4].all() and not t[0].any()


@pytest.mark.parametrize("factor,iso", [(1, 1.0), (2, 2.0)])
def test_eval_segments_match_bruteforce(factor, iso):
    rng = np.random.default_rng(factor)
    n = 24
    sem = np.zeros((n,) * 3, dtype=np.int32)
    ins = np.zeros((n,) * 3, dtype=np.int32)
    sem[2:8, 2:8, 2:8] = 3
    ins[2:8, 2:8, 2:8] = 5
    sem[4:6, 4:6, 4:6] = 10  # stuff-labelled voxels inside a thing instance belong to the wall segment
    sem[10:14, 0:24, 20:23] = 10
    sem[0:24, 20:24, 0:24] = 11
    ins[15:23, 15:23, 1:5] = 9  # instance 9: chairs and tables; majority = table (5)
    sem[15:23, 15:23, 1:5] = 5
    sem[15:17, 15:23, 1:5] = 3
    ins[0:2, 0:2, 0:2] = 12  # an instance with only stuff labels: skipped
    sem[0:2, 0:2, 0:2] = 11
    tdf = rng.uniform(0, 3, size=(n,) * 3).astype(np.float32)
    frustum = rng.random((n,) * 3) < 0.9
    seg = build_eval_segments(sem, ins, tdf, frustum, (10, 11, 12), iso, factor)
    assert seg.labels.tolist() == [3, 5, 10, 11]
    assert seg.instance_ids.tolist() == [5, 9, 0, 0]
    stuff = np.isin(sem, (10, 11, 12))
    members = [(ins == 5) & ~stuff, (ins == 9) & ~stuff, sem == 10, sem == 11]
    for mask, member in zip(seg.masks, members, strict=True):
        ref = reference_segment_mask(member, tdf, frustum, iso, factor)
        np.testing.assert_array_equal(mask.numpy(), ref)
    assert seg.frustum.shape == (n // factor,) * 3


def test_instances_2d_rules():
    sem = np.zeros((10, 10), dtype=np.int64)
    ins = np.zeros((10, 10), dtype=np.int64)
    sem[:, :5], ins[:, :5] = 10, 1  # wall with a 2D instance id: not a thing
    sem[:5, 5:], ins[:5, 5:] = 3, 2  # chair 25 px
    sem[0, 5:8] = 4  # minority sofa pixels inside the chair instance
    sem[5:, 5:], ins[5:, 5:] = 5, 3  # table 25 px
    out = build_instances_2d(sem, ins, (10, 11), min_instance_pixels=24)
    assert out.labels.tolist() == [3, 5, 10]
    assert out.instance_ids.tolist() == [2, 3, 0]
    out = build_instances_2d(sem, ins, (10, 11), min_instance_pixels=25)  # strictly more than
    assert out.labels.tolist() == [10]


def test_resize_nearest_reference():
    a = np.arange(12).reshape(3, 4)
    assert resize_nearest(a, (8, 6)).tolist()[0] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert resize_nearest(a, (2, 3)).tolist() == [[1, 3], [5, 7], [9, 11]]


def test_collate_stacks_pads_and_lists():
    a = {"image": torch.ones(3, 4, 5), "sem_seg": torch.zeros(4, 5, dtype=torch.long),
         "labels": torch.tensor([1, 2]), "masks": torch.zeros(2, 4, 5, dtype=torch.bool), "meta": {"key": "a"}}
    b = {"image": torch.ones(3, 6, 5), "sem_seg": torch.ones(6, 5, dtype=torch.long),
         "labels": torch.tensor([3]), "masks": torch.zeros(1, 6, 5, dtype=torch.bool), "meta": {"key": "b"}}
    batch = collate_samples([a, b])
    assert batch["image"].shape == (2, 3, 6, 5)
    assert batch["image"][0, :, 4:].eq(0).all()
    assert batch["sem_seg"][0, 4:].eq(255).all() and batch["sem_seg"][1].eq(1).all()
    assert [t.tolist() for t in batch["labels"]] == [[1, 2], [3]]
    assert batch["meta"] == [{"key": "a"}, {"key": "b"}]
    assert batch["sizes"]["image"] == [(3, 4, 5), (3, 6, 5)]
    same = collate_samples([a, a])
    assert same["image"].shape == (2, 3, 4, 5) and "sizes" not in same


def test_eval_segments_read_the_distance_as_the_metric_does():
    """|TDF| < iso in float32 (the benchmark rule for GT and predictions): a signed field's far-inside voxels
    (-5) are not surface, near-inside ones (-0.5) are; the same masks as frustum3d.metrics gives."""
    from frustum3d.metrics import ground_truth_segments, segment_masks

    n = 12
    sem = np.zeros((n,) * 3, dtype=np.int32)
    ins = np.zeros((n,) * 3, dtype=np.int32)
    sem[2:8, 2:8, 2:8], ins[2:8, 2:8, 2:8] = 3, 4
    sem[:, :, 10] = 10
    tdf = np.full((n,) * 3, -5.0)
    tdf[2:8, 2:8, 2] = -0.5  # one face of the box: just inside the surface
    tdf[:, :, 10] = 0.25
    frustum = np.ones((n,) * 3, dtype=bool)
    seg = build_eval_segments(sem, ins, tdf, frustum, (10, 11), 1.0)
    box = (ins == 4)
    np.testing.assert_array_equal(seg.masks[0].numpy(), reference_segment_mask(box, tdf, frustum, 1.0, 1))
    assert int(seg.masks[0].sum()) == 8 * 8 * 3  # the 6x6 face thickened by {0,1,2}^3, nothing of the inside
    metric = ground_truth_segments(torch.from_numpy(ins), torch.from_numpy(sem), (10, 11))
    expected = segment_masks(metric, torch.from_numpy(tdf), torch.from_numpy(frustum), iso_value=1.0)
    assert torch.equal(seg.masks, expected)
    assert seg.instance_ids.tolist() == [4, 0] and seg.is_thing.tolist() == [True, False]
