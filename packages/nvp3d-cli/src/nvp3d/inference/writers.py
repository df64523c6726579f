"""Output files of ``nvp3d inference``: PLY meshes, ``_panoptic3d.npz`` volumes, PNG overlays, the index JSON.

Every writer goes through :func:`nvp3d.fileio.atomic_path_write`, so a crash or a concurrent reader never
sees a half-written file.

* :func:`write_ply`: binary little-endian PLY (``vertex``: float32 x, y, z + uchar red, green, blue;
  ``face``: uchar count + int32 indices). Every mesh viewer (MeshLab, Blender, Open3D, trimesh) reads it.
* :func:`write_npz`: a compressed ``.npz`` (zlib level 1) of a dict of arrays.
* :func:`write_png`: an 8-bit RGB / grey PNG via Pillow.
* :func:`colorize_labels`, :func:`overlay`, :func:`depth_to_png`: the 2D images shown to users.
* :func:`save_reconstruction`: the files of one reconstructed image (all of :data:`OUTPUT_KINDS`, or the ones
  asked for), including ``<name>_preview.png`` (the 3D mesh from an oblique camera in the PLY's colours, i.e.
  things by instance in panoptic mode: :mod:`nvp3d.inference.preview`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nvp3d.fileio import atomic_path_write
from nvp3d.inference.preview import preview_stride, render_preview

if TYPE_CHECKING:
    from nvp3d.inference.reconstruction import Reconstruction

__all__ = [
    "KINDS_2D",
    "KINDS_3D",
    "OUTPUT_KINDS",
    "colorize_labels",
    "depth_to_png",
    "instance_palette",
    "needs_3d",
    "overlay",
    "save_reconstruction",
    "unknown_kinds",
    "write_npz",
    "write_ply",
    "write_png",
]

#: what ``nvp3d inference`` can write per image (``inference.outputs``), each to its own file:
#: ``semantic`` / ``panoptic`` / ``depth``: ``<name>_<kind>.png`` (2D overlays on the input and the depth image;
#: no panoptic overlay in semantic mode); ``volumes``: ``<name>_panoptic3d.npz``; ``mesh``: ``<name>.ply``;
#: ``preview``: ``<name>_preview.png``. On a 256^3 frame the last three are most of the writing time (each about
#: a second of CPU, ``tools/bench_writers.py``); the 2D ones are a few milliseconds.
OUTPUT_KINDS = ("semantic", "panoptic", "depth", "volumes", "mesh", "preview")
#: the kinds made from the 2D prediction alone, and those that need the 3D stage (lifting, completion, fusion):
#: a run asking for none of the latter skips the 3D stage (:func:`needs_3d`)
KINDS_2D = ("semantic", "panoptic", "depth")
KINDS_3D = ("volumes", "mesh", "preview")


def unknown_kinds(outputs: Iterable[str]) -> list[str]:
    """The names in ``outputs`` that are not output kinds (:data:`OUTPUT_KINDS`), sorted; each caller refuses them
    in its own words."""
    return sorted(set(outputs).difference(OUTPUT_KINDS))


def needs_3d(outputs: Iterable[str] | None) -> bool:
    """Whether writing ``outputs`` (None = all of :data:`OUTPUT_KINDS`) needs the 3D stage's result."""
    return outputs is None or any(kind in KINDS_3D for kind in outputs)


def write_ply(path: str | os.PathLike[str], vertices: np.ndarray, faces: np.ndarray,
              colors: np.ndarray | None = None, comment: str = "nvp3d") -> Path:
    """Binary little-endian PLY of a triangle mesh.

    Args:
        vertices: float ``[V, 3]`` positions.
        faces: int ``[F, 3]`` vertex indices (counter-clockwise seen from outside).
        colors: optional uint8 ``[V, 3]`` RGB per vertex.
    """
    v = np.ascontiguousarray(vertices, dtype="<f4").reshape(-1, 3)
    f = np.ascontiguousarray(faces, dtype="<i4").reshape(-1, 3)
    if f.size and (f.min() < 0 or f.max() >= len(v)):
        raise ValueError(f"write_ply({path}): face indices must lie in [0, {len(v)}), got [{f.min()}, {f.max()}]")
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if colors is not None:
        c = np.asarray(colors)
        if c.shape != (len(v), 3):
            raise ValueError(f"write_ply({path}): colors must be [V={len(v)}, 3], got {c.shape}")
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vert = np.empty(len(v), dtype=fields)
    vert["x"], vert["y"], vert["z"] = v[:, 0], v[:, 1], v[:, 2]
    if colors is not None:
        c = np.clip(np.asarray(colors), 0, 255).astype(np.uint8)
        vert["red"], vert["green"], vert["blue"] = c[:, 0], c[:, 1], c[:, 2]
    face = np.empty(len(f), dtype=[("n", "u1"), ("idx", "<i4", (3,))])
    face["n"] = 3
    face["idx"] = f
    header = ["ply", "format binary_little_endian 1.0", f"comment {comment}", f"element vertex {len(v)}",
              "property float x", "property float y", "property float z"]
    if colors is not None:
        header += ["property uchar red", "property uchar green", "property uchar blue"]
    header += [f"element face {len(f)}", "property list uchar int vertex_indices", "end_header"]

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(("\n".join(header) + "\n").encode("ascii"))
            fh.write(vert.tobytes())
            fh.write(face.tobytes())

    return atomic_path_write(path, _write)


