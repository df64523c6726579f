"""PRQ statistics of the 3D stage (dataset evaluation segments vs fused predictions) against the reference
metric ``frustum3d.metrics.PanopticReconstructionQuality`` scored on the raw GT volumes, at 3D-FRONT settings
(factor 1, iso 1) and Matterport-style settings (factor 2, iso 2: a 32^3 grid evaluated at 16^3)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets3d import DatasetConfig, PanopticReconstructionDataset
from frustum3d.metrics import PanopticReconstructionQuality, ground_truth_segments
from nvp3d.evaluation.prq3d import PRQAccumulator, mask_iou, sample_stats


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


@pytest.fixture(scope="module")
def data_dir(synthetic_data) -> Path:
    return synthetic_data("nvp3d_synth_s3d_eval", seed=5, image_size=(64, 48))


def _dataset(root: Path, iso: float, factor: int) -> PanopticReconstructionDataset:
    cfg = DatasetConfig(name="synthetic", root=root, json_path="meta/test.json", label_map="meta/colormap.json",
                        frustum_mask_path="meta/frustum_mask.npz", target_size=(64, 48), reduced_target_size=(32, 24),
                        depth_size=(24, 32), min_instance_pixels=8, eval_targets=True, iso_value=iso,
                        downsample_factor=factor, enable_mp_occ=False)
    return PanopticReconstructionDataset(cfg)


def _prediction(frame, stuff, gen: torch.Generator):
    """A perturbed copy of the GT: some segments dropped, one relabelled, voxels eroded, a spurious segment,
    noisy distances."""
    inst = _t(frame.instance_3d.astype("int64"))
    sem = _t(frame.semantic_3d.astype("int64"))
    gt = ground_truth_segments(inst, sem, stuff)
    pan = gt.panoptic.clone()
    mapping = {}
    for k, (sid, lab) in enumerate(zip(gt.ids.tolist(), gt.labels.tolist(), strict=True)):
        r = torch.rand((), generator=gen).item()
        if r < 0.2:
            pan[pan == sid] = 0
            continue
        drop = (torch.rand(pan.shape, generator=gen) < 0.3) & (pan == sid)
        pan[drop] = 0
        mapping[int(sid)] = int(lab) if k != 1 else (int(lab) % 9) + 1
    spurious = 99
    block = torch.zeros_like(pan, dtype=torch.bool)
    block[2:6, 2:6, 20:24] = True
    pan[block & (pan == 0)] = spurious
    mapping[spurious] = 3
    tdf = _t(frame.geometry).float() + 0.6 * torch.rand(pan.shape, generator=gen)
    tdf[block] = 0.2
    return pan.int(), mapping, tdf


@pytest.mark.parametrize(("iso", "factor"), [(1.0, 1), (2.0, 2)])
def test_sample_stats_match_reference_metric(data_dir: Path, iso: float, factor: int) -> None:
    ds = _dataset(data_dir, iso, factor)
    stuff = ds.stuff_ids
    classes = {c: (ds.labels.names.get(c, str(c)), c in ds.thing_ids) for c in ds.labels.train_ids}
    ref = PanopticReconstructionQuality(classes, stuff, iso_value=iso, downsample_factor=factor)
    acc = PRQAccumulator(classes, stuff)
    gen = torch.Generator().manual_seed(0)
    for i in range(len(ds)):
        sample = ds[i]
        frame = ds.read_frame(i)
        pan, mapping, tdf = _prediction(frame, stuff, gen)
        frustum = _t(frame.frustum)
        ref_stats = ref.add(_t(frame.instance_3d.astype("int64")),
                            _t(frame.semantic_3d.astype("int64")), _t(frame.geometry),
                            pan, mapping, tdf, frustum)
        stats, detail = sample_stats(sample["eval_masks"], sample["eval_labels"], pan, mapping, tdf, frustum,
                                     num_classes=acc.num_classes, iso_value=iso, downsample_factor=factor)
        assert sample["eval_masks"].shape[1:] == tuple(n // factor for n in frame.geometry.shape)
        torch.testing.assert_close(stats, ref_stats, rtol=0, atol=1e-9)
        acc.add(stats)
    assert acc.stats[:, 1].sum() > 0, "the perturbed prediction should match some segments"
    want = ref.compute()
    got = acc.compute()
    for key in ("PRQ", "RSQ", "RRQ", "PRQ_th", "PRQ_st"):
        w = want[key]
        assert got["kpi"][key] == pytest.approx(100 * w, abs=1e-9) or (w != w and got["kpi"][key] != got["kpi"][key])
    rows = {r["class_id"]: r for r in got["per_class"]}
    for cid, r in want["per_class"].items():
        assert rows[cid]["TP"] == r["tp"] and rows[cid]["FP"] == r["fp"] and rows[cid]["FN"] == r["fn"]


def test_mask_iou_brute_force() -> None:
    gen = torch.Generator().manual_seed(1)
    g = torch.rand(4, 6, 5, 7, generator=gen) < 0.3
    p = torch.rand(3, 6, 5, 7, generator=gen) < 0.4
    got = mask_iou(g, p, chunk=17)
    for i in range(4):
        for j in range(3):
            inter = (g[i] & p[j]).sum().item()
            union = (g[i] | p[j]).sum().item()
            assert got[i, j].item() == pytest.approx(inter / union if union else 0.0)


def test_identical_prediction_scores_100(data_dir: Path) -> None:
    ds = _dataset(data_dir, 1.0, 1)
    frame, sample = ds.read_frame(0), ds[0]
    gt = ground_truth_segments(_t(frame.instance_3d.astype("int64")),
                               _t(frame.semantic_3d.astype("int64")), ds.stuff_ids)
    mapping = dict(zip(gt.ids.tolist(), gt.labels.tolist(), strict=True))
    stats, _ = sample_stats(sample["eval_masks"], sample["eval_labels"], gt.panoptic, mapping,
                            _t(frame.geometry), _t(frame.frustum), num_classes=13,
                            iso_value=1.0)
    nonempty = sample["eval_masks"].flatten(1).any(1)
    assert stats[:, 1].sum() == nonempty.sum() and stats[:, 2].sum() == 0
    classes = {c: (str(c), c in ds.thing_ids) for c in ds.labels.train_ids}
    acc = PRQAccumulator(classes, ds.stuff_ids)
    acc.add(stats)
    if bool(nonempty.all()):
        assert acc.compute()["kpi"]["PRQ"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="downsample_factor"):
        sample_stats(sample["eval_masks"], sample["eval_labels"], gt.panoptic, mapping,
                     _t(frame.geometry), None, num_classes=13, iso_value=1.0, downsample_factor=2)
    assert dataclasses.is_dataclass(ds.config)
