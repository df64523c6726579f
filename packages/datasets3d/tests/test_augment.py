"""Training-time augmentation: 3D-consistent flips, colour, 2D crop/resize, deterministic draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets3d import DatasetConfig, PanopticReconstructionDataset, build_sample
from datasets3d.augment import (
    AugmentKey,
    EpochBatchSampler,
    EpochSampler,
    fields_from_toolkit,
    make_plan,
)
from datasets3d.augment2d import ColorJitter, draw_crop, flip_planar, hsv_to_rgb, mirror_intrinsic, rgb_to_hsv
from datasets3d.augment3d import flip_volumes, mirror_offset
from datasets3d.checks import depth_alignment
from datasets3d.sample import planar_maps
from datasets3d.synth import generate
from ds3d_testutil import FRONT3D_REAL, MATTERPORT_REAL, needs_front3d_real, needs_matterport_real
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

SMALL = dict(target_size=(80, 60), reduced_target_size=(40, 30), depth_size=(30, 40), min_instance_pixels=20)
VOLUMES = ("geometry", "semantic_3d", "instance_3d", "weighting", "frustum")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_aug")
    generate(out, scenes=2, frames_per_scene=3, grid=64, image_size=(80, 60), seed=3)
    return out


def dataset(root, **kw) -> PanopticReconstructionDataset:
    return PanopticReconstructionDataset(DatasetConfig(name="synthetic", root=root, **{**SMALL, **kw}))


def assert_samples_equal(a: dict, b: dict, skip: tuple[str, ...] = ()) -> None:
    assert set(a) == set(b)
    for k in a:
        if k in skip:
            continue
        va, vb = a[k], b[k]
        if isinstance(va, torch.Tensor):
            assert va.dtype == vb.dtype and torch.equal(va, vb), k
        elif k != "meta":
            assert va == vb, k


def alignment(s: dict, c2g=None, reduced: bool = False):
    d, k = ("depth_reduced", "intrinsic_reduced") if reduced else ("depth", "intrinsic")
    m = s["camera_to_grid"].numpy() if c2g is None else c2g
    return depth_alignment(s[d].numpy(), s[k].numpy().astype(np.float64), m, s["geometry"].numpy())


# --------------------------------------------------------------------------- defaults
def test_defaults_leave_samples_untouched(root):
    ds = dataset(root, enable_3d=True, eval_targets=True)
    off = dataset(root, enable_3d=True, eval_targets=True, random_flip="horizontal", random_flip_prob=0.0)
    for i in range(len(ds)):
        direct = build_sample(ds.read_frame(i), ds.config, ds.labels, i)
        for s in (ds[i], ds[AugmentKey(i, 7)], off[i]):
            assert_samples_equal(s, direct)
            assert "augment" not in s["meta"]
    assert make_plan(ds.config, AugmentKey(0, 3)) is None


# --------------------------------------------------------------------------- flip
@pytest.mark.parametrize("direction,axis", [("horizontal", 0), ("vertical", 1)])
def test_flip_keeps_depth_on_the_flipped_surface(root, direction, axis):
    base = dataset(root, enable_3d=True, eval_targets=True)
    flip = dataset(root, enable_3d=True, eval_targets=True, random_flip=direction, random_flip_prob=1.0)
    bads = []
    for i in range(len(base)):
        s0, s1 = base[i], flip[i]
        rec = s1["meta"]["augment"]
        assert rec["flip"] == direction and rec["lost_occupied_voxels"] == 0
        a0, a1 = alignment(s0), alignment(s1)
        assert a1.frac_df_below >= 0.95 and a1.frac_df_below == pytest.approx(a0.frac_df_below, abs=1e-9)
        assert a1.median_df == pytest.approx(a0.median_df, abs=1e-6)
        assert alignment(s1, reduced=True).frac_df_below >= 0.95
        # teeth: flipped depth on the unflipped geometry does not align
        bad = depth_alignment(s1["depth"].numpy(), s1["intrinsic"].numpy().astype(np.float64),
                              s0["camera_to_grid"].numpy(), s0["geometry"].numpy())
        bads.append(bad.frac_df_below)
        # against the grid frustum3d builds from the flipped intrinsic (what the lifting uses): the
        # residual of at most half a voxel still keeps the depth on the surface
        f = flip.read_frame(i)
        c2g = flip.reader.camera_to_grid(mirror_intrinsic(f.intrinsic, f.image_size, axis).numpy(),
                                         f.image_size, f.geometry.shape)
        assert abs(c2g[axis, 3] - float(s1["camera_to_grid"][axis, 3]) - rec["grid_residual"]) < 1e-4
        assert abs(rec["grid_residual"]) <= 0.5
        assert alignment(s1, c2g).frac_df_below >= 0.95
        # principal point mirrored in frustum3d's pixel convention (centres at integers)
        w, h = s1["image"].shape[2], s1["image"].shape[1]
        size = (w, h)[axis]
        assert float(s1["intrinsic"][axis, 2]) == pytest.approx(size - 1 - float(s0["intrinsic"][axis, 2]))
    assert np.mean(bads) < 0.75  # (rooms are nearly symmetric: single frames can still score high)


def test_flip_labels_agree_in_3d(root):
    """2D labels of the flipped image meet the same 3D labels at the back-projected voxel."""
    ds = dataset(root, enable_3d=True, random_flip="horizontal", random_flip_prob=1.0)
    for i in range(len(ds)):
        s = ds[i]
        frame, _ = flip_volumes(ds.read_frame(i), ds.reader, 0, 12.0)
        sem2d = s["sem_seg"].numpy().copy()
        sem2d[sem2d == 255] = 0
        st = depth_alignment(s["depth"].numpy(), s["intrinsic"].numpy().astype(np.float64),
                             s["camera_to_grid"].numpy(), frame.geometry, sem2d, frame.semantic_3d)
        assert st.n_labelled > 0 and st.semantic_agreement >= 0.95


def test_flip_moves_every_target_with_the_image(root):
    base = dataset(root, enable_3d=True, eval_targets=True)
    flip = dataset(root, enable_3d=True, eval_targets=True, random_flip="horizontal", random_flip_prob=1.0)
    s0, s1 = base[1], flip[1]
    n = s1["meta"]["augment"]["grid_shift"]
    for k in ("image", "depth", "sem_seg", "inst_seg", "room_mask", "depth_reduced", "masks"):
        assert torch.equal(s1[k], s0[k].flip(-1)), k
    for k in ("labels", "instance_ids", "is_thing", "eval_labels", "eval_instance_ids"):
        assert torch.equal(s1[k], s0[k]), k
    torch.testing.assert_close(s1["mean_depths"], s0["mean_depths"])  # same pixels, other summation order

    def moved(t: torch.Tensor, axis: int) -> torch.Tensor:  # out[i] = t[X-1-i+n] where in range
        return torch.roll(t.flip(axis), n, axis)

    x = s0["geometry"].shape[0]
    keep = slice(max(n, 0), x + min(n, 0))  # voxels whose source lies inside the grid
    for k, ax in (("geometry", 0), ("occupancy_256", 0), ("weighting_256", 0), ("frustum_mask", 0),
                  ("masks_3d_256", 1)):
        idx = (slice(None),) * ax + (keep,)
        assert torch.equal(s1[k][idx], moved(s0[k], ax)[idx]), k
    assert s1["mp_occ"] is s1["occupancy_256"]
    assert s1["masks_3d_128"].sum() > 0 and len(s1["eval_masks"]) == len(s0["eval_masks"])


def test_flip_twice_is_identity(root):
    ds = dataset(root, enable_3d=True, eval_targets=True)
    for i in range(len(ds)):
        frame = ds.read_frame(i)
        once, rec = flip_volumes(frame, ds.reader, 0, 12.0)
        twice, rec2 = flip_volumes(once, ds.reader, 0, 12.0)
        assert rec["grid_shift"] == rec2["grid_shift"] != 0 and rec2["lost_occupied_voxels"] == 0
        for name in VOLUMES:
            assert np.array_equal(getattr(twice, name), getattr(frame, name)), name
            assert not np.array_equal(getattr(once, name), getattr(frame, name)), name
        np.testing.assert_array_equal(twice.camera_to_grid, frame.camera_to_grid)
        assert_samples_equal(build_sample(twice, ds.config, ds.labels, i), build_sample(frame, ds.config, ds.labels, i))
        p = planar_maps(frame, ds.config)
        pp = flip_planar(flip_planar(p, 0), 0)
        for name in ("rgb", "depth", "semantic", "instance", "room", "depth_reduced", "room_reduced"):
            assert np.array_equal(getattr(pp, name), getattr(p, name)), name
        torch.testing.assert_close(pp.k_target, p.k_target, rtol=0, atol=1e-12)
        torch.testing.assert_close(pp.k_reduced, p.k_reduced, rtol=0, atol=1e-12)


def test_mirror_offset_is_measured_not_assumed(root):
    """The flipped camera's grid is not the mirror of the original one (README: -1.708 voxels here)."""
    ds = dataset(root, enable_3d=True)
    f = ds.read_frame(0)
    assert mirror_offset(f, ds.reader, 0) == pytest.approx(-1.7083516, abs=1e-6)
    k = f.intrinsic.copy()
    k[0, 2] += 3.0  # independent of the principal point
    c2g = ds.reader.camera_to_grid(k, f.image_size, f.geometry.shape)  # the volumes' transform follows the camera
    moved = type(f)(**{**f.__dict__, "intrinsic": k, "camera_to_grid": c2g})
    assert mirror_offset(moved, ds.reader, 0) == pytest.approx(-1.7083516, abs=1e-6)


