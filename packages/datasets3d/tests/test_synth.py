"""Synthetic generator: format round trip through the reader, geometry checks, determinism, speed."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from datasets3d import DatasetConfig, PanopticReconstructionDataset, collate_samples
from datasets3d.checks import depth_alignment
from datasets3d.synth import generate, main, make_camera_setup
from torch.utils.data import DataLoader

SMALL = dict(target_size=(80, 60), reduced_target_size=(40, 30), depth_size=(30, 40), min_instance_pixels=20)


@pytest.fixture(scope="module")
def synth32(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth32")
    t0 = time.perf_counter()
    summary = generate(root, scenes=4, frames_per_scene=8, grid=64, image_size=(80, 60), seed=0)
    return root, summary, time.perf_counter() - t0


def test_32_frames_in_seconds(synth32):
    root, summary, elapsed = synth32
    assert summary["frames"] == 32
    # a few seconds on a free core; generous bound for a loaded CI machine
    assert elapsed < 90, f"generating 32 frames at 64^3 took {elapsed:.1f} s"
    assert summary["cpu_seconds_per_frame"] < 1.0
    assert sum(summary["splits"].values()) == 32
    assert len(list((root / "data").glob("*/rgb_*.png"))) == 32


def test_on_disk_format_is_exact(synth32):
    root, _, _ = synth32
    d = sorted((root / "data").iterdir())[0]
    names = sorted(p.name for p in d.iterdir())
    assert names[:6] == ["depth_0000.exr", "depth_0001.exr", "depth_0002.exr", "depth_0003.exr", "depth_0004.exr",
                         "depth_0005.exr"]
    for stem, key, dtype, shape in [("segmap_0000.mapped.npz", "data", np.uint32, (60, 80, 2)),
                                    ("geometry_0000.npz", "data", np.float32, (64, 64, 64)),
                                    ("segmentation_0000.mapped.npz", "data", np.int32, (2, 64, 64, 64)),
                                    ("weighting_0000.npz", "data", np.int16, (64, 64, 64))]:
        with np.load(d / stem) as z:  # the plain numpy loader reads our files
            assert list(z.keys()) == [key]
            assert z[key].dtype == dtype and z[key].shape == shape
    with np.load(root / "meta" / "frustum_mask.npz") as z:
        assert z["mask"].dtype == bool and z["mask"].shape == (64, 64, 64)
    entries = json.loads((root / "meta" / "train.json").read_text())
    assert set(entries[0]) == {"scene_id", "image_id", "height", "width"}
    geom = np.load(d / "geometry_0000.npz")["data"]
    assert geom.min() >= 0 and geom.max() == 12.0


def test_geometry_checks_through_the_reader(synth32):
    root, summary, _ = synth32
    fracs, agrees = [], []
    for split in ("train", "val", "test"):
        ds = PanopticReconstructionDataset(DatasetConfig(name="synthetic", root=root, json_path=f"meta/{split}.json",
                                                         enable_3d=True, **SMALL))
        for i in range(len(ds)):
            f = ds.read_frame(i)
            st = depth_alignment(f.depth, f.intrinsic, f.camera_to_grid, f.geometry, f.semantic, f.semantic_3d)
            fracs.append(st.frac_df_below)
            agrees.append(st.semantic_agreement)
            # labels live exactly on voxels with distance < 1, and only inside the frustum
            assert np.array_equal(f.semantic_3d > 0, f.geometry < 1)
            assert not (f.geometry[~f.frustum] < 12).any()
    assert len(fracs) == 32
    assert min(fracs) >= 0.95, fracs
    assert min(agrees) >= 0.95, agrees
    assert summary["min_frac_df_below_1.5"] >= 0.95 and summary["min_semantic_agreement"] >= 0.95
    # a wrong flip must break the alignment (the check has teeth)
    f = ds.read_frame(0)
    bad = depth_alignment(f.depth, f.intrinsic, f.camera_to_grid, np.flip(f.geometry, (0, 1)))
    assert bad.frac_df_below < 0.6


def test_frustum_round_trip_and_camera(synth32):
    root, summary, _ = synth32
    setup = make_camera_setup(64, (80, 60))
    ds = PanopticReconstructionDataset(DatasetConfig(name="synthetic", root=root, **SMALL))
    f = ds.read_frame(0)
    np.testing.assert_array_equal(f.frustum, setup.frustum())
    np.testing.assert_allclose(f.camera_to_grid, setup.camera_to_grid())
    assert f.voxel_size == pytest.approx(0.12)
    # the front3d reader (default intrinsic rescaled to the json size) reads the same frames
    ds_f = PanopticReconstructionDataset(DatasetConfig(name="front3d", root=root, voxel_size=0.12, **SMALL))
    np.testing.assert_allclose(ds_f.read_frame(0).intrinsic, f.intrinsic)


def test_samples_and_dataloader(synth32):
    root, _, _ = synth32
    ds = PanopticReconstructionDataset(DatasetConfig(name="synthetic", root=root, enable_3d=True, eval_targets=True,
                                                     **SMALL))
    s = ds[0]
    f = ds.read_frame(0)
    n = len(s["labels"])
    assert n >= 2 and s["masks"].shape == (n, 60, 80) and s["masks_3d_256"].shape == (n, 64, 64, 64)
    for k in range(n):
        if s["is_thing"][k]:
            ref = f.instance_3d == int(s["instance_ids"][k])
        else:
            ref = f.semantic_3d == int(s["labels"][k])
        assert torch.equal(s["masks_3d_256"][k], torch.from_numpy(ref))
    loader = DataLoader(ds, batch_size=4, num_workers=0, collate_fn=collate_samples)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 60, 80) and batch["geometry"].shape == (4, 64, 64, 64)
    assert len(batch["masks_3d_64"]) == 4 and batch["occupancy_64"].shape == (4, 16, 16, 16)


def test_determinism_and_scene_independence(tmp_path):
    a = generate(tmp_path / "a", 2, 1, grid=32, image_size=(40, 30), seed=7, check=False)
    b = generate(tmp_path / "b", 2, 1, grid=32, image_size=(40, 30), seed=7, check=False)
    c = generate(tmp_path / "c", 1, 1, grid=32, image_size=(40, 30), seed=8, check=False)
    d = generate(tmp_path / "d", 1, 1, grid=32, image_size=(40, 30), seed=7, check=False)
    assert a["frames"] == b["frames"] == 2
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    for rel in files_a:
        if rel.name == "camera.json":
            continue
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    scene0 = "data/synth-0007-00000"
    for name in ("rgb_0000.png", "geometry_0000.npz", "segmap_0000.mapped.npz"):
        assert (tmp_path / "a" / scene0 / name).read_bytes() == (tmp_path / "d" / scene0 / name).read_bytes()
    ra = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "a" / scene0 / "rgb_0000.png"))
    rc = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "c" / "data/synth-0008-00000" / "rgb_0000.png"))
    assert not np.array_equal(ra, rc)
    assert c["frames"] == d["frames"] == 1


def test_extra_test_scenes_join_the_test_split_only(tmp_path):
    # the train/val scenes of 4 scenes stay the same; 2 more rooms are held out in the test split only
    base = generate(tmp_path / "base", 4, 1, grid=32, image_size=(40, 30), seed=5, check=False)
    more = generate(tmp_path / "more", 4, 1, grid=32, image_size=(40, 30), seed=5, check=False, extra_test_scenes=2)
    assert base["splits"] == {"train": 2, "val": 1, "test": 1}
    assert more["splits"] == {"train": 2, "val": 1, "test": 3} and more["frames"] == 6

    def scenes(root, split):
        return [e["scene_id"] for e in json.loads((root / "meta" / f"{split}.json").read_text())]

    for split in ("train", "val"):
        assert scenes(tmp_path / "more", split) == scenes(tmp_path / "base", split)
    assert scenes(tmp_path / "more", "test") == [f"synth-0005-{s:05d}" for s in (3, 4, 5)]
    rel = "data/synth-0005-00003/rgb_0000.png"  # the base split's own held-out scene is unchanged
    assert (tmp_path / "more" / rel).read_bytes() == (tmp_path / "base" / rel).read_bytes()
    with pytest.raises(ValueError, match="extra_test_scenes"):
        generate(tmp_path / "bad", 4, 1, grid=32, image_size=(40, 30), extra_test_scenes=-1, check=False)


def test_cli_main(tmp_path, capsys):
    rc = main(["--out", str(tmp_path / "cli"), "--scenes", "1", "--frames-per-scene", "2", "--grid", "32",
               "--image", "40x30", "--seed", "3"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames"] == 2 and summary["grid"] == [32, 32, 32] and summary["image_size"] == [40, 30]
    assert (tmp_path / "cli" / "meta" / "camera.json").is_file()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--scenes", "1", "--frames-per-scene", "1", "--image", "40by30"])


@pytest.mark.slow
def test_full_size_frame(tmp_path):
    """One 256^3 / 320x240 frame: generation time and the geometry checks at the released resolution."""
    summary = generate(tmp_path, 1, 1, grid=256, image_size=(320, 240), seed=1)
    assert summary["min_frac_df_below_1.5"] >= 0.95 and summary["min_semantic_agreement"] >= 0.95
    assert summary["cpu_seconds_per_frame"] < 15
    ds = PanopticReconstructionDataset(DatasetConfig(name="synthetic", root=tmp_path, enable_3d=True))
    s = ds[0]
    assert s["geometry"].shape == (256, 256, 256) and s["occupancy_64"].shape == (64, 64, 64)


def test_worker_samples_equal_in_process_samples(synth32):
    """Samples built in DataLoader workers (shared-memory tensors) equal those built in-process."""
    root, _, _ = synth32
    ds = PanopticReconstructionDataset(DatasetConfig(name="synthetic", root=root, json_path="meta/val.json",
                                                     enable_3d=True, **SMALL))
    loader = DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate_samples)
    for i, batch in enumerate(loader):
        ref = ds[i]
        for key in ("geometry", "occupancy_256", "occupancy_64", "weighting_128", "mp_occ", "frustum_mask"):
            assert torch.equal(batch[key][0], ref[key]), key
        for key in ("masks_3d_256", "masks_3d_128", "masks_3d_64", "labels"):
            assert torch.equal(batch[key][0], ref[key]), key
        if i == 3:
            break


def test_reused_buffers_do_not_leak_into_samples(synth32):
    """Samples never alias the reusable inflate buffers: building the next sample leaves them intact."""
    root, _, _ = synth32
    cfg = DatasetConfig(name="synthetic", root=root, enable_3d=True, eval_targets=True, **SMALL)
    ds = PanopticReconstructionDataset(cfg)
    s0 = ds[0]
    ds[1]
    ds[2]
    fresh = PanopticReconstructionDataset(cfg)
    ref = fresh.read_frame(0)  # no buffer reuse
    again = ds.read_frame(0, reuse_buffers=True)
    np.testing.assert_array_equal(again.geometry, ref.geometry)
    np.testing.assert_array_equal(again.instance_3d, ref.instance_3d)
    s0_ref = fresh[0]
    for key, value in s0.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, s0_ref[key]), key


def test_class_tint_pulls_furniture_colours_only():
    from datasets3d.synth.scene import CLASS_TINTS, make_room

    plain = make_room(np.random.default_rng([0, 3]))
    zero = make_room(np.random.default_rng([0, 3]), class_tint=0.0)
    tinted = make_room(np.random.default_rng([0, 3]), class_tint=0.8)
    assert len(plain.primitives) == len(tinted.primitives)
    for p, z, t in zip(plain.primitives, zero.primitives, tinted.primitives):
        assert np.array_equal(p.color, z.color)  # 0 = the default room, bit for bit
        assert np.array_equal(p.center, t.center) and p.semantic == t.semantic  # same geometry and labels
        if p.instance > 0:  # furniture: 80 % of the way to its class colour
            np.testing.assert_allclose(t.color, 0.2 * p.color + 0.8 * CLASS_TINTS[p.semantic - 1])
        else:
            assert np.array_equal(p.color, t.color)
