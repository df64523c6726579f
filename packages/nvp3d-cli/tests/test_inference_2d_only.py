"""``inference.outputs`` with 2D kinds only: the 3D stage (frustum mask, lifting, completion decoder, fusion) never
runs, nothing 3D reaches the writers (threads or processes), the 2D files equal those of a full run of the same
model byte for byte, ``index.json`` lists the 2D segments, and a 2D-stage checkpoint is enough."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from nvp3d.inference import Predictor, predict
from nvp3d.inference.inputs import PredictInputError
from nvp3d.inference.run import INDEX_FILENAME, run_inference
from nvp3d.inference.writers import KINDS_2D
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE = (64, 48)


def _quiet(*args) -> None:
    pass


def _predictor(spec, **kwargs) -> Predictor:
    p = Predictor(spec, spec.inference.checkpoint, say=_quiet, **kwargs)
    p.model.completion.threshold = 0.95  # prune hard: a random decoder keeps ~every voxel (slow on a loaded CPU)
    return p


@pytest.fixture(scope="module")
def setup(tmp_path_factory, inference_setup):
    """5 images (batches of 2: the last one partial), a random-weight 3D checkpoint, a 2D-only checkpoint of the
    same 2D weights, and the files of a full run (every kind) to compare with."""
    out = tmp_path_factory.mktemp("only2d")
    spec, images = inference_setup(tmp_path_factory.getbasetemp() / "nvp3d_synth_only2d", out, frames=5, seed=7,
                                   batch_size=2, image_size=IMAGE)
    spec.inference.batch_size = 2
    spec.inference.write_workers = 0
    state = torch.load(spec.inference.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    from nvp3d.model.checkpoint import is_3d_key

    ckpt_2d = out / "model_2d.pth"
    torch.save({"state_dict": {k: v for k, v in state.items() if not is_3d_key(k.removeprefix("model."))}}, ckpt_2d)
    full = _predictor(spec)
    run_inference(spec, out / "full", None, say=_quiet, enable_progress_bar=False, predictor=full)
    return {"spec": spec, "images": images, "out": out, "ckpt_2d": ckpt_2d, "full": full}


def _no_3d_stage(monkeypatch) -> None:
    """Make every entry point of the 3D stage raise: the frustum mask, the lifting plane's 3D inputs, lifting,
    the completion decoder, the 3D forward and the fusion."""
    import nvp3d.inference.predictor as predictor_module
    from frustum3d.decoder import FrustumDecoder
    from frustum3d.geometry import FrustumGeometry
    from nvp3d.model.net3d import NVPanoptix3D

    def boom(*args, **kwargs):
        raise AssertionError("the 3D stage ran in a 2D-only run")

    for owner, name in ((NVPanoptix3D, "forward_3d"), (NVPanoptix3D, "plane"), (NVPanoptix3D, "lift"),
                        (NVPanoptix3D, "frustum_batch"), (FrustumDecoder, "forward"), (FrustumGeometry, "frustum"),
                        (predictor_module, "fuse_voxels_batch"), (Predictor, "_frustum_masks")):
        monkeypatch.setattr(owner, name, boom)


def _spy_writers(monkeypatch) -> list:
    """Record every reconstruction handed to the writers and what was spilled for a writer process."""
    from nvp3d.inference import output_queue

    seen: list = []
    submit, spill = output_queue.OutputWriter.submit, output_queue._spill

    def spy_submit(self, path, name, source, rec, forward_seconds):
        seen.append(("submit", rec))
        return submit(self, path, name, source, rec, forward_seconds)

    def spy_spill(rec, folder, key, kinds=None):
        rest, paths = spill(rec, folder, key, kinds)
        seen.append(("spill", rest, paths))
        return rest, paths

    monkeypatch.setattr(output_queue.OutputWriter, "submit", spy_submit)
    monkeypatch.setattr(output_queue, "_spill", spy_spill)
    return seen


@pytest.mark.parametrize(("workers", "processes"), [(0, False), (2, False), (1, True)],
                         ids=["main-thread", "threads", "processes"])
def test_2d_only_run_skips_the_3d_stage_and_writes_the_full_runs_2d_files(setup, tmp_path: Path, monkeypatch,
                                                                          workers: int, processes: bool) -> None:
    spec = setup["spec"].model_copy(deep=True)
    spec.inference.outputs = list(KINDS_2D)
    spec.inference.write_workers, spec.inference.write_processes = workers, processes
    _no_3d_stage(monkeypatch)
    seen = _spy_writers(monkeypatch)
    lines: list[str] = []
    kpi = run_inference(spec, tmp_path / "2d", None, say=lines.append, enable_progress_bar=False)  # its own Predictor
    assert kpi["images"] == 5
    assert any("the 3D stage is skipped" in line for line in lines), lines
    # the writers got 2D reconstructions only: no voxels, volumes or frustum mask; nothing spilled for a process
    submitted = [s[1] for s in seen if s[0] == "submit"]
    assert len(submitted) == 5
    for rec in submitted:
        assert rec.only_2d and rec.voxels is None and rec.frustum_mask is None
        assert not any(rec.volume_loaded(n) for n in ("geometry", "semantic", "panoptic"))
    spills = [s for s in seen if s[0] == "spill"]
    assert len(spills) == (5 if processes else 0) and all(paths == {} for _, _, paths in spills)
    _assert_same_2d_files(setup["out"] / "full", tmp_path / "2d")


def _assert_same_2d_files(full: Path, only2d: Path) -> None:
    """Every 2D file of the 2D-only run equals the full run's (bytes and pixels); its index lists the same images
    with the 2D files only, no mesh, no npz keys, ``stage_3d`` false and each image's 2D segments."""
    index_full = json.loads((full / INDEX_FILENAME).read_text())
    index = json.loads((only2d / INDEX_FILENAME).read_text())
    assert index["outputs"] == list(KINDS_2D) and index["stage_3d"] is False and index_full["stage_3d"] is True
    assert index["npz_keys"] == [] and index["num_images"] == index_full["num_images"] == 5
    assert [e["name"] for e in index["images"]] == [e["name"] for e in index_full["images"]]
    written = sorted(p.name for p in only2d.iterdir() if p.name != INDEX_FILENAME)
    assert written == sorted(f"{e['name']}_{k}.png" for e in index["images"] for k in KINDS_2D)
    for entry, ref in zip(index["images"], index_full["images"], strict=True):
        assert entry["outputs"] == {k: ref["outputs"][k] for k in KINDS_2D}
        assert entry["mesh"] == {"vertices": None, "faces": None}
        for name in entry["outputs"].values():
            assert (only2d / name).read_bytes() == (full / name).read_bytes(), name
            np.testing.assert_array_equal(np.asarray(Image.open(only2d / name)), np.asarray(Image.open(full / name)))
    return index


