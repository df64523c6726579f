"""``nvp3d inference``: reconstruct every image of ``inference.images_dir`` and write what users look at.

Input
    ``inference.images_dir``: ``*.jpg``/``*.jpeg``/``*.png`` (any case), top level only, or every sub-folder
    with ``inference.recursive: true``. The number found is printed; none found is a clear error.
    Per-image intrinsics (optional), looked up beside the image: ``<stem>.json`` or ``<stem>_intrinsic.json``
    (``{"fx":..,"fy":..,"cx":..,"cy":..}`` or ``{"intrinsic": 3x3/4x4 list}``, for the image's own pixel size)
    or ``<stem>.npy`` / ``<stem>_intrinsic.npy`` (3x3 or 4x4). Default: the 3D-FRONT intrinsic rescaled to the
    image size. ``inference.mode``: panoptic | instance | semantic (colouring and which segments are kept).

Output under ``results_dir``, per image ``<name>`` (the image path relative to ``images_dir`` without its
suffix, sub-folders joined with ``__``):
    ``<name>_semantic.png`` (and ``<name>_panoptic.png`` unless mode is semantic): 2D overlays on the input;
    ``<name>_depth.png``: predicted depth, 0 .. depth_max as black .. white;
    ``<name>_panoptic3d.npz``: volumes and metadata (keys in :mod:`nvp3d.predict`);
    ``<name>.ply``: marching-cubes mesh of the predicted TDF at ``model.frustum3d.iso_recon_value``, vertex
    colours by class or instance, camera metres.
``index.json`` lists every image with its outputs, segment classes, mesh size and timing. All files are
written atomically. A progress bar runs over the images; images/s is reported at the end and returned as KPI.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from nvp3d.inference.skipping import IMAGE_ERRORS, partial_index, skip_or_raise
from nvp3d.inference.writers import write_json

__all__ = ["IMAGE_SUFFIXES", "INDEX_FILENAME", "find_images", "output_name", "read_intrinsic", "run_inference"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
INDEX_FILENAME = "index.json"


class NoImagesError(FileNotFoundError):
    """``inference.images_dir`` holds no image (message says where it looked and how to scan sub-folders)."""


def find_images(images_dir: str | Path, recursive: bool = False) -> list[Path]:
    """Sorted image files of ``images_dir`` (sub-folders too when ``recursive``)."""
    root = Path(images_dir)
    if not str(images_dir):
        raise FileNotFoundError("inference.images_dir is empty: set it to a folder of .jpg/.png images")
    if not root.is_dir():
        raise FileNotFoundError(f"inference.images_dir={images_dir} does not exist or is not a folder")
    pattern = root.rglob("*") if recursive else root.glob("*")
    files = sorted(p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        hint = "" if recursive else " (set inference.recursive: true to also scan sub-folders)"
        raise NoImagesError(f"inference.images_dir={images_dir} contains no .jpg/.jpeg/.png images{hint}")
    return files


def output_name(path: Path, images_dir: Path) -> str:
    """``a/b/img.png`` under ``images_dir`` -> ``a__b__img``."""
    rel = path.relative_to(images_dir).with_suffix("")
    return "__".join(rel.parts)


def read_intrinsic(image: Path) -> tuple[np.ndarray | None, str]:
    """The intrinsic beside ``image`` (module docstring) and where it came from (``"default"`` if none)."""
    for cand in (image.with_suffix(".json"), image.with_name(image.stem + "_intrinsic.json")):
        if cand.is_file():
            try:
                data = json.loads(cand.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"intrinsic file {cand} is not valid JSON ({exc})") from exc
            if isinstance(data, dict) and all(k in data for k in ("fx", "fy", "cx", "cy")):
                k = np.eye(4)
                k[0, 0], k[1, 1], k[0, 2], k[1, 2] = (float(data[n]) for n in ("fx", "fy", "cx", "cy"))
                return k, str(cand)
            if isinstance(data, dict) and "intrinsic" in data:
                return np.asarray(data["intrinsic"], dtype=np.float64), str(cand)
            raise ValueError(f"intrinsic file {cand} needs keys fx, fy, cx, cy or 'intrinsic' (a 3x3/4x4 list)")
    for cand in (image.with_suffix(".npy"), image.with_name(image.stem + "_intrinsic.npy")):
        if cand.is_file():
            try:
                return np.load(cand, allow_pickle=False).astype(np.float64), str(cand)
            except (ValueError, OSError) as exc:
                raise ValueError(f"intrinsic file {cand} cannot be read as a numeric .npy array ({exc})") from exc
    return None, "default"


def _progress(items: list, enable: bool):
    if not enable:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with pytorch-lightning
        return items
    return tqdm(items, desc="inference", unit="image")


def run_inference(spec: Any, results_dir: str | Path, status: Any, *, say=print, enable_progress_bar: bool = True,
                  predictor: Any = None, frustum_masks: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``nvp3d inference`` (module docstring); returns ``{"images", "images_per_second", ...}``.

    ``predictor`` reuses a loaded :class:`nvp3d.predict.Predictor`; ``frustum_masks`` maps an output name to a
    frustum mask to use instead of the analytic one (tests compare against evaluation this way).
    """
    from nvp3d.predict import PredictInputError as _PIE
    from nvp3d.predict import Predictor

    inf = spec.inference
    images_dir = Path(inf.images_dir) if inf.images_dir else Path("")
    files = find_images(inf.images_dir, inf.recursive)
    say(f"inference: found {len(files)} image{'s' if len(files) != 1 else ''} in {images_dir}"
        f"{' (recursive)' if inf.recursive else ''}")
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    if predictor is None:
        predictor = Predictor(spec, inf.checkpoint, mode=inf.mode, say=say)
    entries = []
    skipped: list[dict[str, str]] = []  # unreadable images (dataset.skip_bad)
    t0 = time.perf_counter()
    for path in _progress(files, enable_progress_bar):
        name = output_name(path, images_dir)
        t = time.perf_counter()
        try:
            k, source = read_intrinsic(path)
            try:
                fr = (frustum_masks or {}).get(name)
                rec = predictor(path, k, frustum_mask=fr)
            except _PIE as exc:
                raise ValueError(f"{path}: {exc}") from exc
        except IMAGE_ERRORS as exc:
            try:
                skip_or_raise(spec, path, exc, skipped, say)
            except IMAGE_ERRORS:
                write_json(results / INDEX_FILENAME, partial_index(images_dir, entries, skipped,
                                                                   {"image": str(path), "error": str(exc)}))
                raise
            continue
        outputs = rec.save(results, name)
        entries.append({
            "image": str(path), "name": name, "intrinsic": source,
            "outputs": {kind: Path(p).name for kind, p in outputs.items()},
            "segments": [{"id": int(s), "class_id": int(c), "class": rec.classes.get(c, (str(c), False))[0],
                          "isthing": bool(rec.is_thing[s])} for s, c in rec.mapping.items()],
            "mesh": {"vertices": rec.meta.get("mesh_vertices"), "faces": rec.meta.get("mesh_faces")},
            "seconds": round(time.perf_counter() - t, 4),
        })
    elapsed = time.perf_counter() - t0
    rate = len(files) / elapsed if elapsed > 0 else float("inf")
    g = predictor.geometry
    index = {
        "images_dir": str(images_dir), "recursive": bool(inf.recursive), "mode": predictor.mode,
        "checkpoint": str(inf.checkpoint), "num_images": len(files), "seconds": round(elapsed, 3),
        "images_per_second": round(rate, 4),
        "grid": {"dims": list(g.grid_dims), "voxel_size": g.voxel_size, "depth_range": [g.depth_min, g.depth_max],
                 "truncation": g.truncation, "iso_value": predictor.iso_value},
        "npz_keys": sorted(entries and np.load(results / entries[0]["outputs"]["volumes"]).files or []),
        "images": entries,
        "skipped": skipped,
    }
    write_json(results / INDEX_FILENAME, index)
    say(f"inference: {len(files)} images in {elapsed:.1f} s ({rate:.2f} images/s); outputs in {results} "
        f"(index: {results / INDEX_FILENAME})")
    kpi = {"images": len(files), "images_per_second": round(rate, 4)}
    if skipped:  # dataset.skip_bad: say which, and count only what was reconstructed
        say(f"inference: skipped {len(skipped)} unreadable image(s) (dataset.skip_bad; listed in index.json): "
            + ", ".join(s["image"] for s in skipped))
        kpi.update(images=len(entries), skipped=len(skipped))
    if status is not None:
        status.running("Inference finished.", kpi=kpi)
    return kpi
