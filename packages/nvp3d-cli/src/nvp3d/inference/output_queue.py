"""Writing the outputs of ``nvp3d inference`` while the network works on the next batch.

At a 256^3 grid one image's files (compressed volumes, marching-cubes mesh, overlays, preview) take about as
long on the CPU as several forward passes on a GPU, so with ``inference.write_workers`` > 0 they are written by a
pool of threads (zlib, PNG encoding and most of the mesh work release the GIL) while the main thread runs the
next batch. At most ``2 * workers`` reconstructions wait (each holds its dense volumes). ``index.json`` entries
keep the order of the images, and a failed write stops the run as it did when writing in the main thread.
With 0 workers everything is written in the calling thread, as before.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

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


def _save(rec: Any, results: Path, name: str) -> tuple[dict[str, str], float]:
    t = time.perf_counter()
    outputs = rec.save(results, name)
    return outputs, time.perf_counter() - t


class OutputWriter:
    """``submit`` reconstructions in image order; finished entries are appended to ``entries`` in that order.

    Args:
        results: output folder.
        entries: the list that receives the ``index.json`` entries.
        workers: writer threads (0 = write in the calling thread).
        on_done: called once per written image (progress bar).
    """

    def __init__(self, results: Path, entries: list[dict[str, Any]], workers: int, on_done=lambda: None) -> None:
        self.results = results
        self.entries = entries
        self.workers = int(workers)
        self.on_done = on_done
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="nvp3d-write") \
            if self.workers > 0 else None
        self.pending: deque[tuple[Path, str, str, Any, float, Future]] = deque()

    def submit(self, path: Path, name: str, source: str, rec: Any, forward_seconds: float) -> None:
        """Write ``rec``'s files (now, or in a worker thread); ``forward_seconds``: its share of the batch."""
        if self.pool is None:
            outputs, seconds = _save(rec, self.results, name)
            self._done(path, name, source, rec, forward_seconds + seconds, outputs)
            return
        self.pending.append((path, name, source, rec, forward_seconds, self.pool.submit(_save, rec, self.results, name)))
        while len(self.pending) > 2 * self.workers:
            self._collect_one()

    def _collect_one(self) -> None:
        path, name, source, rec, forward_seconds, future = self.pending.popleft()
        outputs, seconds = future.result()  # a failed write raises here, in the main thread
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
