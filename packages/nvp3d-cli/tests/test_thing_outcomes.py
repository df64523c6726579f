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


def test_2d_outcomes_from_pq_matching() -> None:
    # a 2D frame drawn by hand (class ids of FRONT3D: 3 chair, 5 table, 8 lamp, 10 wall, 11 floor):
    # GT chair A is predicted exactly, GT chair B only by a small chair (low IoU), the GT table lies under a
    # predicted wall, the GT lamp under nothing (void), and a predicted sofa sits on the floor
    from maskformer_head import image_pq_stats, image_segment_matching
    from nvp3d.evaluation.thing_outcomes import details_2d

    gt_sem = torch.full((20, 20), 11)
    gt_sem[:5] = 10
    gt_inst = torch.zeros(20, 20, dtype=torch.long)
    for (r, c), cls, ins in (((6, 1), 3, 1), ((6, 8), 3, 2), ((13, 1), 5, 3), ((13, 8), 8, 4)):
        gt_sem[r:r + 5, c:c + 5], gt_inst[r:r + 5, c:c + 5] = cls, ins
    sem, inst = gt_sem.clone(), gt_inst.clone()
    sem[6:11, 8:13], inst[6:11, 8:13] = 11, 0  # chair B mostly floor ...
    sem[6:8, 8:10], inst[6:8, 8:10] = 3, 7  # ... with a small chair piece on it
    sem[13:18, 1:6], inst[13:18, 1:6] = 10, 0  # the table taken by the wall
    sem[13:18, 8:13], inst[13:18, 8:13] = 0, 0  # the lamp unpredicted (void)
    sem[15:19, 14:19], inst[15:19, 14:19] = 4, 9  # a sofa on the floor
    things, stuffs = torch.arange(1, 10), torch.tensor(STUFF)
    matching = image_segment_matching(sem, inst, gt_sem, gt_inst, things, stuffs)
    d = outcomes_dict(thing_outcomes(details_2d(matching), STUFF))
    assert d == {"matched": 1, "same_class_low_iou": 1, "other_class_by_stuff": 1, "other_class_by_thing": 0,
                 "missed": 1, "pred_things": 3, "duplicate": 0, "low_iou": 1, "spurious": 1, "gt_things": 4,
                 "matched_mean_iou": 1.0}
    stats = image_pq_stats(sem, inst, gt_sem, gt_inst, 13, things, stuffs)
    assert d["matched"] == int(stats[1:10, 1].sum())  # the matches are PQ's thing TPs
    assert "found at IoU <= 0.5 1" in format_outcomes(d, match_iou=0.5)