def write_npz(path: str | os.PathLike[str], arrays: Mapping[str, Any]) -> Path:
    """Compressed ``.npz`` of ``arrays`` (values converted with ``np.asarray``), written atomically.

    zlib level 1 (``datasets3d.io.save_npz``, the synthetic data's writer): a frame's volumes are mostly constant,
    and level 1 takes about 0.4 s where ``np.savez_compressed``'s level 6 took 0.9-1.1 s on a 256^3 frame (2-core
    CI machine, stop 48), for a file of 2.6 MB instead of 1.4 MB; ``np.load`` reads both alike."""
    from datasets3d.io import save_npz

    data = {k: np.asarray(v) for k, v in arrays.items()}
    return atomic_path_write(path, lambda tmp: save_npz(tmp, **data), suffix=".npz")


def write_png(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """8-bit PNG of an ``[H, W, 3]`` RGB or ``[H, W]`` grey uint8 array."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"write_png({path}): need uint8 pixels, got {arr.dtype}")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"write_png({path}): need [H, W] or [H, W, 3], got {arr.shape}")
    return atomic_path_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"), suffix=".png")


def instance_palette(n: int, seed: int = 0) -> np.ndarray:
    """``[n, 3]`` uint8 distinct-looking colours (golden-ratio hues), entry 0 black (void)."""
    out = np.zeros((max(n, 1), 3), dtype=np.uint8)
    for i in range(1, n):
        h = (i * 0.6180339887 + seed * 0.1) % 1.0
        s, v = 0.65 + 0.35 * ((i * 7) % 3) / 2, 0.95 - 0.25 * ((i * 5) % 2)
        out[i] = np.round(255 * np.array(_hsv_to_rgb(h, s, v))).astype(np.uint8)
    return out[:n]


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def colorize_labels(labels: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Map an integer label image to RGB with a ``[L, 3]`` colour table (labels outside it become black)."""
    lab = np.asarray(labels).astype(np.int64)
    table = np.asarray(colors, dtype=np.uint8)
    ok = (lab >= 0) & (lab < len(table))
    out = np.zeros((*lab.shape, 3), dtype=np.uint8)
    out[ok] = table[lab[ok]]
    return out


def overlay(image: np.ndarray, color: np.ndarray, mask: np.ndarray | None = None, alpha: float = 0.5) -> np.ndarray:
    """Blend ``color`` over the uint8 RGB ``image`` where ``mask`` (default: every non-black colour pixel)."""
    img = np.asarray(image, dtype=np.float32)
    col = np.asarray(color, dtype=np.float32)
    if img.shape != col.shape:
        raise ValueError(f"overlay: image {img.shape} and colour {col.shape} differ")
    m = (col.sum(-1) > 0) if mask is None else np.asarray(mask, dtype=bool)
    out = img.copy()
    out[m] = (1 - alpha) * img[m] + alpha * col[m]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def depth_to_png(depth: np.ndarray, depth_max: float) -> np.ndarray:
    """Metric depth ``[H, W]`` -> uint8 grey (0 m black .. ``depth_max`` white; invalid = 0)."""
    d = np.nan_to_num(np.asarray(depth, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if depth_max <= 0:
        raise ValueError(f"depth_max must be positive, got {depth_max}")
    return np.round(np.clip(d / depth_max, 0.0, 1.0) * 255).astype(np.uint8)


def save_reconstruction(rec: Reconstruction, directory: str | os.PathLike[str], name: str = "frame",
                        outputs: Iterable[str] | None = None) -> dict[str, str]:
    """Write the files of ``rec`` for each kind in ``outputs`` (default: all of :data:`OUTPUT_KINDS`); returns
    the paths by kind (all files atomic). With ``mesh``, the mesh's size is recorded in ``rec.meta``. The preview
    renders a mesh of the volumes pooled to the picture's detail (:func:`nvp3d.inference.preview.preview_stride`:
    a 256^3 grid's 128^3 pooling; smaller grids at full resolution), not the written mesh. A 2D-only reconstruction writes 2D kinds
    only (a 3D kind is refused in one line, before any file is written)."""
    kinds = set(OUTPUT_KINDS if outputs is None else outputs)
    unknown = unknown_kinds(kinds)
    if unknown:
        raise ValueError(f"save_reconstruction: unknown output kind(s) {unknown}; choose from {list(OUTPUT_KINDS)}")
    if needs_3d(kinds):
        rec.require_3d(f"save_reconstruction of {sorted(kinds.intersection(KINDS_3D))}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    if kinds.intersection(("semantic", "panoptic", "depth")):
        for kind, img in rec.overlays().items():
            if kind in kinds:
                paths[kind] = str(write_png(d / f"{name}_{kind}.png", img))
    if "volumes" in kinds:
        paths["volumes"] = str(write_npz(d / f"{name}_panoptic3d.npz", rec.arrays()))
    mesh = None
    if "mesh" in kinds:
        mesh = rec.to_mesh()
        rec.meta["mesh_vertices"], rec.meta["mesh_faces"] = mesh.num_vertices, mesh.num_faces
        paths["mesh"] = str(write_ply(d / f"{name}.ply", mesh.vertices, mesh.faces, mesh.colors,
                                      comment=f"nvp3d {rec.mode} reconstruction, camera metres"))
    if "preview" in kinds:  # the PLY's colours, from a mesh no finer than the picture shows
        stride = preview_stride(rec.geometry.shape)
        picture = mesh if mesh is not None and stride == 1 else rec.to_mesh(stride=stride)
        paths["preview"] = str(write_png(d / f"{name}_preview.png", render_preview(picture)))
    return paths