# --------------------------------------------------------------------------- colour
def test_colour_touches_rgb_only(root):
    base = dataset(root, enable_3d=True, eval_targets=True)
    col = dataset(root, enable_3d=True, eval_targets=True, color_aug_ssd=True)
    changed = 0
    for i in range(len(base)):
        s0, s1 = base[i], col[i]
        assert_samples_equal(s1, s0, skip=("image",))
        assert s1["image"].shape == s0["image"].shape and s1["image"].dtype == torch.float32
        assert 0.0 <= float(s1["image"].min()) and float(s1["image"].max()) <= 255.0
        changed += int(not torch.equal(s1["image"], s0["image"]))
    assert changed >= len(base) - 1  # each step has p=1/2: all four are skipped with p=1/16


def test_hsv_round_trip_and_hue_shift():
    rgb = np.random.default_rng(0).random((50, 3))
    np.testing.assert_allclose(hsv_to_rgb(rgb_to_hsv(rgb)), rgb, atol=1e-12)
    red = np.array([[1.0, 0.0, 0.0]])
    hsv = rgb_to_hsv(red)
    hsv[..., 0] += 120.0
    np.testing.assert_allclose(hsv_to_rgb(hsv), [[0.0, 1.0, 0.0]], atol=1e-12)
    img = np.full((2, 2, 3), 100.0, dtype=np.float32)
    out = ColorJitter(brightness=10.0, contrast=2.0, saturation=None, hue=None, contrast_last=True).apply(img)
    np.testing.assert_allclose(out, 220.0)


