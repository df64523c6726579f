"""``inference.batch_size``: batches give the same files and volumes as one image at a time (the last, partial
batch included), images/s is reported, bad values are refused in one line; ``inference.cuda_graphs`` is a no-op
on CPU and (on CUDA, skipped without a GPU) gives the same reconstruction as the eager 2D network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from nvp3d.config import dump_spec, validate_spec
from nvp3d.errors import SpecError
from nvp3d.inference import Predictor
from nvp3d.inference.inputs import PredictInputError
from nvp3d.inference.run import INDEX_FILENAME, batches, run_inference

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE = (64, 48)
#: float volumes of batch 3 vs batch 1 (CPU fp32): the same arithmetic in another batch layout
ATOL = 1e-4


def _quiet(*args) -> None:
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory, inference_setup):
    """5 images, a random-weight 3D checkpoint (tiny preset, 32^3) and its spec."""
    out = tmp_path_factory.mktemp("batching")
    spec, images = inference_setup(tmp_path_factory.getbasetemp() / "nvp3d_synth_batching", out, frames=5, seed=5,
                                   batch_size=2, image_size=IMAGE)
    dump_spec(spec, out / "experiment.yaml")
    return {"spec": spec, "out": out, "images": images}


def _predictor(spec) -> Predictor:
    p = Predictor(spec, spec.inference.checkpoint, say=_quiet)
    p.model.completion.threshold = 0.95  # prune hard: a random decoder keeps ~every voxel (slow on a loaded CPU)
    return p


def _volumes(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    index = json.loads((folder / INDEX_FILENAME).read_text())
    out = {}
    for entry in index["images"]:
        with np.load(folder / entry["outputs"]["volumes"]) as z:
            out[entry["name"]] = {k: z[k] for k in z.files}
    return out


def test_batches_split_with_a_partial_last_batch() -> None:
    assert batches(list(range(5)), 3) == [[0, 1, 2], [3, 4]]
    assert batches(list(range(4)), 4) == [[0, 1, 2, 3]]
    assert batches([], 2) == []
    with pytest.raises(PredictInputError, match="inference.batch_size must be a positive number, got 0"):
        batches([1], 0)


@pytest.mark.parametrize("value", [0, -1])
def test_bad_batch_size_is_one_line_spec_error(value: int) -> None:
    with pytest.raises(SpecError, match=r"inference\.batch_size: Input should be greater than or equal to 1") as e:
        validate_spec({"inference": {"batch_size": value}})
    assert "\n" not in str(e.value)


def test_bad_batch_size_on_the_command_line(setup, invoke_cli, tmp_path: Path) -> None:
    result = invoke_cli(["inference", "-e", str(setup["out"] / "experiment.yaml"), "inference.batch_size=0"],
                        tmp_path)
    assert result.exit_code == 2, result.output
    assert "inference.batch_size" in result.output


def test_batch_3_equals_batch_1(setup, tmp_path: Path) -> None:
    spec = setup["spec"].model_copy(deep=True)
    predictor = _predictor(spec)
    runs = {}
    for bs in (1, 3):  # 5 images: batches of 3 and 2 (partial)
        spec.inference.batch_size = bs
        spec.inference.write_workers = 0 if bs == 1 else 2  # main thread vs writer pool: the same files
        lines: list[str] = []
        kpi = run_inference(spec, tmp_path / f"b{bs}", None, say=lines.append, enable_progress_bar=False,
                            predictor=predictor)
        assert kpi["images"] == 5 and kpi["images_per_second"] > 0 and kpi["batch_size"] == bs
        assert "images/s" in lines[-1]
        assert any(f"batch size {bs}, precision fp32, CUDA graphs off" in line for line in lines)
        index = json.loads((tmp_path / f"b{bs}" / INDEX_FILENAME).read_text())
        assert index["batch_size"] == bs and index["images_per_second"] > 0 and index["cuda_graphs"] == "off"
        runs[bs] = index
    files = {bs: sorted(p.name for p in (tmp_path / f"b{bs}").iterdir()) for bs in runs}
    assert files[1] == files[3] and len(files[1]) > 5 * 4
    one, three = _volumes(tmp_path / "b1"), _volumes(tmp_path / "b3")
    assert sorted(one) == sorted(three) == [f"img{i}" for i in range(5)]
    for name in one:
        assert one[name].keys() == three[name].keys()
        for key, a in one[name].items():
            b = three[name][key]
            assert a.shape == b.shape and a.dtype == b.dtype, (name, key)
            if np.issubdtype(a.dtype, np.floating):
                np.testing.assert_allclose(b, a, atol=ATOL, rtol=0, err_msg=f"{name} {key}")
            else:
                np.testing.assert_array_equal(b, a, err_msg=f"{name} {key}")
    assert [e["name"] for e in runs[1]["images"]] == [e["name"] for e in runs[3]["images"]]


def test_failed_write_in_a_worker_stops_the_run(setup, tmp_path: Path, monkeypatch) -> None:
    from nvp3d.inference.reconstruction import Reconstruction

    spec = setup["spec"].model_copy(deep=True)
    spec.inference.batch_size, spec.inference.write_workers = 2, 2
    predictor = _predictor(spec)
    real_save = Reconstruction.save

    def save(self, directory, name="frame", outputs=None):
        if name == "img3":
            raise OSError(f"disk full while writing {name}")
        return real_save(self, directory, name, outputs)

    monkeypatch.setattr(Reconstruction, "save", save)
    with pytest.raises(OSError, match="disk full while writing img3"):
        run_inference(spec, tmp_path / "out", None, say=_quiet, enable_progress_bar=False, predictor=predictor)
    assert (tmp_path / "out" / "img2_panoptic3d.npz").is_file()  # written before the failure


def test_writer_processes_write_the_same_files(setup, tmp_path: Path) -> None:
    """``inference.write_processes``: the same files, volumes and index entries (mesh counts included) as writing
    in the main thread; the spilled volumes are gone afterwards."""
    from nvp3d.inference import output_queue

    spec = setup["spec"].model_copy(deep=True)
    spec.inference.batch_size = 2
    predictor = _predictor(spec)
    folders = []
    real_spill_folder = output_queue._spill_folder

    def spill_folder() -> Path:
        folders.append(real_spill_folder())
        return folders[-1]

    output_queue._spill_folder = spill_folder
    try:
        for workers, processes in ((0, False), (2, True)):
            spec.inference.write_workers, spec.inference.write_processes = workers, processes
            run_inference(spec, tmp_path / f"w{workers}", None, say=_quiet, enable_progress_bar=False,
                          predictor=predictor)
    finally:
        output_queue._spill_folder = real_spill_folder
    assert len(folders) == 1 and not folders[0].exists(), "the spill folder is removed when the writer closes"
    main, procs = (json.loads((tmp_path / d / INDEX_FILENAME).read_text())["images"] for d in ("w0", "w2"))
    assert [e["name"] for e in main] == [e["name"] for e in procs] == [f"img{i}" for i in range(5)]
    for a, b in zip(main, procs):
        assert a["mesh"] == b["mesh"] and a["mesh"]["faces"] is not None
        assert a["outputs"] == b["outputs"] and a["segments"] == b["segments"]
    one, other = _volumes(tmp_path / "w0"), _volumes(tmp_path / "w2")
    for name in one:
        for key, a in one[name].items():
            np.testing.assert_array_equal(other[name][key], a, err_msg=f"{name} {key}")
    assert sorted(p.name for p in (tmp_path / "w0").iterdir()) == sorted(p.name for p in (tmp_path / "w2").iterdir())


def test_failed_write_in_a_writer_process_stops_the_run(setup, tmp_path: Path) -> None:
    spec = setup["spec"].model_copy(deep=True)
    spec.inference.batch_size, spec.inference.write_workers, spec.inference.write_processes = 2, 2, True
    predictor = _predictor(spec)
    out = tmp_path / "out"
    (out / "img3_panoptic3d.npz").mkdir(parents=True)  # the volumes' final name is taken by a folder
    with pytest.raises(OSError, match="img3_panoptic3d"):
        run_inference(spec, out, None, say=_quiet, enable_progress_bar=False, predictor=predictor)
    assert (out / "img2_panoptic3d.npz").is_file()  # written before the failure


@pytest.mark.parametrize("stage", ["start", "finish"])
def test_a_failing_forward_in_a_batch_concerns_only_its_image(setup, tmp_path: Path, stage: str) -> None:
    """The batch's 2D launch (``start``) or its 3D part (``finish``) fails: its images are retried alone."""
    spec = setup["spec"].model_copy(deep=True)
    spec.inference.batch_size = 3
    spec.dataset.skip_bad = True
    predictor = _predictor(spec)
    real = getattr(predictor, stage)
    bad = predictor.prepare(setup["images"] / "img1.png")[1]  # the uint8 image of img1

    def failing(arg, *rest):
        prepared = arg if stage == "start" else arg.prepared
        if any(np.array_equal(p[1], bad) for p in prepared):
            raise ValueError("this image breaks the network")
        return real(arg, *rest)

    setattr(predictor, stage, failing)
    lines: list[str] = []
    kpi = run_inference(spec, tmp_path / "out", None, say=lines.append, enable_progress_bar=False,
                        predictor=predictor)
    index = json.loads((tmp_path / "out" / INDEX_FILENAME).read_text())
    assert kpi["images"] == 4 and kpi["skipped"] == 1
    assert [e["name"] for e in index["images"]] == ["img0", "img2", "img3", "img4"]
    assert index["skipped"][0]["image"].endswith("img1.png") and "breaks the network" in index["skipped"][0]["error"]


