"""Output paths of the export: up-front writability checks and atomic ONNX / engine writes.

An ONNX protobuf cannot exceed 2 GB, so a bigger graph keeps its weights in one external-data file next to
it (``<name>.onnx.data``). Both files are first written into a hidden temporary folder beside the target
and then renamed into place (data file first, graph last), so readers never see a half-written graph.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from nvp3d.errors import UnwritableOutputError

#: protobuf's hard limit; graphs whose initialisers exceed it must use external data
PROTOBUF_LIMIT_BYTES = 2**31 - 1


def check_writable(path: str | os.PathLike[str], key: str) -> Path:
    """Resolve ``path`` (an output file named by spec key ``key``) and prove its folder is writable.

    Creates missing parent folders. Raises :class:`UnwritableOutputError` with the key and the fix.
    """
    target = Path(path).expanduser()
    if target.is_dir():
        raise UnwritableOutputError(f"{key}={path} is a folder; give a file path such as {target / 'model.onnx'}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=target.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UnwritableOutputError(
            f"{key}={path}: cannot write to folder {target.parent} ({reason}); choose a writable path"
        ) from None
    if target.exists() and not os.access(target, os.W_OK):
        raise UnwritableOutputError(f"{key}={path} exists and is read-only; remove it or choose another path")
    return target.resolve()


def external_data_name(target: Path) -> str:
    """File name of the external weights of ``target`` (``model.onnx`` -> ``model.onnx.data``)."""
    return target.name + ".data"


@contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A hidden temporary folder next to ``target`` (same file system, so renames are atomic); removed after."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _external_tensors(graph) -> Iterator:
    """Every TensorProto of ``graph`` stored as external data (initializers, node attributes, subgraphs)."""
    import onnx

    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor
    for node in graph.node:
        for attr in node.attribute:
            tensors = [attr.t] if attr.HasField("t") else []
            for tensor in [*tensors, *attr.tensors]:
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    yield tensor
            for sub in [attr.g] if attr.HasField("g") else []:
                yield from _external_tensors(sub)
            for sub in attr.graphs:
                yield from _external_tensors(sub)


def merge_external_data(onnx_path: Path, out_onnx: Path, data_name: str, chunk: int = 64 << 20) -> None:
    """Rewrite a graph whose tensors live in many sidecar files so they live in one ``data_name`` file.

    Streams the bytes (constant memory, whatever the model size); each tensor starts on a 4 KiB boundary.
    ``out_onnx`` and its data file are written in ``out_onnx``'s folder.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    src_dir = onnx_path.parent
    with open(out_onnx.parent / data_name, "wb") as out:
        for tensor in _external_tensors(model.graph):
            info = {entry.key: entry.value for entry in tensor.external_data}
            offset = int(info.get("offset", 0))
            with open(src_dir / info["location"], "rb") as src:
                src.seek(offset)
                remaining = int(info["length"]) if "length" in info else None
                pad = (-out.tell()) % 4096
                out.write(b"\0" * pad)
                start, written = out.tell(), 0
                while remaining is None or remaining > 0:
                    block = src.read(chunk if remaining is None else min(chunk, remaining))
                    if not block:
                        break
                    out.write(block)
                    written += len(block)
                    if remaining is not None:
                        remaining -= len(block)
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(start)), ("length", str(written))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        out.flush()
        os.fsync(out.fileno())
    onnx.save_model(model, str(out_onnx))


def write_onnx_atomically(target: Path, write: Callable[[Path], None]) -> list[Path]:
    """Run ``write(tmp_onnx_path)`` in a staging folder, then move the result to ``target`` atomically.

    ``write`` may leave the graph with its tensors inline (< 2 GB) or with any number of external-data
    files (``torch.onnx.export`` writes one file per tensor above 2 GB). Above the protobuf limit the tensors
    are gathered into one ``<target>.data`` file (streamed, constant memory); below it the graph is one
    self-contained file. Returns the files written (graph first). A stale ``.data`` file of an earlier,
    larger export is removed.
    """
    import onnx

    data_path = target.with_name(external_data_name(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(target) as tmp:
        tmp_onnx = tmp / target.name
        write(tmp_onnx)
        sidecars = [p for p in tmp.iterdir() if p.name != target.name]
        weight_bytes = sum(p.stat().st_size for p in sidecars) + tmp_onnx.stat().st_size
        final = tmp / "final"
        if not sidecars and weight_bytes <= PROTOBUF_LIMIT_BYTES:
            os.chmod(tmp_onnx, 0o644)
            os.replace(tmp_onnx, target)
            data_path.unlink(missing_ok=True)
            return [target]
        final.mkdir()
        if weight_bytes <= PROTOBUF_LIMIT_BYTES:  # small enough to be one self-contained file
            onnx.save_model(onnx.load(str(tmp_onnx), load_external_data=True), str(final / target.name))
            os.chmod(final / target.name, 0o644)
            os.replace(final / target.name, target)
            data_path.unlink(missing_ok=True)
            return [target]
        if sidecars:
            merge_external_data(tmp_onnx, final / target.name, data_path.name)
        else:  # one inline file above the limit (only reachable with a lowered limit)
            onnx.save_model(onnx.load(str(tmp_onnx)), str(final / target.name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_path.name, size_threshold=1024)
        for p in (final / data_path.name, final / target.name):
            os.chmod(p, 0o644)
        os.replace(final / data_path.name, data_path)
        os.replace(final / target.name, target)
        return [target, data_path]


def total_size(paths: list[Path]) -> int:
    """Bytes on disk of ``paths`` together (graph plus external data)."""
    return sum(p.stat().st_size for p in paths)
