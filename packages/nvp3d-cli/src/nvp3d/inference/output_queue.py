"""Writing the outputs of ``nvp3d inference`` while the network works on the next batch.

At a 256^3 grid one image's files (compressed volumes, marching-cubes mesh, overlays, preview) take about as
long on the CPU as several forward passes on a GPU, so with ``inference.write_workers`` > 0 they are written by a
pool of threads (zlib, PNG encoding and most of the mesh work release the GIL) while the main thread runs the
next batch. At most ``2 * workers`` reconstructions wait (each holds its dense volumes). ``index.json`` entries
keep the order of the images, and a failed write stops the run as it did when writing in the main thread.
With 0 workers everything is written in the calling thread, as before.

With ``processes=True`` (``inference.write_processes``) the workers are spawned processes: writing then does not
compete with the launching thread for the GIL. An image's dense volumes (the bulk of its bytes) are spilled to
``.npy`` files in a private folder under ``/dev/shm`` (memory, where it exists; else the temp folder), the rest of
the reconstruction is pickled, and the worker maps the files back; the files are removed when the image is
collected, the folder when the writer closes. A Predictor's reconstruction holds its 3D volumes as voxels (about
1 MB, :mod:`nvp3d.inference.volumes`): those travel in the pickle and the worker builds the dense volumes; only
its frustum mask (when the volumes are written: the npz is its only reader) and any volume already read as a
dense array are spilled. A 2D-only reconstruction (``inference.outputs`` without a 3D kind) has no 3D arrays:
only its 2D prediction travels, in the pickle.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from nvp3d.inference.volumes import VOLUMES

__all__ = ["OutputWriter", "index_entry"]


def index_entry(path: Path, name: str, source: str, rec: Any, outputs: dict[str, str], seconds: float
                ) -> dict[str, Any]:
    """The ``index.json`` entry of one written image."""
    return {
        "image": str(path), "name": name, "intrinsic": source,
        "outputs": {kind: Path(p).name for kind, p in outputs.items()},
        "segments": [{"id": int(s), "class_id": int(c), "class": rec.classes.get(c, (str(c), False))[0],
                      "isthing": bool(rec.is_thing[s])} for s, c in rec.mapping.items()],
        "mesh": {"vertices": rec.meta.get("mesh_vertices"), "faces": rec.meta.get("mesh_faces")},
        "seconds": round(seconds, 4),
    }


def _save(rec: Any, results: Path, name: str, kinds: tuple[str, ...] | None = None) -> tuple[dict[str, str], float]:
    t = time.perf_counter()
    outputs = rec.save(results, name, kinds)
    return outputs, time.perf_counter() - t


#: the dense volume fields of a Reconstruction, spilled to files for a writer process
SPILLED = (*VOLUMES, "frustum_mask")


def _spill_folder() -> Path:
    """A private folder for spilled volumes: in memory (/dev/shm) where the system has it."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="nvp3d-write-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))


def _spill(rec: Any, folder: Path, key: str, kinds: tuple[str, ...] | None = None) -> tuple[Any, dict[str, str]]:
    """``rec`` without its dense volumes (those written to ``folder/<key>_<field>.npy``) and the files' paths.
    A volume not yet built from the reconstruction's voxels stays unbuilt (the worker builds it). The frustum
    mask (16.7 MB at 256^3) is one of the volumes' arrays: it travels only when ``kinds`` (None = all) has
    ``volumes``, and a 2D-only reconstruction has none."""
    paths = {}
    for name in SPILLED:
        if name != "frustum_mask" and not rec.volume_loaded(name):
            continue
        if name == "frustum_mask" and (rec.frustum_mask is None or not _writes_volumes(kinds)):
            continue
        path = folder / f"{key}_{name}.npy"
        np.save(path, np.ascontiguousarray(getattr(rec, name)))
        paths[name] = str(path)
    dropped = {} if _writes_volumes(kinds) else {"frustum_mask": None}
    return rec.replaced(**{name: None for name in paths}, **dropped), paths


def _writes_volumes(kinds: tuple[str, ...] | None) -> bool:
    """Whether ``kinds`` (None = all) writes the ``_panoptic3d.npz`` (the only output that reads the frustum
    mask)."""
    return kinds is None or "volumes" in kinds