# --------------------------------------------------------------------------- crop / resize (2D stage)
def test_crop_updates_the_intrinsic(root):
    base = dataset(root)
    crop = dataset(root, enable_crop=True, crop_size=(40, 56))
    for i in range(len(base)):
        s0, s1 = base[i], crop[i]
        x0, y0, w, h = s1["meta"]["augment"]["crop"]
        assert (w, h) == (56, 40) and tuple(s1["image"].shape) == (3, 40, 56)
        assert torch.equal(s1["depth"], s0["depth"][y0:y0 + h, x0:x0 + w])
        # a 3D point seen at pixel (u, v) of the full image projects to (u - x0, v - y0) of the crop
        v, u = np.nonzero(s0["depth"].numpy() > 0)
        z = s0["depth"].numpy()[v, u].astype(np.float64)
        k0, k1 = s0["intrinsic"].double().numpy(), s1["intrinsic"].double().numpy()
        x, y = (u - k0[0, 2]) * z / k0[0, 0], (v - k0[1, 2]) * z / k0[1, 1]
        np.testing.assert_allclose(x * k1[0, 0] / z + k1[0, 2], u - x0, atol=1e-4)
        np.testing.assert_allclose(y * k1[1, 1] / z + k1[1, 2], v - y0, atol=1e-4)
        # the cropped depth back-projected with the cropped intrinsic lands on the (uncropped) surface
        g = crop.read_frame(i)
        st = depth_alignment(s1["depth"].numpy(), k1, g.camera_to_grid, g.geometry)
        assert st.n_valid > 0 and st.frac_df_below >= 0.95
        red = s1["meta"]["augment"]["reduced_size"]
        assert tuple(s1["depth_reduced"].shape) == (red[1], red[0]) == (20, 28)
        st = depth_alignment(s1["depth_reduced"].numpy(), s1["intrinsic_reduced"].double().numpy(),
                             g.camera_to_grid, g.geometry)
        assert st.frac_df_below >= 0.95
        assert s1["masks"].shape[1:] == (40, 56)


def test_resize_then_crop_then_flip_stays_aligned(root):
    ds = dataset(root, train_min_size=(90,), train_max_size=200, enable_crop=True, crop_size=(64, 96),
                 random_flip="horizontal", random_flip_prob=1.0, single_category_max_area=0.9)
    for i in range(len(ds)):
        s = ds[i]
        rec = s["meta"]["augment"]
        assert rec["resize"] == (120, 90) and tuple(s["image"].shape) == (3, 64, 96)
        g = ds.read_frame(i)
        # mp_occ (read for the 2D stage) is flipped with the image; check against the flipped frame's TDF
        flipped, _ = flip_volumes(g, ds.reader, 0, 12.0)
        assert torch.equal(s["camera_to_grid"], torch.from_numpy(flipped.camera_to_grid).float())
        st = depth_alignment(s["depth"].numpy(), s["intrinsic"].double().numpy(), flipped.camera_to_grid,
                             flipped.geometry)
        assert st.frac_df_below >= 0.95, st


