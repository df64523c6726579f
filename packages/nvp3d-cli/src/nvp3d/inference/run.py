"""``nvp3d inference``: reconstruct every image of ``inference.images_dir`` and write what users look at.

Input
    ``inference.images_dir``: ``*.jpg``/``*.jpeg``/``*.png`` (any case), top level only, or every sub-folder
    with ``inference.recursive: true``. The number found is printed; none found is a clear error. A URL
    (``s3://bucket/prefix``, ``gs://``, any fsspec protocol) is mirrored into the dataset cache first
    (:func:`datasets3d.resolve_dataset_path`), so a second run downloads only what changed.
    Per-image intrinsics (optional), looked up beside the image: ``<stem>.json`` or ``<stem>_intrinsic.json``
    (``{"fx":..,"fy":..,"cx":..,"cy":..}`` or ``{"intrinsic": 3x3/4x4 list}``, for the image's own pixel size)
    or ``<stem>.npy`` / ``<stem>_intrinsic.npy`` (3x3 or 4x4). Else the folder's camera: ``inference.intrinsic``
    ([fx, fy, cx, cy, width, height]), ``<images_dir>/camera.json`` or the dataset's ``meta/camera.json`` (format
    of ``datasets3d.synth``: ``intrinsic`` [fx, fy, cx, cy], ``image_size`` [W, H]), rescaled to each image's size.
    Default: the 3D-FRONT intrinsic rescaled to the image size. ``inference.mode``: panoptic | instance | semantic (colouring and which segments are kept).

Output under ``results_dir``, per image ``<name>`` (the image path relative to ``images_dir`` without its
suffix, sub-folders joined with ``__``):
    ``<name>_semantic.png`` (and ``<name>_panoptic.png`` unless mode is semantic): 2D overlays on the input;
    ``<name>_depth.png``: predicted depth, 0 .. depth_max as black .. white;
    ``<name>_panoptic3d.npz``: volumes and metadata (keys in :mod:`nvp3d.inference.reconstruction`);
    ``<name>.ply``: marching-cubes mesh of the predicted TDF at ``model.frustum3d.iso_recon_value``, vertex
    colours by class or instance, camera metres;
    ``<name>_preview.png``: that mesh seen from an oblique camera.
``inference.outputs`` names the kinds to write (default all: semantic, panoptic, depth, volumes, mesh, preview);
a run that needs only the volumes skips the mesh and its preview, which cost as much CPU time as the volumes.
A run with 2D kinds only (semantic, panoptic, depth) skips the whole 3D stage: no frustum mask, lifting,
completion decoder or fusion runs, nothing 3D reaches the writers, and ``inference.checkpoint`` may be a 2D-stage
checkpoint (only its 2D weights are loaded). Its 2D files equal those of a full run; each index entry's
``segments`` then lists the 2D panoptic segments (there are no 3D ones) and ``stage_3d`` in ``index.json`` is false.
``index.json`` lists every image with its outputs, segment classes, mesh size and timing. All files are
written atomically. A progress bar runs over the images; images/s is reported at the end (log line, ``index.json``
and the status KPI).

Speed: ``inference.batch_size`` images go through the network in one forward pass (the last batch may be
smaller; outputs equal batch 1's within float tolerance); ``inference.precision: bf16`` runs it under bfloat16
autocast; ``inference.cuda_graphs`` (default on) replays the 2D network from CUDA graphs on a GPU
(:mod:`nvp3d.model.graphed2d`); ``inference.overlap_2d`` (default on) launches the 2D network of the next batch
on a second CUDA stream before this batch's host-bound 3D part runs; ``inference.write_workers`` threads write
the files of one batch while the next one runs (:mod:`nvp3d.inference.output_queue`). An image whose forward pass fails inside a batch is retried
alone, so the error (or ``dataset.skip_bad``) concerns that image only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from datasets3d import is_remote

from nvp3d.data.datamodule import local_dataset_path
from nvp3d.fileio import write_json
from nvp3d.inference.inputs import PredictInputError, find_images, folder_camera, image_intrinsic, output_name
from nvp3d.inference.output_queue import OutputWriter
from nvp3d.inference.predictor import Predictor
from nvp3d.inference.skipping import IMAGE_ERRORS, partial_index, skip_or_raise
from nvp3d.inference.writers import OUTPUT_KINDS, needs_3d

__all__ = ["INDEX_FILENAME", "run", "run_inference"]

INDEX_FILENAME = "index.json"


class _NoProgress:
    """Stands in for a tqdm bar when the bar is off."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enable: bool):
    if not enable:
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with pytorch-lightning
        return _NoProgress()
    return tqdm(total=total, desc="inference", unit="image")


