"""Readers on hand-made datasets in both layouts: flips, inverted Matterport mask, 2D/3D targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets3d import DatasetConfig, PanopticReconstructionDataset
from ds3d_testutil import GRID, VOXEL, H, W, small_config, write_front3d, write_matterport


@pytest.fixture()
def front3d_root(tmp_path):
    vol = write_front3d(tmp_path)
    return tmp_path, vol


def test_front3d_flips_restore_camera_convention(front3d_root):
    root, vol = front3d_root
    ds = PanopticReconstructionDataset(DatasetConfig(name="front3d", root=root, enable_3d=True, **small_config()))
    frame = ds.read_frame(0)
    np.testing.assert_array_equal(frame.geometry, vol["geometry"])
    np.testing.assert_array_equal(frame.semantic_3d, vol["semantic"])
    np.testing.assert_array_equal(frame.instance_3d, vol["instance"])
    np.testing.assert_array_equal(frame.weighting, vol["weighting"])
    np.testing.assert_array_equal(frame.frustum, vol["frustum"])  # toolkit: the mask is flipped too
    # depth is NOT flipped
    from ds3d_testutil import handmade_2d

    np.testing.assert_allclose(frame.depth, handmade_2d()[2])


def test_front3d_mask_flip_option_and_npy_depth(tmp_path):
    vol = write_front3d(tmp_path, depth_format="npy")
    ds = PanopticReconstructionDataset(DatasetConfig(name="front3d", root=tmp_path, flip_frustum_mask=False,
                                                     **small_config()))
    frame = ds.read_frame(0)
    np.testing.assert_array_equal(frame.frustum, np.flip(vol["frustum"], (0, 1)))  # stored orientation kept
    assert frame.depth.shape == (H, W)


def test_front3d_channels_last_segmentation_is_accepted(tmp_path):
    vol = write_front3d(tmp_path, segmentation_layout="channels_last")
    ds = PanopticReconstructionDataset(DatasetConfig(name="front3d", root=tmp_path, enable_3d=True, **small_config()))
    np.testing.assert_array_equal(ds.read_frame(0).semantic_3d, vol["semantic"])


def test_front3d_sample_targets(front3d_root):
    root, vol = front3d_root
    cfg = DatasetConfig(name="front3d", root=root, enable_3d=True, **small_config())
    s = PanopticReconstructionDataset(cfg)[0]
    # 2D: chair instance 7 (100 px > 50) kept, table 8 (20 px) dropped, then wall and floor
    assert s["labels"].tolist() == [3, 10, 11]
    assert s["instance_ids"].tolist() == [7, 0, 0]
    assert s["is_thing"].tolist() == [True, False, False]
    assert s["masks"].shape == (3, H, W)
    assert int(s["masks"][0].sum()) == 100
    assert s["sem_seg"][0, 0] == 255 and s["sem_seg"][10, 25] == 3
    assert s["image"].shape == (3, H, W) and s["image"].dtype == torch.float32 and float(s["image"].max()) == 100
    # 3D masks in the same order: instance 7, semantic wall, semantic floor
    m = s["masks_3d_256"]
    assert m.shape == (3, GRID, GRID, GRID)
    assert torch.equal(m[0], torch.from_numpy(vol["instance"] == 7))
    assert torch.equal(m[1], torch.from_numpy(vol["semantic"] == 10))
    assert torch.equal(m[2], torch.from_numpy(vol["semantic"] == 11))
    dense128 = F.max_pool3d(m[:, None].float(), 4, 2, 1)[:, 0] > 0
    dense64 = F.max_pool3d(m[:, None].float(), 8, 4, 2)[:, 0] > 0
    assert torch.equal(s["masks_3d_128"], dense128)
    assert torch.equal(s["masks_3d_64"], dense64)
    # occupancy / geometry / weighting against dense references
    g = torch.from_numpy(vol["geometry"]).clamp(0, 12)
    assert torch.equal(s["geometry"], g)
    assert torch.equal(s["occupancy_256"], g < 12)
    ref128 = F.interpolate(g[None, None], scale_factor=0.5, mode="trilinear")[0, 0] < 6
    ref64 = F.interpolate(g[None, None], scale_factor=0.25, mode="trilinear")[0, 0] < 8
    assert torch.equal(s["occupancy_128"], ref128)
    assert torch.equal(s["occupancy_64"], ref64)
    wt = torch.from_numpy(vol["weighting"]).float()
    assert torch.equal(s["weighting_256"], wt)
    assert torch.allclose(s["weighting_128"], F.interpolate(wt[None, None], scale_factor=0.5, mode="trilinear")[0, 0])
    assert torch.equal(s["mp_occ"], g < 12)
    assert torch.equal(s["frustum_mask"], torch.from_numpy(vol["frustum"]))
    # intrinsic: front3d intrinsic rescaled from 320x240 to the stored 40x30 frame
    k = s["intrinsic"].double()
    assert k[0, 0].item() == pytest.approx(277.1281435 * W / 320, rel=1e-6)
    assert k[0, 2].item() == pytest.approx(159.5 * (W - 1) / 319, rel=1e-6)
    assert s["meta"]["key"] == "scene-a_0007"


def test_target_size_resizes_image_and_maps(front3d_root):
    root, _ = front3d_root
    cfg = DatasetConfig(name="front3d", root=root, **small_config(target_size=(2 * W, 2 * H), min_instance_pixels=300))
    s = PanopticReconstructionDataset(cfg)[0]
    assert s["image"].shape == (3, 2 * H, 2 * W)
    assert s["sem_seg"].shape == (2 * H, 2 * W)
    assert int(s["masks"][0].sum()) == 400  # the 10x10 chair is 20x20 at twice the size, passes 300
    k = s["intrinsic"].double()
    assert k[0, 0].item() == pytest.approx(277.1281435 * 2 * W / 320, rel=1e-6)


def test_matterport_reader(tmp_path):
    vol = write_matterport(tmp_path)
    cfg = DatasetConfig(name="matterport", root=tmp_path, enable_3d=True, downsample_factor=2, iso_value=2.0,
                        eval_targets=True, frustum_mask_path=None, **small_config())
    ds = PanopticReconstructionDataset(cfg)
    frame = ds.read_frame(0)
    # no flips, |signed distance|, frustum = ~mask
    np.testing.assert_array_equal(frame.geometry[vol["frustum"]], vol["geometry"][vol["frustum"]])
    np.testing.assert_array_equal(frame.geometry[~vol["frustum"]], 12.0)
    np.testing.assert_array_equal(frame.frustum, vol["frustum"])
    np.testing.assert_array_equal(frame.semantic_3d, vol["semantic"])
    np.testing.assert_array_equal(frame.intrinsic, vol["intrinsic"])
    np.testing.assert_allclose(frame.depth, vol["depth_raw"] / 4000.0, rtol=1e-6)
    assert any("room mask" in n for n in frame.notes)
    s = ds[0]
    assert s["labels"].tolist() == [3, 11, 12]  # stuff = 10, 11, 12 in the colormap; ceiling present
    assert s["depth"][0, :5].eq(0).all() and s["depth"][1, :3].eq(0).all()  # missing / out of range -> 0
    assert bool(s["room_mask"].all())
    assert s["eval_masks"].shape[1:] == (GRID // 2,) * 3
    assert s["meta"]["notes"]


def test_matterport_room_mask_used_when_present(tmp_path):
    write_matterport(tmp_path, room_mask=True)
    ds = PanopticReconstructionDataset(DatasetConfig(name="matterport", root=tmp_path, enable_mp_occ=False,
                                                     **small_config()))
    s = ds[0]
    assert not s["room_mask"][:, :10].any() and s["room_mask"][:, 10:].all()
    assert s["meta"]["notes"] == []


def test_contiguous_id_false_remaps(tmp_path):
    from datasets3d.colormap import default_colormap

    cmap = default_colormap()
    for e in cmap:
        del e["trainId"]
        e["id"] = e["id"] * 10  # sparse dataset ids 10..120
    sem_map = {c: c * 10 for c in range(1, 13)}
    write_front3d(tmp_path, colormap=cmap)
    # rewrite the segmap with sparse ids
    from datasets3d.io import save_npz

    seg_path = tmp_path / "data" / "scene-a" / "segmap_0007.mapped.npz"
    seg = np.load(seg_path)["data"].copy()
    sem = seg[..., 0]
    seg[..., 0] = np.vectorize(lambda v: sem_map.get(int(v), 0))(sem)
    save_npz(seg_path, data=seg)
    ds = PanopticReconstructionDataset(DatasetConfig(name="front3d", root=tmp_path, contiguous_id=False,
                                                     enable_mp_occ=False, **small_config()))
    assert ds[0]["labels"].tolist() == [3, 10, 11]
    assert ds.labels.stuff_ids == (10, 11, 12)


def test_voxel_size_is_not_hard_coded(front3d_root):
    root, _ = front3d_root
    cfg = DatasetConfig(name="front3d", root=root, **small_config())
    s = PanopticReconstructionDataset(cfg)[0]
    assert s["camera_to_grid"][0, 0].item() == pytest.approx(1 / VOXEL)


def test_frame_carries_its_frustum_geometry(front3d_root):
    from frustum3d.geometry import FrustumGeometry, rescale_intrinsic

    root, _ = front3d_root
    cfg = DatasetConfig(name="front3d", root=root, enable_3d=True, frustum_mask_path=None, **small_config())
    ds = PanopticReconstructionDataset(cfg)
    frame = ds.read_frame(0)
    geo = frame.frustum_geometry
    assert isinstance(geo, FrustumGeometry)
    assert geo.grid_dims == (GRID,) * 3 and geo.voxel_size == frame.voxel_size
    assert geo.depth_range == (cfg.depth_min, cfg.depth_max) and geo.image_size == frame.image_size
    plane = (frame.image_size[0] // 2, frame.image_size[1] // 2)
    k_plane = rescale_intrinsic(frame.intrinsic, frame.image_size, plane)
    assert geo.plane_size == plane and torch.equal(geo.plane_intrinsic(), k_plane)
    # the reader's transform and analytic frustum are the geometry's, equal to those of a grid built from the
    # config alone with the plane intrinsic passed per call
    built = FrustumGeometry(grid_dims=geo.grid_dims, voxel_size=geo.voxel_size, depth_min=cfg.depth_min,
                            depth_max=cfg.depth_max, plane_size=plane)
    np.testing.assert_array_equal(frame.camera_to_grid, built.camera_to_grid(k_plane).numpy())
    np.testing.assert_array_equal(frame.camera_to_grid, geo.camera_to_grid().numpy())
    np.testing.assert_array_equal(frame.frustum, built.frustum_mask(k_plane).numpy())