@pytest.mark.parametrize("defer", [False, True])
def test_a_stream_gives_each_batch_what_it_gives_alone(setup, defer: bool) -> None:
    """``predict_stream`` (the next batch's 2D network launched before this batch's 3D part) yields, batch by batch,
    what ``predict_prepared`` gives for each batch on its own; on CPU ``inference.overlap_2d`` changes nothing."""
    spec = setup["spec"].model_copy(deep=True)
    predictor = _predictor(spec)
    prepared = [predictor.prepare(setup["images"] / f"img{i}.png") for i in range(5)]
    stream = [(prepared[0:2], None), (prepared[2:3], None), (prepared[3:5], None)]
    alone = [predictor.predict_prepared(p, m) for p, m in stream]
    calls: list[str] = []
    start, finish_async, collect = predictor.start, predictor.finish_async, predictor.collect
    predictor.start = lambda p, m=None: calls.append(f"start {len(p)}") or start(p, m)
    predictor.finish_async = lambda pending, **k: calls.append(f"3d {len(pending.prepared)}") or finish_async(
        pending, **k)
    predictor.collect = lambda done: calls.append(f"collect {len(done.prepared)}") or collect(done)
    predictor.defer_host_copy = defer
    streamed = list(predictor.predict_stream(iter(stream)))
    if defer:  # three stages: batch i-1's results are collected after batch i's 3D part
        assert calls == ["start 2", "start 1", "3d 2", "start 2", "3d 1", "collect 2", "3d 2", "collect 1",
                         "collect 2"]
    else:  # batch i+1's 2D network is launched before batch i's 3D part runs
        assert calls == ["start 2", "start 1", "3d 2", "collect 2", "start 2", "3d 1", "collect 1", "3d 2",
                         "collect 2"]
    assert [len(b) for b in streamed] == [2, 1, 2]
    for a_batch, s_batch in zip(alone, streamed, strict=True):
        for a, b in zip(a_batch, s_batch, strict=True):
            np.testing.assert_array_equal(a.panoptic, b.panoptic)
            np.testing.assert_array_equal(a.geometry, b.geometry)
            np.testing.assert_array_equal(a.panoptic_2d, b.panoptic_2d)
            np.testing.assert_array_equal(a.depth, b.depth)
    assert predictor._streams() is None  # CPU: no CUDA streams, whatever inference.overlap_2d says
    assert list(predictor.predict_stream([])) == []


