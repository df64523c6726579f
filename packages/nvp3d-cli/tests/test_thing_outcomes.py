"""Where GT things end up (``nvp3d.evaluation.thing_outcomes``): each GT thing has exactly one outcome, stuff is
left out on both sides, unmatched predicted things are named, and frames sum like PRQ statistics."""

from __future__ import annotations

import pytest
import torch
from frustum3d.metrics import frame_statistics, prediction_segments, segment_masks
from frustum3d.panoptic import FRONT3D_CLASSES
from nvp3d.evaluation.prq3d import PRQAccumulator
from nvp3d.evaluation.thing_outcomes import OUTCOME_KEYS, format_outcomes, outcomes_dict, thing_outcomes

STUFF = (10, 11, 12)


def _details() -> dict:
    # GT: 0 chair (matched by pred 0), 1 chair (pred 1 is a chair at IoU 0.2), 2 table (the wall overlaps it),
    # 3 lamp (the bed overlaps it more than the wall does), 4 lamp (nothing), 5 wall (stuff, matched by pred 2);
    # pred 3 is a second chair piece on GT 0, pred 4 a bed over the lamp, pred 5 a sofa far from everything
    iou = torch.zeros(6, 6, dtype=torch.float64)
    iou[0, 0], iou[0, 3] = 0.6, 0.15
    iou[1, 1] = 0.2
    iou[2, 2] = 0.05
    iou[3, 2], iou[3, 4] = 0.02, 0.3
    iou[5, 2] = 0.7
    return {"iou": iou, "matches": [(0, 0), (5, 2)], "gt_labels": [3, 3, 5, 8, 8, 10],
            "pred_labels": [3, 3, 10, 3, 2, 4]}


def test_each_gt_thing_has_one_outcome_and_predictions_are_named() -> None:
    d = outcomes_dict(thing_outcomes(_details(), STUFF))
    assert (d["matched"], d["same_class_low_iou"], d["other_class_by_stuff"], d["other_class_by_thing"],
            d["missed"]) == (1, 1, 1, 1, 1)
    assert d["gt_things"] == 5 and d["matched_mean_iou"] == pytest.approx(0.6)
    # pred 1 (chair on the unmatched chair) is a low-IoU piece, pred 3 a duplicate of the found chair, pred 4 (bed)
    # and pred 5 (sofa) touch no GT thing of their class
    assert (d["pred_things"], d["duplicate"], d["low_iou"], d["spurious"]) == (5, 1, 1, 2)
    line = format_outcomes(d)
    assert "5 GT -> matched 1 (mean IoU 0.60)" in line and "2 spurious" in line


def test_gt_mask_restricts_the_gt_side_only() -> None:
    d = outcomes_dict(thing_outcomes(_details(), STUFF, gt_mask=[True, False, True, False, False, True]))
    assert d["gt_things"] == 2 and d["matched"] == 1 and d["other_class_by_stuff"] == 1
    assert d["pred_things"] == 5  # every predicted thing still counts
    with pytest.raises(ValueError, match="gt_mask has 2 entries for 6 GT segments"):
        thing_outcomes(_details(), STUFF, gt_mask=[True, False])


def test_outcomes_of_real_frame_statistics_and_accumulation() -> None:
    """On a scored frame: a chair predicted where it is (matched), a table whose voxels went to the wall, a lamp
    with no surface predicted; the accumulator sums two frames and resets with its statistics."""
    shape = (12, 12, 12)
    gt_pan = torch.zeros(shape, dtype=torch.int32)
    gt_pan[2:5, 2:5, 6] = 1  # chair (3)
    gt_pan[7:10, 2:5, 6] = 2  # table (5)
    gt_pan[2:5, 8:11, 6] = 3  # lamp (8)
    gt_pan[:, :, 10] = 4  # wall (10)
    gt_tdf = torch.full(shape, 3.0)
    gt_tdf[gt_pan > 0] = 0.0
    gt_map = {1: 3, 2: 5, 3: 8, 4: 10}
    kw = dict(num_classes=13, iso_value=1.0, truncation=3.0)
    gt_masks = segment_masks(prediction_segments(gt_pan, gt_map), gt_tdf, None, iso_value=1.0, truncation=3.0)
    pred_pan = gt_pan.clone()
    pred_pan[gt_pan == 2] = 4  # the wall segment took the table
    pred_tdf = gt_tdf.clone()
    pred_tdf[gt_pan == 3] = 3.0  # no lamp surface
    pred_pan[gt_pan == 3] = 0
    stats, details = frame_statistics(gt_masks, torch.tensor([3, 5, 8, 10]), pred_pan, {1: 3, 4: 10}, pred_tdf,
                                      None, **kw)
    counts = thing_outcomes(details, STUFF)
    d = outcomes_dict(counts)
    assert (d["matched"], d["other_class_by_stuff"], d["missed"], d["gt_things"]) == (1, 1, 1, 3)
    assert d["pred_things"] == 1 and d["spurious"] == 0
    acc = PRQAccumulator(FRONT3D_CLASSES, STUFF)
    acc.add(stats, counts)
    acc.add(stats, counts)
    assert outcomes_dict(acc.outcomes)["matched"] == 2 and acc.outcomes.shape == (len(OUTCOME_KEYS),)
    acc.reset()
    assert float(acc.outcomes.abs().sum()) == 0.0 and acc.frames == 0
