"""``nvp3d inference`` and ``nvp3d.predict`` on tiny synthetic frames with a random-weight 3D checkpoint:
image scanning (nested folders, zero images), per-image intrinsics, every output file parses (PLY with an
independent reader, npz keys, PNGs, index JSON) and the volumes agree with ``evaluate`` on the same frames."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from nvp3d.config import dump_spec
from nvp3d.data.datamodule import NVP3DDataModule
from nvp3d.demo.run import generate_demo_data
from nvp3d.demo.specs import demo_spec, spec_3d_from_2d
from nvp3d.evaluation.evaluate import METRICS_FILENAME_3D, evaluate
from nvp3d.inference import Predictor, Reconstruction, predict
from nvp3d.inference.inputs import NoImagesError, find_images, read_intrinsic
from nvp3d.inference.run import INDEX_FILENAME, run_inference
from nvp3d.model.build import build_net3d
from nvp3d.status import StatusLogger
from PIL import Image

IMAGE = (64, 48)


def _load_parse_ply():
    """The independent PLY reader of test_inference_writers.py (loaded by path: tests are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_nvp3d_ply_reader", Path(__file__).with_name(
        "test_inference_writers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_ply


parse_ply = _load_parse_ply()
NPZ_KEYS = {"geometry", "semantic", "panoptic", "segment_ids", "segment_classes", "segment_is_thing", "class_ids",
            "class_names", "class_colors", "frustum_mask", "grid_dims", "voxel_size", "depth_range", "truncation",
            "iso_value", "plane_intrinsic", "plane_size", "image_size", "grid_to_camera", "depth"}


def _quiet(*args) -> None:
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Data, a spec, a random-weight 3D checkpoint with experiment.yaml beside it, test images by frame key."""
    root = tmp_path_factory.getbasetemp() / "nvp3d_synth_s3d_inf"
    generate_demo_data(root, scenes=2, frames_per_scene=2, grid=32, image_size=IMAGE, seed=11)
    out = tmp_path_factory.mktemp("inf")
    spec = demo_spec(root, out, image_size=IMAGE, voxel_size=0.24, num_gpus=0, min_instance_pixels=8, batch_size=2)
    spec = spec_3d_from_2d(spec, "", grid=32, unet_features=4)
    spec.model.object_mask_threshold = 0.0  # random weights: keep every query so segments exist
    spec.evaluate.num_gpus = spec.inference.num_gpus = 0
    dm = NVP3DDataModule(spec, splits=("test",))
    dm.setup()
    torch.manual_seed(0)
    model = build_net3d(spec, dm.thing_ids, dm.stuff_ids)
    ckpt_dir = out / "train"
    ckpt_dir.mkdir()
    ckpt = ckpt_dir / "model_epoch_000_step_00001.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    spec.evaluate.checkpoint = spec.inference.checkpoint = str(ckpt)
    dump_spec(spec, ckpt_dir / "experiment.yaml")
    images = out / "images"
    frames = {}
    for i, entry in enumerate(json.loads((root / "meta" / "test.json").read_text())):
        key = f"{entry['scene_id']}_{entry['image_id']}"
        dst = images / ("nested" if i % 2 else "") / f"{key}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "data" / entry["scene_id"] / f"rgb_{entry['image_id']}.png", dst)
        frames[key] = dst
    return {"spec": spec, "root": root, "out": out, "ckpt": ckpt, "images": images, "frames": frames, "dm": dm}


def _fast(predictor_or_module) -> None:
    """Prune harder than 0.5 (the random decoder would keep ~every voxel; slow on a loaded CPU)."""
    model = getattr(predictor_or_module, "model", predictor_or_module)
    model.completion.threshold = 0.95


def test_find_images_and_errors(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    for name in ("x.PNG", "y.jpg", "notes.txt", "a/z.jpeg"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in find_images(tmp_path)] == ["x.PNG", "y.jpg"]
    assert [p.name for p in find_images(tmp_path, recursive=True)] == ["z.jpeg", "x.PNG", "y.jpg"]
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "i.png").write_bytes(b"")
    with pytest.raises(NoImagesError, match="inference.recursive: true"):
        find_images(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_images(tmp_path / "missing")


def test_read_intrinsic_variants(tmp_path: Path) -> None:
    img = tmp_path / "f.png"
    assert read_intrinsic(img) == (None, "default")
    (tmp_path / "f.json").write_text(json.dumps({"fx": 10, "fy": 11, "cx": 3, "cy": 4}))
    k, src = read_intrinsic(img)
    assert src.endswith("f.json") and k[0, 0] == 10 and k[1, 1] == 11 and k[0, 2] == 3 and k[1, 2] == 4
    (tmp_path / "f.json").unlink()
    np.save(tmp_path / "f_intrinsic.npy", np.eye(3) * 2)
    k, src = read_intrinsic(img)
    assert src.endswith("f_intrinsic.npy") and k[0, 0] == 2
    (tmp_path / "g.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_intrinsic(tmp_path / "g.png")


def test_inference_outputs_parse_and_agree_with_evaluate(run, tmp_path: Path) -> None:
    spec = run["spec"].model_copy(deep=True)
    spec.inference.images_dir = str(run["images"])
    spec.inference.recursive = True
    # evaluate the same frames (keeping the fused volumes)
    kept = {}

    def hook(module) -> None:
        _fast(module.model)
        module.keep_predictions = True
        kept["module"] = module

    eval_dir = tmp_path / "eval"
    kpi = evaluate(spec, eval_dir, StatusLogger(eval_dir / "status.json"), say=_quiet, module_hook=hook)
    assert {"PRQ", "RSQ", "RRQ"} <= set(kpi)
    metrics = json.loads((eval_dir / METRICS_FILENAME_3D).read_text())
    assert metrics["frames"] == len(run["frames"]) and len(metrics["per_class"]) == 12
    ref = {p["key"]: p["fused"] for p in kept["module"].predictions}
    assert set(ref) == set(run["frames"])
    # the same frames through inference, with the dataset's frustum so both see identical inputs
    ds = run["dm"].datasets["test"].base
    frusta = {}
    for i in range(len(ds)):
        s = ds[i]
        name = s["meta"]["key"] if (run["images"] / f"{s['meta']['key']}.png").exists() else f"nested__{s['meta']['key']}"
        frusta[name] = s["frustum_mask"]
    predictor = Predictor(spec, spec.inference.checkpoint, say=_quiet)
    _fast(predictor)
    lines = []
    kpi = run_inference(spec, tmp_path / "inf", None, say=lines.append, enable_progress_bar=False,
                        predictor=predictor, frustum_masks=frusta)
    assert kpi["images"] == 4 and kpi["images_per_second"] > 0
    assert "found 4 images" in lines[0] and "images/s" in lines[-1]
    index = json.loads((tmp_path / "inf" / INDEX_FILENAME).read_text())
    assert index["num_images"] == 4 and set(index["npz_keys"]) == NPZ_KEYS
    agree = []
    for entry in index["images"]:
        d = tmp_path / "inf"
        for kind in ("semantic", "panoptic", "depth"):
            png = np.asarray(Image.open(d / entry["outputs"][kind]))
            assert png.shape[:2] == (IMAGE[1], IMAGE[0]) or kind == "depth"
        with np.load(d / entry["outputs"]["volumes"]) as z:
            assert set(z.files) == NPZ_KEYS
            vol = {k: z[k] for k in z.files}
        mesh = parse_ply(d / entry["outputs"]["mesh"])
        assert len(mesh["vertex"]) == entry["mesh"]["vertices"] and len(mesh["face"]) == entry["mesh"]["faces"]
        if len(mesh["face"]):
            assert mesh["face"].max() < len(mesh["vertex"])
            # vertices are in camera metres inside the 0.4 .. 6 m frustum (a little slack for the grid corners)
            z_cam = mesh["vertex"]["z"]
            assert z_cam.min() > 0.0 and z_cam.max() < 7.0
        key = entry["name"].removeprefix("nested__")
        f = ref[key]
        mapping = dict(zip(vol["segment_ids"].tolist(), vol["segment_classes"].tolist(), strict=True))
        assert set(mapping.values()) <= set(range(1, 13))
        agree.append((vol["panoptic"] == f.panoptic.numpy()).mean())
        assert (vol["semantic"] == f.semantic.numpy()).mean() > 0.98
        assert np.abs(vol["geometry"] - f.tdf.numpy()).max() < 1e-3 or (
            np.isclose(vol["geometry"], f.tdf.numpy(), atol=1e-3).mean() > 0.98)
    assert min(agree) > 0.98, agree


def test_predict_api(run, tmp_path: Path) -> None:
    image = next(iter(run["frames"].values()))
    rec = predict(image, checkpoint=run["ckpt"])  # spec from experiment.yaml beside the checkpoint
    assert isinstance(rec, Reconstruction)
    assert rec.geometry.shape == (32, 32, 32) and rec.panoptic.dtype == np.int32
    mesh = rec.to_mesh(color_by="semantic")
    assert mesh.vertices.shape[1] == 3 and mesh.colors.dtype == np.uint8
    paths = rec.save(tmp_path, "one")
    assert set(paths) == {"semantic", "panoptic", "depth", "volumes", "mesh", "preview"}
    assert all(Path(p).is_file() for p in paths.values())
    # an explicit intrinsic equal to the default gives the same reconstruction
    from frustum3d import geometry as G

    k = G.front3d_intrinsic(IMAGE).numpy()
    rec2 = predict(np.asarray(Image.open(image).convert("RGB")), k, checkpoint=run["ckpt"])
    np.testing.assert_allclose(rec2.meta["plane_intrinsic"], rec.meta["plane_intrinsic"])
    # the analytic frustum is built and moved to the device once per plane intrinsic; the Reconstructions of one
    # intrinsic share its host array, read-only, equal to the geometry's mask
    from nvp3d.inference.predictor import _CACHE

    predictor = next(iter(_CACHE.values()))
    assert len(predictor._frustum_cache) == 1
    host, dev = next(iter(predictor._frustum_cache.values()))
    rec3 = predict(image, checkpoint=run["ckpt"])
    assert next(iter(predictor._frustum_cache.values()))[1] is dev
    expected = predictor.geometry.frustum(rec.meta["plane_intrinsic"]).numpy()
    np.testing.assert_array_equal(rec3.frustum_mask, expected)
    with pytest.raises(ValueError, match="read-only"):
        rec3.frustum_mask[:] = False
    assert host.any() and np.array_equal(predict(image, checkpoint=run["ckpt"]).frustum_mask, expected)
    # at most FRUSTUM_CACHE_SIZE intrinsics are kept, the least recently used dropped first
    from nvp3d.inference.predictor import FRUSTUM_CACHE_SIZE

    first = next(iter(predictor._frustum_cache))
    for i in range(FRUSTUM_CACHE_SIZE + 1):
        predictor.frustum(np.diag([60.0 + i, 60.0 + i, 1.0, 1.0]))
    assert len(predictor._frustum_cache) == FRUSTUM_CACHE_SIZE and first not in predictor._frustum_cache
    with pytest.raises(FileNotFoundError):
        predict(tmp_path / "missing.png", checkpoint=run["ckpt"])
    with pytest.raises(ValueError, match="3x3 or 4x4"):
        predict(image, np.ones(5), checkpoint=run["ckpt"])


def test_inference_action_is_registered_and_refuses_empty_folders(tmp_path: Path) -> None:
    from nvp3d.actions import get_action
    from nvp3d.config import validate_spec

    empty = tmp_path / "imgs"
    empty.mkdir()
    spec = validate_spec({"inference": {"images_dir": str(empty), "checkpoint": str(tmp_path / "x.pth")}})
    with pytest.raises(NoImagesError, match="contains no .jpg/.jpeg/.png images"):
        get_action("inference")(spec, tmp_path / "out", StatusLogger(tmp_path / "out" / "status.json"))
    assert not (tmp_path / "out" / INDEX_FILENAME).exists()


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_inference_writes_only_the_outputs_asked_for(run, tmp_path: Path, processes: bool) -> None:
    """``inference.outputs``: only the named files are written (by writer threads and processes alike), the index
    lists what was written, and the preview still records the mesh it rendered; ``npz_keys`` is empty without
    the volumes."""
    from nvp3d.config import validate_spec
    from nvp3d.inference.writers import OUTPUT_KINDS, save_reconstruction

    spec = run["spec"].model_copy(deep=True)
    spec.inference.images_dir = str(run["images"])  # top level: the two frames not under nested/
    spec.inference.write_workers = 1
    spec.inference.write_processes = processes
    predictor = Predictor(spec, spec.inference.checkpoint, say=_quiet)
    _fast(predictor)
    suffix = {"volumes": "_panoptic3d.npz", "preview": "_preview.png", "depth": "_depth.png"}
    for outputs in (["volumes", "preview"], ["depth"]):
        spec.inference.outputs = outputs
        out = tmp_path / "_".join(outputs)
        lines = []
        kpi = run_inference(spec, out, None, say=lines.append, enable_progress_bar=False, predictor=predictor)
        assert kpi["images"] == 2 and any("writing " + ", ".join(outputs) in line for line in lines)
        index = json.loads((out / INDEX_FILENAME).read_text())
        assert index["outputs"] == outputs
        written = sorted(p.name for p in out.iterdir() if p.name != INDEX_FILENAME)
        expected = sorted(f"{e['name']}{suffix[k]}" for e in index["images"] for k in outputs)
        assert written == expected
        for entry in index["images"]:
            assert set(entry["outputs"]) == set(outputs)
            assert entry["mesh"] == {"vertices": None, "faces": None}  # no PLY written: no mesh size
        assert (index["npz_keys"] == sorted(NPZ_KEYS)) == ("volumes" in outputs)
        assert ("volumes" in outputs) or index["npz_keys"] == []
    # the spec's names are the writers' names, in the same order; a wrong name is refused in one line
    assert tuple(validate_spec({}).inference.outputs) == OUTPUT_KINDS
    with pytest.raises(ValueError, match="unknown output kind"):
        save_reconstruction(None, tmp_path, "x", ["cloud"])