def test_2d_only_index_lists_the_2d_segments_and_a_given_predictor_gets_its_3d_stage_back(
        setup, tmp_path: Path, monkeypatch) -> None:
    """A full Predictor given to a 2D-only run skips its 3D stage for that run only; each index entry's
    ``segments`` are the image's 2D panoptic segments, as the full path segments it in 2D."""
    spec = setup["spec"].model_copy(deep=True)
    spec.inference.outputs = ["depth", "panoptic", "semantic"]  # any order: still 2D only
    full = setup["full"]
    with monkeypatch.context() as m:
        _no_3d_stage(m)
        run_inference(spec, tmp_path / "2d", None, say=_quiet, enable_progress_bar=False, predictor=full)
    assert full.stage_3d, "the given predictor's own setting comes back"
    index = json.loads((tmp_path / "2d" / INDEX_FILENAME).read_text())
    assert index["outputs"] == ["depth", "panoptic", "semantic"] and index["stage_3d"] is False
    classes = full.classes
    for entry in index["images"]:
        rec = full(setup["images"] / f"{entry['name']}.png")  # the full path (3D stage included)
        assert rec.voxels is not None
        want = [{"id": int(s["id"]), "class_id": int(s["category_id"]), "class": classes[int(s["category_id"])][0],
                 "isthing": classes[int(s["category_id"])][1]} for s in rec.segments_2d]
        assert entry["segments"] == want and want
    spec.inference.outputs = ["depth", "mesh"]  # a 3D kind: the given predictor runs its 3D stage again
    run_inference(spec, tmp_path / "3d", None, say=_quiet, enable_progress_bar=False, predictor=full)
    index = json.loads((tmp_path / "3d" / INDEX_FILENAME).read_text())
    assert index["stage_3d"] is True and all(e["mesh"]["faces"] is not None for e in index["images"])