def batches(items: list, size: int) -> list[list]:
    """``items`` in consecutive chunks of ``size`` (the last one may be shorter)."""
    if size < 1:
        raise PredictInputError(f"inference.batch_size must be a positive number, got {size}")
    return [items[i:i + size] for i in range(0, len(items), size)]


Ready = tuple[Path, str, str, Any, Any]  # (path, output name, intrinsic source, prepared input, frustum mask)


def _prepare_chunk(predictor: Any, chunk: list[Path], images_dir: Path, camera: Any, frustum_masks: dict[str, Any],
                   image_failed) -> list[Ready]:
    """Read and resize the images of one batch; an unreadable one goes to ``image_failed``."""
    ready = []
    for path in chunk:
        name = output_name(path, images_dir)
        try:
            k, source = image_intrinsic(path, camera)
            try:
                prepared = predictor.prepare(path, k)
            except PredictInputError as exc:
                raise ValueError(f"{path}: {exc}") from exc
        except IMAGE_ERRORS as exc:
            image_failed(path, exc)
            continue
        ready.append((path, name, source, prepared, frustum_masks.get(name)))
    return ready


def _predict_chunk(predictor: Any, ready: list[Ready], image_failed, batch_failed: bool = False
                   ) -> list[tuple[Ready, Any]]:
    """One forward pass for the batch; if it fails (or ``batch_failed``: it already did), each image alone, so the
    error concerns one image."""
    if not ready:
        return []
    if not batch_failed:
        try:
            recs = predictor.predict_prepared([r[3] for r in ready], [r[4] for r in ready])
            return list(zip(ready, recs, strict=True))
        except IMAGE_ERRORS as exc:
            batch_failed = True
            if len(ready) == 1:
                image_failed(ready[0][0], exc)
                return []
    done = []
    for r in ready:
        try:
            done += [(r, rec) for rec in predictor.predict_prepared([r[3]], [r[4]])]
        except IMAGE_ERRORS as exc:
            image_failed(r[0], exc)
    return done


def _start_chunk(predictor: Any, ready: list[Ready]) -> Any:
    """Launch the batch's 2D network (:meth:`Predictor.start`); ``None`` when there is nothing to run or it
    failed on the images (the batch then goes through :func:`_predict_chunk` image by image)."""
    if not ready:
        return None
    try:
        return predictor.start([r[3] for r in ready], [r[4] for r in ready])
    except IMAGE_ERRORS:
        return None


def _finish_chunk(predictor: Any, ready: list[Ready], pending: Any, image_failed) -> list[tuple[Ready, Any]]:
    """The rest of a started batch (:meth:`Predictor.finish`), or :func:`_predict_chunk` when it failed."""
    if pending is not None:
        try:
            return list(zip(ready, predictor.finish(pending), strict=True))
        except IMAGE_ERRORS:
            pass
    return _predict_chunk(predictor, ready, image_failed, batch_failed=bool(ready))


def _npz_keys(results: Path, entries: list[dict[str, Any]]) -> list[str]:
    """The keys of the first written ``_panoptic3d.npz`` (none when no image was written or the volumes were not
    asked for)."""
    first = entries[0]["outputs"].get("volumes") if entries else None
    return sorted(np.load(results / first).files) if first else []


