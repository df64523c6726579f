"""The real processed frames from ../shared/fixtures: layout, flips, inverted mask, alignment numbers.

Expected values come from the fixtures' README / measurements.json (measured independently of this code).
"""

from __future__ import annotations

import numpy as np
import pytest
from datasets3d import DatasetConfig, PanopticReconstructionDataset
from datasets3d.checks import depth_alignment
from ds3d_testutil import FRONT3D_REAL, MATTERPORT_REAL, needs_front3d_real, needs_matterport_real


@pytest.fixture(scope="module")
def front3d():
    ds = PanopticReconstructionDataset(DatasetConfig(name="front3d", root=FRONT3D_REAL, json_path="meta/val.json",
                                                     enable_3d=True, eval_targets=True))
    return ds, ds.read_frame(0), ds[0]


@pytest.fixture(scope="module")
def matterport():
    ds = PanopticReconstructionDataset(DatasetConfig(name="matterport", root=MATTERPORT_REAL, json_path="meta/val.json",
                                                     enable_3d=True, eval_targets=True, downsample_factor=2,
                                                     iso_value=2.0, frustum_mask_path=None))
    return ds, ds.read_frame(0), ds[0]


@needs_front3d_real
def test_front3d_real_loading(front3d):
    _, frame, s = front3d
    assert frame.rgb.shape == (240, 320, 3) and frame.depth.dtype == np.float32
    assert frame.depth.min() == pytest.approx(0.9169, abs=1e-4) and frame.depth.max() == pytest.approx(3.4971, abs=1e-4)
    assert frame.geometry.shape == (256, 256, 256)
    assert int((frame.geometry < 1).sum()) == 65740
    assert int((frame.semantic_3d > 0).sum()) == 65740
    assert sorted(np.unique(frame.weighting).tolist()) == [1, 2, 5, 10]
    assert int(frame.frustum.sum()) == 2659390


@needs_front3d_real
def test_front3d_real_flips_align_depth_with_geometry(front3d):
    ds, frame, _ = front3d
    stats = depth_alignment(frame.depth, frame.intrinsic, frame.camera_to_grid, frame.geometry,
                            frame.semantic, frame.semantic_3d)
    # README: median df 1.28 voxels at 320x240 with geometry flipped on (0, 1)
    assert 0.8 <= stats.median_df <= 1.4
    assert stats.inside_grid == 1.0
    # controls: the unflipped geometry and the 180-degree-flipped depth (the original loader bug) give ~12
    raw = np.flip(frame.geometry, (0, 1))
    assert depth_alignment(frame.depth, frame.intrinsic, frame.camera_to_grid, raw).median_df >= 11.5
    flipped_depth = np.ascontiguousarray(frame.depth[::-1, ::-1])
    assert depth_alignment(flipped_depth, frame.intrinsic, frame.camera_to_grid, frame.geometry).median_df >= 11.5


@needs_front3d_real
def test_front3d_real_frustum_contains_surface_after_flip(front3d):
    _, frame, _ = front3d
    surface = frame.geometry < 1
    assert frame.frustum[surface].all()  # 100 % with the toolkit's mask flip (README: 98.91 % without)
    assert not (frame.geometry[~frame.frustum] < 12).any()


@needs_front3d_real
def test_front3d_real_targets(front3d):
    _, frame, s = front3d
    # 2D: instances 18 (other), 23 (sofa), 24 (table); 26 (136 px) is under the 200 px filter; wall, floor
    assert s["labels"].tolist() == [9, 4, 5, 10, 11]
    assert s["instance_ids"].tolist() == [18, 23, 24, 0, 0]
    assert [int(m.sum()) for m in s["masks"][:3]] == [7540, 12077, 8508]
    # 3D masks in the same order, voxel counts from measurements.json
    assert [int(m.sum()) for m in s["masks_3d_256"]] == [15614, 19437, 2971, 19819, 7561]
    assert s["masks_3d_128"].shape == (5, 128, 128, 128) and s["masks_3d_64"].shape == (5, 64, 64, 64)
    # PRQ ground truth keeps all four 3D instances (as Uni-3D / TAO), then wall and floor
    assert s["eval_instance_ids"].tolist() == [18, 23, 24, 26, 0, 0]
    assert s["eval_labels"].tolist() == [9, 4, 5, 5, 10, 11]
    assert s["eval_masks"].shape[1:] == (256, 256, 256)
    assert int(s["occupancy_256"].sum()) == int((frame.geometry < 12).sum())


@needs_matterport_real
def test_matterport_real_inverted_mask_and_no_flip(matterport):
    _, frame, s = matterport
    assert int(frame.frustum.sum()) == 3000069
    surface = frame.geometry < 1
    assert int(surface.sum()) == 41436
    assert frame.frustum[surface].all()  # 100 % inside ~mask (0 % inside the raw mask)
    np.testing.assert_allclose(frame.intrinsic[0, 0], 269.42)
    assert frame.depth.max() == pytest.approx(22702 / 4000, abs=1e-4)
    stats = depth_alignment(frame.depth, frame.intrinsic, frame.camera_to_grid, frame.geometry)
    assert 1.8 <= stats.median_df <= 2.5  # README: 2.15 voxels (real scan with holes)
    flipped = np.flip(frame.geometry, (0, 1))
    assert depth_alignment(frame.depth, frame.intrinsic, frame.camera_to_grid, flipped).median_df >= 11.5


@needs_matterport_real
def test_matterport_real_targets(matterport):
    _, frame, s = matterport
    assert any("room mask" in n for n in s["meta"]["notes"])  # absent room mask: reported, all pixels valid
    assert bool(s["room_mask"].all())
    assert 12 in s["labels"].tolist()  # ceiling is a real stuff class on Matterport
    assert int((s["depth"] == 0).sum()) == 3776
    assert s["eval_masks"].shape[1:] == (128, 128, 128)
    assert s["eval_frustum"].shape == (128, 128, 128)
    assert set(s["eval_labels"][~s["eval_is_thing"]].tolist()) == {10, 11, 12}