def test_a_2d_checkpoint_is_enough_for_2d_outputs(setup, tmp_path: Path) -> None:
    """A 2D-stage checkpoint (no 3D keys) runs 2D outputs with the same 2D results as the full checkpoint; for 3D
    kinds it is refused in one line naming inference.outputs."""
    spec = setup["spec"].model_copy(deep=True)
    spec.inference.checkpoint = str(setup["ckpt_2d"])
    said: list[str] = []
    only2d = Predictor(spec, spec.inference.checkpoint, say=said.append, outputs=["depth"])
    assert not only2d.stage_3d and not only2d.weights_3d
    assert len(said) == 1 and said[0].startswith("inference.checkpoint: loaded")  # the 2D weights only
    image = setup["images"] / "img0.png"
    rec, ref = only2d(image), setup["full"](image)
    assert rec.only_2d and rec.voxels is None and rec.frustum_mask is None
    for name in ("depth", "panoptic_2d", "semantic_2d"):
        np.testing.assert_array_equal(getattr(rec, name), getattr(ref, name), err_msg=name)
    assert rec.segments_2d == ref.segments_2d and rec.meta.keys() == ref.meta.keys()
    for key, overlay in rec.overlays().items():
        np.testing.assert_array_equal(overlay, ref.overlays()[key], err_msg=key)
    one = predict(image, checkpoint=spec.inference.checkpoint, spec=spec, outputs=["semantic"])  # the Python API
    assert one.only_2d
    np.testing.assert_array_equal(one.panoptic_2d, ref.panoptic_2d)
    # what needs the 3D result is refused in one line, before any file is written
    for call in (rec.to_mesh, rec.arrays, lambda: rec.save(tmp_path / "x", "a", ["depth", "mesh"])):
        with pytest.raises(ValueError, match="inference.outputs") as e:
            call()
        assert "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()
    tensor, rgb, k = only2d.prepare(image)  # a wrong image size is still refused at start, in one line
    with pytest.raises(ValueError, match=r"dataset.target_size") as e:
        only2d.start([(tensor[:, :-2], rgb, k)])
    assert "\n" not in str(e.value)
    # the 3D stage cannot be switched on without its weights
    only2d.stage_3d = True
    with pytest.raises(PredictInputError, match="loaded no 3D weights"):
        only2d(image)
    only2d.stage_3d = False
    with pytest.raises(PredictInputError, match="given loaded no 3D weights"):
        run_inference(spec, tmp_path / "r", None, say=_quiet, enable_progress_bar=False, predictor=only2d)
    # default outputs (3D kinds) with a 2D checkpoint: one line that names the fix
    with pytest.raises(PredictInputError, match=r"holds no 3D weights: .*inference\.outputs") as e:
        Predictor(spec, spec.inference.checkpoint, say=_quiet)
    assert "\n" not in str(e.value)
    spec.inference.outputs = ["semantic", "depth"]  # the action on a 2D checkpoint
    kpi = run_inference(spec, tmp_path / "run", None, say=_quiet, enable_progress_bar=False)
    assert kpi["images"] == 5


def test_2d_only_predictor_refuses_bad_outputs_and_an_empty_checkpoint(setup) -> None:
    spec = setup["spec"].model_copy(deep=True)
    with pytest.raises(PredictInputError, match=r"outputs: unknown kind\(s\) \['cloud'\]"):
        Predictor(spec, spec.inference.checkpoint, say=_quiet, outputs=["depth", "cloud"])
    with pytest.raises(PredictInputError, match="2D-stage panoptic_recon_3d_model_latest.pth is enough"):
        Predictor(spec, "", say=_quiet, outputs=["depth"])
    with pytest.raises(PredictInputError, match="set it to a 3D-stage checkpoint"):
        Predictor(spec, "", say=_quiet)