def run_inference(spec: Any, results_dir: str | Path, status: Any, *, say=print, enable_progress_bar: bool = True,
                  predictor: Any = None, frustum_masks: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``nvp3d inference`` (module docstring); returns ``{"images", "images_per_second", ...}``.

    ``predictor`` reuses a loaded :class:`nvp3d.inference.predictor.Predictor`; ``frustum_masks`` maps an output name to a
    frustum mask to use instead of the analytic one (tests compare against evaluation this way).
    """
    inf = spec.inference
    # a URL (s3://, gs://, ...) is mirrored into the dataset cache ($NVP3D_CACHE; only new or changed objects are
    # downloaded, as for datasets) and read from there
    remote = bool(inf.images_dir) and is_remote(inf.images_dir)
    images_dir = local_dataset_path(inf.images_dir, "inference.images_dir") if remote else Path(inf.images_dir)
    files = find_images(images_dir if inf.images_dir else "", inf.recursive)
    say(f"inference: found {len(files)} image{'s' if len(files) != 1 else ''} in {images_dir}"
        f"{' (recursive)' if inf.recursive else ''}")
    chunks = batches(files, int(inf.batch_size))
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    kinds = tuple(inf.outputs)
    stage_3d = needs_3d(kinds)
    if predictor is None:
        predictor = Predictor(spec, inf.checkpoint, mode=inf.mode, say=say, outputs=kinds)
    _check_3d_weights(predictor, stage_3d)
    camera = folder_camera(images_dir, list(inf.intrinsic))
    say(f"inference: camera of images without their own intrinsic file: "
        f"{camera[2] if camera else 'the 3D-FRONT default (set inference.intrinsic or put camera.json in images_dir)'}")
    entries: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []  # unreadable images (dataset.skip_bad)
    bar = _progress(len(files), enable_progress_bar)
    on_cuda = str(getattr(predictor, "device", "cpu")).startswith("cuda")
    processes = on_cuda if inf.write_processes is None else bool(inf.write_processes)
    say(f"inference: batch size {inf.batch_size}, precision {predictor.precision}, CUDA graphs "
        f"{'off' if _graph_level(predictor) == 'off' else 'on'} ({predictor.device}), "
        f"{inf.write_workers} write {'processes' if processes else 'threads'}")
    if set(kinds) != set(OUTPUT_KINDS):
        say(f"inference: writing {', '.join(kinds)} per image (inference.outputs)"
            f"{'' if stage_3d else '; 2D only: the 3D stage is skipped'}")
    writer = OutputWriter(results, entries, int(inf.write_workers), on_done=bar.update, processes=processes,
                          kinds=kinds)

    # one batch in flight: its 2D network was launched (Predictor.start) and its 3D part runs after the next
    # batch's 2D network is launched, so that with inference.overlap_2d the device works on both
    in_flight: list[tuple[list[Ready], Any]] = []
    last = [0.0]

    def finish_in_flight() -> None:
        """Finish the batch in flight (if any) and hand its reconstructions to the writers."""
        if not in_flight:
            return
        ready, pending = in_flight.pop()
        done = _finish_chunk(predictor, ready, pending, image_failed)
        now = time.perf_counter()
        share = (now - last[0]) / max(1, len(done))  # the time since the last batch finished, per image
        last[0] = now
        for (path, name, source, _, _), rec in done:
            writer.submit(path, name, source, rec, share)

    def image_failed(path: Path, exc: BaseException) -> None:
        """Skip ``path`` (dataset.skip_bad) or write the partial index and re-raise."""
        bar.update()
        try:
            skip_or_raise(spec, path, exc, skipped, say)
        except IMAGE_ERRORS:
            finish_in_flight()  # the batch before this image's is reconstructed and written first
            writer.flush()  # the images before this one are written and listed, as without the writer pool
            write_json(results / INDEX_FILENAME, partial_index(images_dir, entries, skipped,
                                                               {"image": str(path), "error": str(exc)}))
            raise

    t0 = time.perf_counter()
    last[0] = t0
    try:
        with _stage_3d(predictor, stage_3d):
            for chunk in chunks:
                ready = _prepare_chunk(predictor, chunk, images_dir, camera, frustum_masks or {}, image_failed)
                pending = _start_chunk(predictor, ready)
                finish_in_flight()
                in_flight.append((ready, pending))
            finish_in_flight()
        writer.finish()
    finally:
        writer.close()
        bar.close()
    elapsed = time.perf_counter() - t0
    rate = len(files) / elapsed if elapsed > 0 else float("inf")
    g = predictor.geometry
    index = {
        "images_dir": str(inf.images_dir if remote else images_dir),
        **({"images_cache": str(images_dir)} if remote else {}),
        "recursive": bool(inf.recursive), "mode": predictor.mode,
        "checkpoint": str(inf.checkpoint), "num_images": len(files), "seconds": round(elapsed, 3),
        "images_per_second": round(rate, 4), "batch_size": int(inf.batch_size), "precision": predictor.precision,
        "device": str(predictor.device), "cuda_graphs": _graph_level(predictor),
        "compile_2d": _compiled_2d(predictor),
        "grid": {"dims": list(g.grid_dims), "voxel_size": g.voxel_size, "depth_range": [g.depth_min, g.depth_max],
                 "truncation": g.truncation, "iso_value": predictor.iso_value},
        "outputs": list(kinds),
        "stage_3d": stage_3d,
        "npz_keys": _npz_keys(results, entries),
        "images": entries,
        "skipped": skipped,
    }
    write_json(results / INDEX_FILENAME, index)
    noun = "image" if len(files) == 1 else "images"
    say(f"inference: {len(files)} {noun} in {elapsed:.1f} s ({rate:.2f} images/s); outputs in {results} "
        f"(index: {results / INDEX_FILENAME})")
    kpi = {"images": len(files), "images_per_second": round(rate, 4), "batch_size": int(inf.batch_size)}
    if skipped:  # dataset.skip_bad: say which, and count only what was reconstructed
        say(f"inference: skipped {len(skipped)} unreadable image(s) (dataset.skip_bad; listed in index.json): "
            + ", ".join(s["image"] for s in skipped))
        kpi.update(images=len(entries), skipped=len(skipped))
    if status is not None:
        status.running("Inference finished.", kpi=kpi)
    return kpi


def _check_3d_weights(predictor: Any, stage_3d: bool) -> None:
    """Refuse, before any image, 3D outputs from a given Predictor made for 2D outputs only (no 3D weights)."""
    if stage_3d and not getattr(predictor, "weights_3d", True):
        raise PredictInputError("inference.outputs asks for 3D kinds but the Predictor given loaded no 3D weights: "
                                "make it with outputs=inference.outputs")


@contextlib.contextmanager
def _stage_3d(predictor: Any, on: bool) -> Iterator[None]:
    """The predictor's 3D stage on (a 3D kind in ``inference.outputs``) or off for this run; a given predictor's
    own setting comes back afterwards."""
    before = getattr(predictor, "stage_3d", True)
    predictor.stage_3d = on
    try:
        yield
    finally:
        predictor.stage_3d = before


def _graph_level(predictor: Any) -> str:
    """``off`` or the CUDA-graph level used (``full`` | ``backbone`` | ``eager`` after a failed capture)."""
    graphed = getattr(getattr(predictor.model, "net2d", None), "graphed", None)
    if graphed is None or predictor.device.type != "cuda":
        return "off"
    return graphed.level


def _compiled_2d(predictor: Any) -> bool:
    """Whether the graphs replay the compiled 2D network (``inference.compile_2d`` and no failed capture)."""
    return _graph_level(predictor) in ("full", "backbone") and bool(predictor.model.net2d.graphed.compile)


def run(spec: Any, results_dir: Path, status: Any) -> dict[str, Any]:
    """The ``inference`` action."""
    return run_inference(spec, results_dir, status)