def test_crop_avoids_single_category_crops():
    semantic = np.ones((30, 100), dtype=np.int64)
    semantic[:, 50:] = 2  # a 40-wide crop keeps both classes under 80 % only when 18 < x0 < 42 (p ~ 0.38)

    def qualifies(x0: int) -> bool:
        counts = np.bincount(semantic[:, x0:x0 + 40].ravel())[1:]
        return bool(counts.max() < 0.8 * counts.sum())

    hits = single = 0
    for seed in range(20):
        x0, y0, w, h = draw_crop(np.random.default_rng(seed), semantic, (30, 40), 0.8)
        assert (w, h) == (40, 30) and y0 == 0
        hits += qualifies(x0)
        single += qualifies(draw_crop(np.random.default_rng(seed), semantic, (30, 40), 1.0)[0])
    assert hits >= 18 and single <= 14  # 10 tries succeed ~99 % of the time, one draw ~38 %


def test_crop_and_resize_are_refused_with_3d_targets():
    for kw in (dict(enable_crop=True), dict(train_min_size=(240,))):
        for stage in (dict(enable_3d=True), dict(eval_targets=True)):
            with pytest.raises(ValueError, match="2D-stage augmentation"):
                DatasetConfig(**kw, **stage)


@pytest.mark.parametrize("kw,match", [
    (dict(random_flip="diagonal"), "random_flip='diagonal'"),
    (dict(random_flip_prob=1.5), "random_flip_prob"),
    (dict(single_category_max_area=0.0), "single_category_max_area"),
    (dict(train_min_size=(0,)), "train_min_size"),
    (dict(crop_size=(0, 5)), "crop_size"),
    (dict(augment_seed=-1), "augment_seed"),
])
def test_bad_augmentation_config(kw, match):
    with pytest.raises(ValueError, match=match):
        DatasetConfig(**kw)


def test_toolkit_mapping():
    spec = {"train_min_size": [240], "train_max_size": 960, "train_crop_size": [240, 240], "test_min_size": 240,
            "color_aug_ssd": True, "enable_crop": False, "crop_size": [200, 300], "single_category_max_area": 1.0,
            "random_flip": "horizontal", "random_flip_prob": 0.5, "size_divisibility": 32, "gen_aug_weight": 0.0}
    fields = fields_from_toolkit(spec, seed=11)
    assert fields == {"augment_seed": 11, "random_flip": "horizontal", "random_flip_prob": 0.5, "color_aug_ssd": True,
                      "enable_crop": False, "single_category_max_area": 1.0, "train_max_size": 960,
                      "crop_size": (200, 300), "train_min_size": (240,)}
    cfg = DatasetConfig(**fields)
    assert cfg.train_min_size == (240,) and cfg.crop_size == (200, 300)
    with pytest.raises(ValueError, match="gen_aug_weight"):
        fields_from_toolkit({"gen_aug_weight": 0.5})


# --------------------------------------------------------------------------- determinism
def test_same_key_same_sample_other_epoch_other_draw(root):
    kw = dict(enable_3d=True, random_flip="horizontal", color_aug_ssd=True, augment_seed=5)
    a, b = dataset(root, **kw), dataset(root, **kw)
    order = [AugmentKey(2, 4), AugmentKey(0, 4), AugmentKey(2, 4)]
    first = [a[k] for k in order]
    assert_samples_equal(first[0], first[2])
    assert_samples_equal(b[AugmentKey(2, 4)], first[0])  # another instance, other call history
    assert first[0]["meta"]["augment"] == b[AugmentKey(2, 4)]["meta"]["augment"]
    records = [a[AugmentKey(2, e)]["meta"]["augment"] for e in range(6)]
    assert len({repr(r["color"]) for r in records}) == 6
    assert {r["flip"] for r in records} == {"", "horizontal"}
    b.set_epoch(4)
    assert_samples_equal(b[2], first[0])
    other_seed = dataset(root, **{**kw, "augment_seed": 6})[AugmentKey(2, 4)]["meta"]["augment"]
    assert other_seed["color"] != first[0]["meta"]["augment"]["color"]


