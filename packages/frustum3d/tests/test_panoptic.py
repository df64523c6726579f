"""3D panoptic fusion: hand-built cases and a per-voxel brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from frustum3d.panoptic import (
    FRONT3D_STUFF_CLASSES,
    PanopticFusionError,
    panoptic_fusion,
    panoptic_fusion_voxels,
)

NUM_CLASSES = 13  # 0 free space, 1..9 things, 10..12 stuff; column 13 = no object


def _logits_for(labels: list[int], confident: list[bool]) -> torch.Tensor:
    """Class logits whose arg-max is ``labels[q]`` with score ~0.99 (confident) or ~0.5 (not)."""
    logits = torch.zeros(len(labels), NUM_CLASSES + 1)
    for q, (label, sure) in enumerate(zip(labels, confident)):
        logits[q, label] = 10.0 if sure else math.log(NUM_CLASSES)
    return logits


def brute_force_fusion(class_logits, mask_logits, tdf, stuff, threshold=0.8):
    """Per-voxel python loops following the reference algorithm literally."""
    probs = torch.softmax(class_logits, dim=-1)
    scores, labels = probs.max(dim=-1)
    no_object = class_logits.shape[1] - 1
    kept = [q for q in range(len(labels)) if labels[q] != no_object and labels[q] != 0 and scores[q] > threshold]
    shape = tdf.shape
    panoptic = np.zeros(shape, dtype=np.int32)
    mapping: dict[int, int] = {}
    if not kept:
        return panoptic, mapping
    sig = torch.sigmoid(mask_logits)
    winner = np.zeros(shape, dtype=np.int64)
    for idx in np.ndindex(*shape):
        values = [float(scores[q] * sig[(q, *idx)]) for q in kept]
        winner[idx] = int(np.argmax(values))
    query_segment = {}
    stuff_memory = {}
    current = 0
    for k, q in enumerate(kept):
        cls = int(labels[q])
        voxels = [idx for idx in np.ndindex(*shape) if winner[idx] == k and float(sig[(q, *idx)]) >= 0.5]
        if not voxels:
            continue
        if cls in stuff and cls in stuff_memory:
            seg = stuff_memory[cls]
        else:
            current += 1
            seg = current
            mapping[seg] = cls
            if cls in stuff:
                stuff_memory[cls] = seg
        query_segment[k] = seg
        for idx in voxels:
            panoptic[idx] = seg
    unassigned = [idx for idx in np.ndindex(*shape) if panoptic[idx] == 0 and abs(float(tdf[idx])) <= 1.5]
    for idx in unassigned:
        k = int(winner[idx])
        if k in query_segment:
            panoptic[idx] = query_segment[k]
    return panoptic, mapping


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_dense_fusion_matches_brute_force(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    shape = (4, 5, 3)
    labels = [3, 10, 10, 0, 3, 11, 13, 5, 12, 10]
    confident = [True, True, True, True, True, True, True, bool(seed % 2), True, False]
    class_logits = _logits_for(labels, confident) + 0.01 * torch.randn(len(labels), NUM_CLASSES + 1, generator=gen)
    mask_logits = 3.0 * torch.randn(len(labels), *shape, generator=gen)
    tdf = 3.0 * torch.rand(shape, generator=gen) * torch.where(torch.rand(shape, generator=gen) < 0.3, -1.0, 1.0)
    result = panoptic_fusion(class_logits, mask_logits, tdf)
    panoptic, mapping = brute_force_fusion(class_logits, mask_logits, tdf, set(FRONT3D_STUFF_CLASSES))
    assert result.mapping == mapping
    assert np.array_equal(result.panoptic.numpy(), panoptic)
    assert result.panoptic.dtype == torch.int32
    assert result.mapping_tensor.tolist() == [list(item) for item in mapping.items()]
    expected_semantic = np.vectorize(lambda i: mapping.get(int(i), 0))(panoptic)
    assert np.array_equal(result.semantic.numpy(), expected_semantic)
    # two confident wall queries -> one wall segment at most
    assert list(mapping.values()).count(10) <= 1


def test_sparse_input_equals_dense_with_missing_voxels_at_minus_infinity() -> None:
    gen = torch.Generator().manual_seed(5)
    shape = (4, 4, 4)
    labels = [2, 10, 10, 4]
    class_logits = _logits_for(labels, [True] * 4)
    dense = 2.0 * torch.randn(4, *shape, generator=gen)
    present = torch.rand(shape, generator=gen) < 0.6
    coordinates = torch.nonzero(present)
    sparse = dense[:, present].T  # [N, Q]
    tdf = torch.full(shape, 1.0)  # every voxel is surface: exercises the fill of missing voxels
    dense_missing = torch.where(present, dense, torch.tensor(float("-inf")))
    a = panoptic_fusion(class_logits, sparse, tdf, coordinates=coordinates)
    b = panoptic_fusion(class_logits, dense_missing, tdf)
    assert torch.equal(a.panoptic, b.panoptic) and a.mapping == b.mapping
    assert torch.equal(a.semantic, b.semantic)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_voxel_fusion_equals_the_dense_fusion_at_its_voxels(seed: int) -> None:
    # the Predictor's fusion: only the finest level's voxels carry values (TDF = truncation elsewhere)
    gen = torch.Generator().manual_seed(seed)
    shape = (6, 5, 4)
    labels = [3, 10, 10, 0, 3, 11, 13, 5, 12, 10, 2, 2]
    confident = [True, True, True, True, True, True, True, bool(seed % 2), True, seed < 3, True, True]
    class_logits = _logits_for(labels, confident) + 0.01 * torch.randn(len(labels), NUM_CLASSES + 1, generator=gen)
    present = torch.rand(shape, generator=gen) < (0.0 if seed == 5 else 0.5)
    coordinates = torch.nonzero(present)[torch.randperm(int(present.sum()), generator=gen)]  # any order
    n = coordinates.shape[0]
    mask_logits = 3.0 * torch.randn(n, len(labels), generator=gen)
    values = 3.0 * torch.rand(n, generator=gen)
    tdf = torch.full(shape, 3.0)
    tdf[coordinates[:, 0], coordinates[:, 1], coordinates[:, 2]] = values
    dense = panoptic_fusion(class_logits, mask_logits, tdf, coordinates=coordinates)
    voxels = panoptic_fusion_voxels(class_logits, mask_logits, values)
    assert voxels.mapping == dense.mapping and voxels.segment_queries == dense.segment_queries
    at = (coordinates[:, 0], coordinates[:, 1], coordinates[:, 2])
    assert torch.equal(voxels.panoptic, dense.panoptic[at]) and torch.equal(voxels.semantic, dense.semantic[at])
    assert voxels.panoptic.dtype == torch.int32 and voxels.semantic.dtype == torch.int32
    # nothing outside the voxels: the sparse result is the whole volume
    outside = dense.panoptic.clone()
    outside[at] = 0
    assert not outside.any()
    if seed == 0:
        assert len(dense.mapping) >= 3  # the case is not trivial


def test_voxel_fusion_checks_its_shapes() -> None:
    with pytest.raises(PanopticFusionError, match="same voxels"):
        panoptic_fusion_voxels(torch.zeros(3, 5), torch.zeros(4, 3), torch.zeros(5))


def test_hand_built_case() -> None:
    """Line of 6 voxels; every rule of the fusion is hit once."""
    shape = (6, 1, 1)
    # q0 chair, q1 wall, q2 wall (merged), q3 free space (dropped), q4 no-object (dropped),
    # q5 sofa below threshold (dropped), q6 table with no voxel (no segment)
    labels = [3, 10, 10, 0, 13, 4, 5]
    confident = [True, True, True, True, True, False, True]
    class_logits = _logits_for(labels, confident)
    big = 8.0
    m = torch.full((7, *shape), -big)
    m[0, 0], m[1, 1], m[2, 2] = big, big, big
    m[3, 3] = m[4, 3] = m[5, 3] = big  # only dropped queries want voxel 3
    m[0, 3] = -big + 0.5  # ...and of the kept queries q0 is the least unlikely there (no float tie)
    m[0, 4] = -0.5  # q0 wins voxel 4 (all others -8) but sigmoid < 0.5
    m[0, 5] = -0.5
    tdf = torch.tensor([3.0, 3.0, 3.0, 1.5, -1.0, 2.0]).view(shape)
    result = panoptic_fusion(class_logits, m, tdf)
    assert result.mapping == {1: 3, 2: 10}
    assert result.segment_queries == {1: [0], 2: [1, 2]}
    # voxel 3: q0 (chair) wins among the kept queries, filled because |tdf| = 1.5 <= 1.5
    # voxel 4: filled with q0 (|tdf| = 1); voxel 5: |tdf| = 2 > 1.5 stays void
    assert result.panoptic.flatten().tolist() == [1, 2, 2, 1, 1, 0]
    assert result.semantic.flatten().tolist() == [3, 10, 10, 3, 3, 0]
    assert result.mapping_tensor.tolist() == [[1, 3], [2, 10]]


def test_nothing_kept_gives_an_empty_volume() -> None:
    class_logits = _logits_for([13, 0], [True, True])
    result = panoptic_fusion(class_logits, torch.zeros(2, 3, 3, 3), torch.zeros(3, 3, 3))
    assert result.panoptic.abs().sum() == 0 and result.mapping == {}
    assert tuple(result.mapping_tensor.shape) == (0, 2)


def test_frustum_mask_keeps_outside_voxels_void() -> None:
    class_logits = _logits_for([3], [True])
    m = torch.full((1, 4, 1, 1), 5.0)
    frustum = torch.tensor([True, True, False, False]).view(4, 1, 1)
    result = panoptic_fusion(class_logits, m, torch.zeros(4, 1, 1), frustum)
    assert result.panoptic.flatten().tolist() == [1, 1, 0, 0]


def test_configurable_stuff_classes() -> None:
    class_logits = _logits_for([3, 3], [True, True])
    m = torch.tensor([[5.0, -5.0], [-5.0, 5.0]]).view(2, 2, 1, 1)
    things = panoptic_fusion(class_logits, m, torch.full((2, 1, 1), 3.0))
    assert things.mapping == {1: 3, 2: 3}
    merged = panoptic_fusion(class_logits, m, torch.full((2, 1, 1), 3.0), stuff_classes=(3,))
    assert merged.mapping == {1: 3} and merged.panoptic.flatten().tolist() == [1, 1]


def test_bad_shapes_raise() -> None:
    with pytest.raises(PanopticFusionError, match="dense mask_logits"):
        panoptic_fusion(torch.zeros(2, 5), torch.zeros(3, 2, 2, 2), torch.zeros(2, 2, 2))
    with pytest.raises(PanopticFusionError, match="duplicate"):
        panoptic_fusion(
            _logits_for([3], [True]), torch.zeros(2, 1), torch.zeros(2, 2, 2), coordinates=torch.zeros(2, 3)
        )
    with pytest.raises(PanopticFusionError, match="outside the grid"):
        panoptic_fusion(
            _logits_for([3], [True]), torch.zeros(1, 1), torch.zeros(2, 2, 2), coordinates=torch.tensor([[0, 0, 2]])
        )