def test_a_wrong_image_size_fails_at_start_in_one_line(setup) -> None:
    predictor = _predictor(setup["spec"].model_copy(deep=True))
    tensor, rgb, k = predictor.prepare(setup["images"] / "img0.png")
    with pytest.raises(ValueError, match=r"dataset.target_size") as e:
        predictor.start([(tensor[:, :-2], rgb, k)])
    assert "\n" not in str(e.value)


def test_bf16_precision_gives_float32_outputs(setup) -> None:
    spec = setup["spec"].model_copy(deep=True)
    spec.inference.precision = "bf16"
    predictor = _predictor(spec)
    with torch.autocast("cpu", enabled=False):
        rec = predictor(setup["images"] / "img0.png")
    assert rec.depth.dtype == np.float32 and rec.geometry.dtype == np.float32
    assert rec.geometry.shape == (32, 32, 32) and np.isfinite(rec.depth).all()


def test_cuda_graphs_switch_is_a_no_op_on_cpu(setup) -> None:
    spec = setup["spec"].model_copy(deep=True)
    image = setup["images"] / "img0.png"
    spec.inference.cuda_graphs = True
    on = _predictor(spec)
    assert on.model.net2d.graphed is not None
    spec.inference.cuda_graphs = False
    off = _predictor(spec)
    assert off.model.net2d.graphed is None
    a, b = on(image), off(image)
    assert on.model.net2d.graphed.captures == 0  # never captured on CPU
    np.testing.assert_array_equal(a.geometry, b.geometry)
    np.testing.assert_array_equal(a.panoptic, b.panoptic)
    np.testing.assert_array_equal(a.depth, b.depth)