def test_2d_only_batches_in_a_stream_equal_the_full_paths_2d_results(setup) -> None:
    """``predict_stream`` with the 3D stage off: per batch, the 2D arrays of the full path (batch of 2 and a
    partial one), and no 3D arrays are copied to the host (two arrays per frame)."""
    full = setup["full"]
    prepared = [full.prepare(setup["images"] / f"img{i}.png") for i in range(5)]
    stream = [(prepared[0:2], None), (prepared[2:4], None), (prepared[4:5], None)]
    ref = [full.predict_prepared(p, m) for p, m in stream]
    copied: list[int] = []
    collect = full.collect
    full.collect = lambda done: copied.append(len(done.copy.arrays())) or collect(done)
    full.stage_3d = False
    try:
        got = list(full.predict_stream(stream))
    finally:
        full.stage_3d = True
        del full.collect
    assert copied == [4, 4, 2]
    for a_batch, b_batch in zip(ref, got, strict=True):
        for a, b in zip(a_batch, b_batch, strict=True):
            assert b.only_2d and not a.only_2d
            np.testing.assert_array_equal(a.panoptic_2d, b.panoptic_2d)
            np.testing.assert_array_equal(a.semantic_2d, b.semantic_2d)
            np.testing.assert_array_equal(a.depth, b.depth)


def test_the_frustum_mask_travels_to_a_writer_process_only_for_the_volumes(setup, tmp_path: Path) -> None:
    """The npz is the frustum mask's only reader: a 3D run without ``volumes`` does not spill it either (the voxels
    still travel, for the mesh); with ``volumes`` (or all kinds) it is spilled as before."""
    from nvp3d.inference.output_queue import _spill

    rec = setup["full"](setup["images"] / "img0.png")
    rest, paths = _spill(rec, tmp_path, "a", ("mesh", "preview"))
    assert paths == {} and rest.frustum_mask is None and rest.voxels is rec.voxels
    assert rec.frustum_mask is not None  # the caller's reconstruction is not changed
    for kinds in (None, ("volumes",)):
        rest, paths = _spill(rec, tmp_path, "b", kinds)
        assert set(paths) == {"frustum_mask"} and rest.frustum_mask is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA streams and graphs)")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("defer", [False, True])
def test_2d_only_overlapped_stream_equals_the_full_path_on_cuda(setup, precision: str, defer: bool) -> None:
    """On CUDA, with the 2D network graphed and on its own stream (``inference.overlap_2d``), a 2D-only stream
    gives the 2D arrays of the full path run one batch at a time, and copies two arrays per frame to the host."""
    spec = setup["spec"].model_copy(deep=True)
    spec.inference.num_gpus = 1
    spec.inference.precision = precision
    spec.inference.cuda_graphs = True
    predictor = _predictor(spec)
    assert predictor._streams() is not None
    prepared = [predictor.prepare(setup["images"] / f"img{i % 5}.png") for i in range(8)]
    stream = [(prepared[i:i + 2], None) for i in range(0, 8, 2)] + [(prepared[:1], None)]
    predictor.overlap_2d = False
    full = [predictor.predict_prepared(p, m) for p, m in stream]
    predictor.overlap_2d = True
    predictor.defer_host_copy = defer
    copied: list[int] = []
    collect = predictor.collect
    predictor.collect = lambda done: copied.append(len(done.copy.arrays())) or collect(done)
    predictor.stage_3d = False
    for _ in range(2):  # the second pass replays the captured 2D graph
        copied.clear()
        got = list(predictor.predict_stream(stream))
        assert copied == [4, 4, 4, 4, 2]
        for a_batch, b_batch in zip(full, got, strict=True):
            for a, b in zip(a_batch, b_batch, strict=True):
                assert b.only_2d and b.frustum_mask is None
                np.testing.assert_array_equal(a.panoptic_2d, b.panoptic_2d)
                np.testing.assert_array_equal(a.semantic_2d, b.semantic_2d)
                np.testing.assert_allclose(a.depth, b.depth, atol=1e-5, rtol=0)