def _import_writers() -> None:
    """Run once per writer process at start: the writers' imports happen while the network works on the first
    batch, not when the first image is due. They are numpy's and the writers' own: neither the console script
    (:mod:`nvp3d.cli`, which a spawned process imports again as its main module) nor :mod:`nvp3d.inference` imports
    torch at import time, so a writer process is ready in about a second (stop 52: 1.4-1.6 s for two processes
    on a 2-core CPU, against 7.8-8.7 s when each imported torch and the network's modules)."""
    import nvp3d.inference.reconstruction  # noqa: F401


def _save_spilled(rest: Any, paths: dict[str, str], results: Path, name: str, kinds: tuple[str, ...] | None = None
                  ) -> tuple[dict[str, str], float, dict[str, Any]]:
    """In a writer process: map the spilled volumes back into the reconstruction and save it. Also returns the
    reconstruction's ``meta`` as saving left it (the mesh counts of the index entry are set there)."""
    volumes = {k: np.load(p, mmap_mode="c") for k, p in paths.items()}
    rec = rest.replaced(**volumes)
    outputs, seconds = _save(rec, results, name, kinds)
    return outputs, seconds, rec.meta


class OutputWriter:
    """``submit`` reconstructions in image order; finished entries are appended to ``entries`` in that order.

    Args:
        results: output folder.
        entries: the list that receives the ``index.json`` entries.
        workers: writer threads, or processes (0 = write in the calling thread).
        on_done: called once per written image (progress bar).
        processes: the workers are spawned processes (module docstring), not threads.
        kinds: the output kinds to write (``inference.outputs``; None = all,
            :data:`nvp3d.inference.writers.OUTPUT_KINDS`).
    """

    def __init__(self, results: Path, entries: list[dict[str, Any]], workers: int, on_done=lambda: None,
                 processes: bool = False, kinds: tuple[str, ...] | None = None) -> None:
        self.results = results
        self.kinds = None if kinds is None else tuple(kinds)
        self.entries = entries
        self.workers = int(workers)
        self.on_done = on_done
        self.spill: Path | None = None
        self.pool: Executor | None = None
        if self.workers > 0 and processes:
            self.spill = _spill_folder()
            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))
            for _ in range(self.workers):  # starts every worker now (one per submitted task)
                self.pool.submit(_import_writers)
        elif self.workers > 0:
            self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="nvp3d-write")
        self.pending: deque[tuple[Path, str, str, Any, float, Future, dict[str, str]]] = deque()

    def submit(self, path: Path, name: str, source: str, rec: Any, forward_seconds: float) -> None:
        """Write ``rec``'s files (now, or in a worker); ``forward_seconds``: its share of the batch."""
        if self.pool is None:
            outputs, seconds = _save(rec, self.results, name, self.kinds)
            self._done(path, name, source, rec, forward_seconds + seconds, outputs)
            return
        spilled: dict[str, str] = {}
        if self.spill is not None:
            rec, spilled = _spill(rec, self.spill, f"{len(self.entries) + len(self.pending):06d}", self.kinds)
            future = self.pool.submit(_save_spilled, rec, spilled, self.results, name, self.kinds)
        else:
            future = self.pool.submit(_save, rec, self.results, name, self.kinds)
        self.pending.append((path, name, source, rec, forward_seconds, future, spilled))
        while len(self.pending) > 2 * self.workers:
            self._collect_one()

    def _collect_one(self) -> None:
        path, name, source, rec, forward_seconds, future, spilled = self.pending.popleft()
        try:
            result = future.result()  # a failed write raises here, in the main thread
        finally:
            for file in spilled.values():
                Path(file).unlink(missing_ok=True)
        outputs, seconds = result[:2]
        if spilled:  # written in a process (_save_spilled): the mesh counts it set
            rec.meta.update(result[2])
        self._done(path, name, source, rec, forward_seconds + seconds, outputs)

    def _done(self, path: Path, name: str, source: str, rec: Any, seconds: float, outputs: dict[str, str]) -> None:
        self.entries.append(index_entry(path, name, source, rec, outputs, seconds))
        self.on_done()

    def flush(self) -> None:
        """Wait for every write submitted so far (in order); re-raises the first failed one."""
        while self.pending:
            self._collect_one()

    def finish(self) -> None:
        """:meth:`flush`, then stop the pool."""
        try:
            self.flush()
        finally:
            self.close()

    def close(self) -> None:
        """Stop the pool (waiting for writes under way); pending entries not yet collected are dropped."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        if self.spill is not None:
            shutil.rmtree(self.spill, ignore_errors=True)
            self.spill = None