def test_compile_2d_says_it_is_ignored_on_cpu_and_compiles_nothing(setup) -> None:
    from nvp3d.model.compiled2d import is_compiled

    spec = setup["spec"].model_copy(deep=True)
    spec.inference.compile_2d = True
    said: list[str] = []
    p = Predictor(spec, spec.inference.checkpoint, device="cpu", say=said.append)
    p.model.completion.threshold = 0.95
    assert p.model.net2d.graphed.compile  # asked for; a CPU call never captures, so never compiles
    assert any(s.startswith("inference.compile_2d: ignored") for s in said), said
    rec = p(setup["images"] / "img0.png")
    assert not is_compiled(p.model.net2d) and rec.geometry.shape == tuple(p.geometry.grid_dims)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA streams)")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("defer", [False, True])
def test_overlapped_stream_matches_sequential_batches_on_cuda(setup, precision: str, defer: bool) -> None:
    """``inference.overlap_2d`` on CUDA: the 2D network of batch i+1 runs on its own stream during batch i's 3D
    part; every frame's outputs equal those of the batches run one at a time (same kernels, other order)."""
    spec = setup["spec"].model_copy(deep=True)
    spec.inference.num_gpus = 1
    spec.inference.precision = precision
    predictor = _predictor(spec)
    assert predictor._streams() is not None
    prepared = [predictor.prepare(setup["images"] / f"img{i % 5}.png") for i in range(8)]
    stream = [(prepared[i:i + 2], None) for i in range(0, 8, 2)] + [(prepared[:1], None)]
    predictor.overlap_2d = False
    alone = [predictor.predict_prepared(p, m) for p, m in stream]
    predictor.overlap_2d = True
    predictor.defer_host_copy = defer
    for _ in range(2):  # the second pass replays captured graphs on both streams
        streamed = list(predictor.predict_stream(stream))
        for a_batch, s_batch in zip(alone, streamed, strict=True):
            for a, b in zip(a_batch, s_batch, strict=True):
                np.testing.assert_array_equal(a.panoptic, b.panoptic)
                np.testing.assert_array_equal(a.semantic, b.semantic)
                np.testing.assert_array_equal(a.panoptic_2d, b.panoptic_2d)
                np.testing.assert_allclose(a.geometry, b.geometry, atol=1e-5, rtol=0)
                np.testing.assert_allclose(a.depth, b.depth, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graphs_reconstruction_matches_eager_on_cuda(setup, precision: str) -> None:
    spec = setup["spec"].model_copy(deep=True)
    spec.inference.num_gpus = 1
    spec.inference.precision = precision
    images = [setup["images"] / f"img{i}.png" for i in range(3)]
    recs = {}
    for graphs in (False, True):
        spec.inference.cuda_graphs = graphs
        p = _predictor(spec)
        assert p.device.type == "cuda"
        recs[graphs] = p.predict_batch(images)
        if graphs:
            assert p.model.net2d.graphed.level == "full", p.model.net2d.graphed.fallback_reason
            assert p.model.net2d.graphed.captures == 1
    tol = 1e-4 if precision == "fp32" else 5e-2
    for a, b in zip(recs[False], recs[True], strict=True):
        np.testing.assert_allclose(b.depth, a.depth, atol=tol * (1 + np.abs(a.depth).max()), rtol=0)
        assert (a.panoptic == b.panoptic).mean() > 0.999
        assert np.isclose(a.geometry, b.geometry, atol=tol * 3).mean() > 0.999


@pytest.mark.parametrize(("setting", "device", "expected"), [
    (None, "cpu", False), (None, "cuda:0", True), (True, "cpu", True), (False, "cuda:0", False)])
def test_write_processes_default_follows_the_device(setup, tmp_path: Path, monkeypatch, setting, device,
                                                    expected) -> None:
    """``inference.write_processes: null`` (default): writer processes when the network runs on CUDA (the GIL
    contention slows the launching thread there), threads on CPU (a process costs seconds to start)."""
    from nvp3d.inference import run as run_module

    made = []

    class Writer:
        def __init__(self, results, entries, workers, on_done=None, processes=False, kinds=None) -> None:
            made.append(processes)
            raise RuntimeError("stop here")

    class Fake:
        precision, model = "fp32", None

    fake = Fake()
    fake.device = device
    monkeypatch.setattr(run_module, "OutputWriter", Writer)
    spec = setup["spec"].model_copy(deep=True)
    spec.inference.write_processes = setting
    with pytest.raises(RuntimeError, match="stop here"):
        run_inference(spec, tmp_path / "out", None, say=_quiet, enable_progress_bar=False, predictor=fake)
    assert made == [expected]


@pytest.mark.parametrize("allow", [True, False])
def test_allow_tf32_holds_during_the_forward_and_is_restored(setup, allow: bool) -> None:
    """``inference.allow_tf32`` sets TF32 matrix products only while the network runs (the fp32 rows of
    tools/bench_inference.py time what `nvp3d inference` runs); the caller's setting comes back after."""
    spec = setup["spec"].model_copy(deep=True)
    spec.inference.allow_tf32 = allow
    predictor = _predictor(spec)
    seen = []

    def spy(name):
        part = getattr(predictor.model, name)

        def call(*args, **kwargs):
            seen.append((name, torch.backends.cuda.matmul.allow_tf32))
            return part(*args, **kwargs)
        return call

    for name in ("infer_2d", "forward_3d"):  # the 2D network (Predictor.start) and the 3D part (finish)
        setattr(predictor.model, name, spy(name))
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = not allow
    try:
        predictor(setup["images"] / "img0.png")
        assert seen == [("infer_2d", allow), ("forward_3d", allow)]
        assert torch.backends.cuda.matmul.allow_tf32 is (not allow)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_tf32_matmul_restores_after_an_error() -> None:
    from nvp3d.precision import tf32_matmul

    before = torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(RuntimeError, match="boom"), tf32_matmul(not before):
        assert torch.backends.cuda.matmul.allow_tf32 is (not before)
        raise RuntimeError("boom")
    assert torch.backends.cuda.matmul.allow_tf32 is before


def test_semantic_of_segments_matches_a_pass_per_segment() -> None:
    from nvp3d.inference.predictor import semantic_of_segments

    rng = np.random.default_rng(0)
    pan = rng.integers(0, 9, (30, 40)).astype(np.int32)
    segs = [{"id": i, "category_id": int(rng.integers(1, 12))} for i in (1, 2, 4, 7, 11)]  # 11: absent from the map
    want = np.zeros(pan.shape, dtype=np.int32)
    for s in segs:
        want[pan == s["id"]] = s["category_id"]
    got = semantic_of_segments(pan, segs)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(semantic_of_segments(pan, []), np.zeros_like(pan))


def test_spill_sends_voxels_not_dense_volumes(setup, tmp_path: Path) -> None:
    """A Predictor's reconstruction reaches a writer process as its voxels (pickled, about 1 MB at 256^3) plus its
    spilled frustum mask; a dense volume read before is spilled as well; the worker's copy equals the original."""
    import pickle

    from nvp3d.inference.output_queue import _save_spilled, _spill

    predictor = _predictor(setup["spec"].model_copy(deep=True))
    rec = predictor(setup["images"] / "img0.png")
    assert rec.voxels is not None and not any(rec.volume_loaded(n) for n in ("geometry", "semantic", "panoptic"))
    rest, paths = _spill(rec, tmp_path, "a")
    assert set(paths) == {"frustum_mask"}
    assert not rec.volume_loaded("geometry"), "spilling must not build the dense volumes"
    assert len(pickle.dumps(rest)) < rec.frustum_mask.nbytes  # the voxels travel, not 3 dense volumes
    outputs, _, _ = _save_spilled(pickle.loads(pickle.dumps(rest)), paths, tmp_path / "out", "a")
    with np.load(outputs["volumes"]) as z:
        for name in ("geometry", "semantic", "panoptic", "frustum_mask"):
            np.testing.assert_array_equal(z[name], getattr(rec, name), err_msg=name)
    _, paths = _spill(rec, tmp_path, "b")  # the dense volumes were read above: now they are spilled
    assert set(paths) == {"frustum_mask", "geometry", "semantic", "panoptic"}

