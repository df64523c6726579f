"""Bad input gives one clear error naming the path; skip_bad skips and counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets3d import (
    BadFramesError,
    DatasetConfig,
    DatasetFormatError,
    MissingDataError,
    PanopticReconstructionDataset,
)
from datasets3d.io import save_npz
from ds3d_testutil import small_config, write_front3d, write_matterport


def _ds(root, **kw):
    return PanopticReconstructionDataset(DatasetConfig(name=kw.pop("name", "front3d"), root=root,
                                                       **small_config(**kw)))


def test_missing_root_and_meta(tmp_path):
    with pytest.raises(MissingDataError, match="does not exist"):
        _ds(tmp_path / "nope")
    write_front3d(tmp_path)
    (tmp_path / "meta" / "train.json").unlink()
    with pytest.raises(MissingDataError, match=r"split file.*train\.json"):
        _ds(tmp_path)
    with pytest.raises(MissingDataError, match=r"colormap.*nothere\.json"):
        _ds(tmp_path, json_path="meta/val.json", label_map="meta/nothere.json")


def test_missing_frustum_mask_names_path(tmp_path):
    write_front3d(tmp_path)
    (tmp_path / "meta" / "frustum_mask.npz").unlink()
    with pytest.raises(MissingDataError, match=r"frustum_mask\.npz"):
        _ds(tmp_path)
    # frustum_mask_path=None: analytic frustum instead
    frame = _ds(tmp_path, frustum_mask_path=None).read_frame(0)
    assert frame.frustum.any() and not frame.frustum.all()


def test_empty_split_and_entry_without_scene_id(tmp_path):
    write_front3d(tmp_path)
    (tmp_path / "meta" / "train.json").write_text("[]")
    with pytest.raises(DatasetFormatError, match=r"train\.json is empty"):
        _ds(tmp_path)
    (tmp_path / "meta" / "train.json").write_text(json.dumps([{"image_id": "0007", "height": 30, "width": 40}]))
    with pytest.raises(DatasetFormatError, match=r"train\.json entry 0.*scene_id"):
        _ds(tmp_path)
    (tmp_path / "meta" / "train.json").write_text("{not json")
    with pytest.raises(DatasetFormatError, match=r"train\.json is not valid JSON"):
        _ds(tmp_path)


def test_missing_frame_file_lists_frames_or_skips(tmp_path):
    write_front3d(tmp_path)
    write_front3d(tmp_path, scene="scene-b", image_id="0001")
    entries = [{"scene_id": "scene-a", "image_id": "0007", "height": 30, "width": 40},
               {"scene_id": "scene-b", "image_id": "0001", "height": 30, "width": 40}]
    (tmp_path / "meta" / "train.json").write_text(json.dumps(entries))
    (tmp_path / "data" / "scene-b" / "weighting_0001.npz").unlink()
    with pytest.raises(BadFramesError, match=r"scene-b_0001: missing weighting .*weighting_0001\.npz"):
        _ds(tmp_path, enable_3d=True)
    ds = _ds(tmp_path, enable_3d=True, skip_bad=True)
    assert len(ds) == 1 and len(ds.skipped) == 1 and ds.skipped[0][0] == "scene-b_0001"
    # 2D-only training does not need the weighting file: nothing is skipped
    assert len(_ds(tmp_path, enable_mp_occ=False)) == 2


def test_corrupt_frame_at_read_time(tmp_path):
    write_front3d(tmp_path)
    write_front3d(tmp_path, scene="scene-b", image_id="0001")
    entries = [{"scene_id": "scene-b", "image_id": "0001", "height": 30, "width": 40},
               {"scene_id": "scene-a", "image_id": "0007", "height": 30, "width": 40}]
    (tmp_path / "meta" / "train.json").write_text(json.dumps(entries))
    (tmp_path / "data" / "scene-b" / "geometry_0001.npz").write_bytes(b"this is not a zip file")
    with pytest.raises(DatasetFormatError, match=r"geometry_0001\.npz cannot be read"):
        _ds(tmp_path)[0]
    ds = _ds(tmp_path, skip_bad=True)
    s = ds[0]  # falls through to the next good frame and reports what it skipped
    assert s["meta"]["key"] == "scene-a_0007"
    assert [k for k, _ in s["meta"]["skipped"]] == ["scene-b_0001"]


def test_wrong_key_shape_dtype(tmp_path):
    write_front3d(tmp_path)
    d = tmp_path / "data" / "scene-a"
    seg = np.load(d / "segmap_0007.mapped.npz")["data"]
    save_npz(d / "segmap_0007.mapped.npz", other=seg, more=seg)
    with pytest.raises(DatasetFormatError, match=r"segmap_0007\.mapped\.npz has no array 'data'"):
        _ds(tmp_path)[0]
    save_npz(d / "segmap_0007.mapped.npz", data=seg[..., 0])
    with pytest.raises(DatasetFormatError, match=r"segmap_0007\.mapped\.npz.*shape \(30, 40\)"):
        _ds(tmp_path)[0]
    save_npz(d / "segmap_0007.mapped.npz", data=seg.astype(np.float32))
    with pytest.raises(DatasetFormatError, match=r"segmap_0007\.mapped\.npz.*dtype float32"):
        _ds(tmp_path)[0]
    save_npz(d / "segmap_0007.mapped.npz", data=seg)
    save_npz(d / "weighting_0007.npz", data=np.ones((16, 16, 16), np.int16))
    with pytest.raises(DatasetFormatError, match=r"weighting_0007\.npz.*\(16, 16, 16\).*\(32, 32, 32\)"):
        _ds(tmp_path, enable_3d=True)[0]
    save_npz(d / "geometry_0007.npz", data=np.ones((32, 32, 32), np.int32))
    with pytest.raises(DatasetFormatError, match=r"geometry_0007\.npz.*expected a float array"):
        _ds(tmp_path)[0]


def test_unknown_semantic_id_and_missing_train_id(tmp_path):
    write_front3d(tmp_path)
    d = tmp_path / "data" / "scene-a"
    seg = np.load(d / "segmap_0007.mapped.npz")["data"].copy()
    seg[0, 1, 0] = 42
    save_npz(d / "segmap_0007.mapped.npz", data=seg)
    with pytest.raises(DatasetFormatError, match=r"segmap_0007\.mapped\.npz contains semantic ids \[42\]"):
        _ds(tmp_path)[0]
    cmap = json.loads((tmp_path / "meta" / "colormap.json").read_text())
    del cmap[3]["trainId"]
    (tmp_path / "meta" / "colormap.json").write_text(json.dumps(cmap))
    with pytest.raises(DatasetFormatError, match=r"colormap.*'sofa'.*no 'trainId'.*contiguous_id=False"):
        _ds(tmp_path)


def test_missing_exr_channel(tmp_path):
    import OpenEXR

    write_front3d(tmp_path)
    p = tmp_path / "data" / "scene-a" / "depth_0007.exr"
    with OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage},
                      {"R": np.ones((30, 40), np.float32)}) as f:
        f.write(str(p))
    with pytest.raises(DatasetFormatError, match=r"depth_0007\.exr has no EXR channel 'Z'"):
        _ds(tmp_path)[0]


def test_matterport_bad_image_id_and_missing_mask(tmp_path):
    write_matterport(tmp_path)
    entries = [{"scene_id": "SCENE", "image_id": "abc123_1", "height": 30, "width": 40}]
    (tmp_path / "meta" / "train.json").write_text(json.dumps(entries))
    with pytest.raises(DatasetFormatError, match=r"train\.json entry 0.*'<name>_<angle>_<rot>'"):
        _ds(tmp_path, name="matterport")
    entries[0]["image_id"] = "abc123_1_4"
    (tmp_path / "meta" / "train.json").write_text(json.dumps(entries))
    g = tmp_path / "data" / "SCENE" / "abc123_geometry1_4.npz"
    save_npz(g, data=np.load(g)["data"])
    with pytest.raises(DatasetFormatError, match=r"abc123_geometry1_4\.npz has no 'mask'"):
        _ds(tmp_path, name="matterport")[0]
    with pytest.raises(BadFramesError, match=r"SCENE_abc123_1_4: missing room mask.*abc123_rm1_4\.png"):
        _ds(tmp_path, name="matterport", require_room_mask=True)


def test_config_validation():
    with pytest.raises(ValueError, match="not supported"):
        DatasetConfig(name="scannet")
    with pytest.raises(ValueError, match="target_size"):
        DatasetConfig(target_size=(320,))
    with pytest.raises(ValueError, match="depth_min < depth_max"):
        DatasetConfig(depth_min=3.0, depth_max=1.0)


def test_config_from_spec_dict(tmp_path):
    cfg = DatasetConfig.from_dict({"name": "matterport", "base_dir": str(tmp_path), "batch_size": 4,
                                   "target_size": [320, 240], "iso_value": 2.0})
    assert cfg.root == tmp_path and cfg.target_size == (320, 240) and cfg.iso_value == 2.0
    assert cfg.extra == {"batch_size": 4}
    assert cfg.resolve("meta/x.json") == tmp_path / "meta/x.json"
    assert cfg.resolve("/abs/x.json").as_posix() == "/abs/x.json"
