"""PRQ against the 22 scenes scored by the reference code (../shared/golden/prq_cases.*).

Every per-case intermediate (GT panoptic volume, segment ids / labels, evaluated masks, IoU matrix,
per-class stats) and the accumulated stats / final PRQ-RSQ-RRQ must agree: integers exactly,
fractions to 1e-12.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from frustum3d.metrics import PanopticReconstructionQuality, segment_masks


def _repo_root() -> Path:
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "packages").is_dir() and (parent / "pyproject.toml").is_file():
            return parent
    return here.parents[3]


GOLDEN = _repo_root().parent / "shared" / "golden"
NPZ = GOLDEN / "prq_cases.npz"
JSON = GOLDEN / "prq_cases.json"

pytestmark = pytest.mark.skipif(
    not (NPZ.is_file() and JSON.is_file()),
    reason=f"golden PRQ data not found at {GOLDEN} (the shared folder ../shared next to the repo is absent)",
)


@pytest.fixture(scope="module")
def golden() -> tuple[dict[str, np.ndarray], dict]:
    with np.load(NPZ) as data:
        arrays = {key: data[key] for key in data.files}
    return arrays, json.loads(JSON.read_text())


@pytest.fixture(scope="module")
def results(golden):
    """Run every case once through the public API (1 thread: the suite shares few cores)."""
    arrays, meta = golden
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        constants = meta["constants"]
        classes = {int(k): (v[0], bool(v[1])) for k, v in constants["classes"].items()}
        metric = PanopticReconstructionQuality(
            classes,
            constants["stuff_classes"],
            matching_threshold=constants["matching_threshold"],
            iso_value=constants["iso_value"],
            truncation=constants["truncation"],
        )
        cases = []
        for index in range(meta["num_cases"]):
            case = {k[4:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith(f"c{index:02d}_")}
            mapping = dict(zip(case["pred_segment_ids"].tolist(), case["pred_segment_labels"].tolist()))
            inputs = (
                case["gt_instance"],
                case["gt_semantic"],
                case["gt_tdf"],
                case["pred_panoptic"],
                mapping,
                case["pred_tdf"],
                case["frustum"],
            )
            evaluation = metric.evaluate(*inputs)
            sample_stats = metric.add(*inputs)
            gt_masks = segment_masks(evaluation.gt, case["gt_tdf"], case["frustum"])
            pred_masks = segment_masks(evaluation.pred, case["pred_tdf"], case["frustum"])
            cases.append((case, evaluation, sample_stats, gt_masks, pred_masks))
        return metric, cases
    finally:
        torch.set_num_threads(previous)


def _unpack(rows: torch.Tensor, n: int) -> np.ndarray:
    rows = rows.numpy()
    if rows.shape[0] == 0:
        return np.zeros((0, n, n, n), dtype=bool)
    return np.stack([np.unpackbits(row)[: n**3].reshape(n, n, n).astype(bool) for row in rows])


def test_every_case_intermediate_matches(results, golden) -> None:
    _, meta = golden
    _, cases = results
    assert len(cases) == meta["num_cases"] == 22
    for index, (case, evaluation, sample_stats, gt_masks, pred_masks) in enumerate(cases):
        n = case["gt_instance"].shape[0]
        assert torch.equal(evaluation.gt.panoptic, case["gt_panoptic"]), f"case {index}: gt panoptic"
        assert evaluation.gt.ids.tolist() == case["gt_segment_ids"].tolist(), f"case {index}: gt ids"
        assert evaluation.gt.labels.tolist() == case["gt_segment_labels"].tolist(), f"case {index}: gt labels"
        assert evaluation.pred.ids.tolist() == case["pred_segment_ids"].tolist(), f"case {index}: pred ids"
        assert np.array_equal(gt_masks.numpy(), _unpack(case["gt_masks"], n)), f"case {index}: gt masks"
        assert np.array_equal(pred_masks.numpy(), _unpack(case["pred_masks"], n)), f"case {index}: pred masks"
        # mask sizes from the bit-packed overlap path agree with the dense masks
        assert evaluation.overlaps.gt_sizes.tolist() == [int(m.sum()) for m in gt_masks]
        assert evaluation.overlaps.pred_sizes.tolist() == [int(m.sum()) for m in pred_masks]
        np.testing.assert_allclose(evaluation.iou.numpy(), case["iou"].numpy(), rtol=0, atol=1e-12)
        stats = sample_stats.numpy()
        expected = case["stats"].numpy()
        np.testing.assert_array_equal(stats[:, 1:], expected[:, 1:], err_msg=f"case {index}: counts")
        np.testing.assert_allclose(stats[:, 0], expected[:, 0], rtol=0, atol=1e-12)
        summary = meta["cases"][index]
        assert [[int(i), int(c)] for i, c in zip(evaluation.gt.ids, evaluation.gt.labels)] == summary["gt_segments"]
        assert [int(m.sum()) for m in gt_masks] == summary["gt_mask_voxels"]


def test_accumulated_stats_and_final_scores(results, golden) -> None:
    arrays, meta = golden
    metric, _ = results
    stats = metric.stats.numpy()
    np.testing.assert_array_equal(stats[:, 1:], arrays["acc_stats"][:, 1:])
    np.testing.assert_allclose(stats[:, 0], arrays["acc_stats"][:, 0], rtol=0, atol=1e-12)

    result = metric.compute()
    pq, sq, rq, n = arrays["final"].tolist()
    assert result["num_classes_counted"] == int(n) == 10
    assert abs(result["PRQ"] - pq) <= 1e-12
    assert abs(result["RSQ"] - sq) <= 1e-12
    assert abs(result["RRQ"] - rq) <= 1e-12
    assert abs(result["PRQ"] - meta["final"]["pq"]) <= 1e-12

    per_class = arrays["per_class_prq"]
    for class_id, row in result["per_class"].items():
        reference = per_class[class_id]
        if np.isnan(reference).all():
            assert not row["counted"], f"class {class_id} should not enter the mean"
            continue
        assert row["counted"]
        assert abs(row["PRQ"] - reference[0]) <= 1e-12
        assert abs(row["RSQ"] - reference[1]) <= 1e-12
        assert abs(row["RRQ"] - reference[2]) <= 1e-12
        assert row["n"] == int(reference[3])
    # class 8 (lamp) is only ever predicted: excluded from the mean
    assert result["per_class"][8]["fp"] == 3 and not result["per_class"][8]["counted"]