def test_epoch_reaches_persistent_workers(root):
    ds = dataset(root, color_aug_ssd=True, random_flip="horizontal")
    sampler = EpochSampler(SequentialSampler(range(len(ds))))
    loader = DataLoader(ds, batch_size=None, sampler=sampler, num_workers=1, persistent_workers=True)
    for epoch in (0, 3):
        sampler.set_epoch(epoch)
        got = list(loader)
        assert [s["meta"]["augment"]["epoch"] for s in got] == [epoch] * len(ds)
        for i, s in enumerate(got):
            assert torch.equal(s["image"], ds[AugmentKey(i, epoch)]["image"])


def test_batch_sampler_shares_the_scale_draw(root):
    ds = dataset(root, train_min_size=(40, 50, 60, 70, 80, 90, 100), train_max_size=400)
    inner = EpochSampler(SequentialSampler(range(len(ds))))
    bs = EpochBatchSampler(BatchSampler(inner, batch_size=3, drop_last=False))
    bs.set_epoch(2)  # what Lightning does: ``loader.batch_sampler.sampler.set_epoch(2)``
    assert bs.sampler is inner and inner.epoch == 2
    batches = list(bs)
    assert [[k.group for k in b] for b in batches] == [[0, 0, 0], [1, 1, 1]]
    assert {k.epoch for b in batches for k in b} == {2}
    sizes = [[ds[k]["meta"]["augment"]["resize"] for k in batch] for batch in batches]
    assert all(len(set(b)) == 1 for b in sizes)
    per_frame = {ds[AugmentKey(i, 2)]["meta"]["augment"]["resize"] for i in range(len(ds))}
    assert len(per_frame) > 1  # without a group each frame draws its own size


# --------------------------------------------------------------------------- real frames (shared fixtures)
@needs_matterport_real
def test_real_matterport_flip_keeps_alignment():
    kw = dict(name="matterport", root=MATTERPORT_REAL, json_path="meta/val.json", enable_3d=True,
              frustum_mask_path=None)
    base = PanopticReconstructionDataset(DatasetConfig(**kw))
    flip = PanopticReconstructionDataset(DatasetConfig(**kw, random_flip="horizontal", random_flip_prob=1.0))
    s0, s1 = base[0], flip[0]
    rec = s1["meta"]["augment"]
    assert rec["grid_shift"] == -2 and rec["lost_occupied_voxels"] == 0
    a0, a1 = alignment(s0), alignment(s1)
    assert a1.median_df == pytest.approx(a0.median_df, abs=1e-6) and 1.8 <= a1.median_df <= 2.5
    assert torch.equal(s1["room_mask"], s0["room_mask"].flip(-1))
    assert int(s1["frustum_mask"].sum()) == int(s0["frustum_mask"].sum())


@needs_front3d_real
def test_real_front3d_flip_keeps_alignment():
    kw = dict(name="front3d", root=FRONT3D_REAL, json_path="meta/val.json", enable_3d=True, eval_targets=True)
    base = PanopticReconstructionDataset(DatasetConfig(**kw))
    flip = PanopticReconstructionDataset(DatasetConfig(**kw, random_flip="horizontal", random_flip_prob=1.0))
    s0, s1 = base[0], flip[0]
    rec = s1["meta"]["augment"]
    # README: reference grid, delta = -2.503 voxels -> shift -3, residual 0.497
    assert rec["grid_shift"] == -3 and rec["grid_delta"] == pytest.approx(-2.50328, abs=1e-4)
    assert rec["lost_occupied_voxels"] == 0
    a0, a1 = alignment(s0), alignment(s1)
    assert a1.median_df == pytest.approx(a0.median_df, abs=1e-6) and 0.8 <= a1.median_df <= 1.4
    assert a1.frac_df_below == pytest.approx(a0.frac_df_below, abs=1e-9)
    assert int(s1["frustum_mask"].sum()) == int(s0["frustum_mask"].sum())
    assert torch.equal(s1["eval_labels"], s0["eval_labels"])
    assert len(s1["eval_masks"]) == len(s0["eval_masks"]) and all(int(m.sum()) > 0 for m in s1["eval_masks"])
    # every surface voxel stays inside the (flipped) frustum. The eval masks themselves are not mirror
    # images: the metric's thickening is a +1-shifted dilation, re-derived after the flip, so near the
    # frustum border a different part of it is cut off (a small object here: 948 -> 693 voxels)
    f0 = flip.read_frame(0)
    f1, _ = flip_volumes(f0, flip.reader, 0, 12.0)
    for f in (f0, f1):
        assert int((f.geometry < 1).sum()) == 65740 and not ((f.geometry < 1) & ~f.frustum).any()
