"""Model keys the dataset defines, read from the dataset unless the spec sets them.

A dataset fixes its voxel grid: the side of the geometry volumes and the metres per voxel. Writing them into
every spec (``model.frustum3d.grid_dimensions``/``frustum_dims``, ``model.projection.voxel_size``) is busy
work and a source of silent mismatches, so nvp3d reads them from the dataset folder:

* ``meta/camera.json`` (written by ``datasets3d.synth``): ``grid`` [X, Y, Z] and ``voxel_size``;
* otherwise the shape of the frustum mask (``dataset.frustum_mask_path``, default ``meta/frustum_mask.npz``),
  read from the ``.npy`` header inside the archive without loading the array.

A key the spec sets keeps its value when it agrees; a different value is a :class:`~nvp3d.errors.SpecError`
naming both values and the file. Keys nobody sets keep the toolkit defaults (256^3, 0.03 m). Remote roots
(``s3://...``) are read through :func:`datasets3d.resolve_dataset_path` (one small file each).
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from nvp3d.config.sources import fill_unset
from nvp3d.errors import SpecError

__all__ = ["DATA_SPLIT_OF_ACTION", "apply_data_defaults", "dataset_geometry"]

#: which split's dataset defines the grid for each action (export and gen_trt_engine read no dataset)
DATA_SPLIT_OF_ACTION: dict[str, str] = {"train": "train", "evaluate": "test", "inference": "test"}


def _join(root: str, rel: str) -> str:
    """``rel`` below ``root`` (a folder path or a URL), or ``rel`` itself when it is absolute or a URL."""
    from datasets3d import is_remote

    if is_remote(rel) or Path(rel).is_absolute():
        return rel
    return root.rstrip("/") + "/" + rel if is_remote(root) else str(Path(root) / rel)


def _local_file(location: str) -> Path | None:
    """A local path for ``location`` (mirrored first when it is a URL); None when it cannot be had."""
    from datasets3d import is_remote, resolve_dataset_path

    if not is_remote(location):
        path = Path(location)
        return path if path.is_file() else None
    try:
        path = Path(resolve_dataset_path(location))
    except Exception:  # noqa: BLE001 - a missing optional file: the dataset reader reports real access problems
        return None
    return path if path.is_file() else None


def _npz_shape(path: Path, key: str = "mask") -> tuple[int, ...] | None:
    """Shape of array ``key`` (else the first) of an ``.npz`` file, from its header only."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            name = f"{key}.npy" if f"{key}.npy" in names else (names[0] if names else None)
            if name is None:
                return None
            with archive.open(name) as handle:
                version = np.lib.format.read_magic(handle)
                reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)
                shape, _, _ = reader(handle)
                return tuple(int(v) for v in shape)
    except (OSError, zipfile.BadZipFile, ValueError):
        return None


def dataset_geometry(spec: Any, split: str) -> dict[str, tuple[Any, str]]:
    """``"section.key"`` (below ``model``) -> (value, file it came from) for what the split's dataset defines."""
    ds = spec.dataset
    root = getattr(ds, split).base_dir
    if not root:
        return {}
    found: dict[str, tuple[Any, str]] = {}
    camera_at = _join(root, "meta/camera.json")
    camera = _local_file(camera_at)
    if camera is not None:
        try:
            meta = json.loads(camera.read_text())
        except (OSError, ValueError):
            meta = {}
        if isinstance(meta, dict):
            if isinstance(meta.get("voxel_size"), int | float) and meta["voxel_size"] > 0:
                found["projection.voxel_size"] = (float(meta["voxel_size"]), camera_at)
            grid = meta.get("grid")
            if isinstance(grid, list) and grid and len(set(grid)) == 1:
                found["frustum3d.grid_dimensions"] = (int(grid[0]), camera_at)
                found["frustum3d.frustum_dims"] = (int(grid[0]), camera_at)
    if "frustum3d.grid_dimensions" not in found and ds.frustum_mask_path:
        rel = ds.frustum_mask_path
        # the toolkit reads a relative mask path against the working directory; datasets3d against base_dir
        candidates = [rel] if Path(rel).is_absolute() or Path(rel).is_file() else [_join(root, rel)]
        for location in candidates:
            path = _local_file(location)
            shape = _npz_shape(path) if path is not None else None
            if shape and len(shape) == 3 and len(set(shape)) == 1:
                found["frustum3d.grid_dimensions"] = (int(shape[0]), location)
                found["frustum3d.frustum_dims"] = (int(shape[0]), location)
                break
    return found


def _same(a: Any, b: Any) -> bool:
    """Equal, with floats compared to 1e-6 (a voxel size computed as 0.03 * 256 / 32 may differ in its last bit)."""
    if isinstance(a, float | int) and isinstance(b, float | int):
        return math.isclose(float(a), float(b), rel_tol=1e-6)
    return a == b


def apply_data_defaults(spec: Any, action: str, *, recorded: dict[str, str] | None = None
                        ) -> dict[str, tuple[Any, str]]:
    """Fill the model keys the action's dataset defines into ``spec`` (keys the spec leaves unset only).

    ``recorded`` maps keys (``"section.key"`` below ``model``) a checkpoint already decided to that
    checkpoint's name: those must equal the data's value instead of taking it. A key the spec sets must
    agree too; either disagreement is one :class:`SpecError` line naming both values. Returns what the data
    defined (``"section.key"`` -> (value, file)).
    """
    split = DATA_SPLIT_OF_ACTION.get(action)
    if split is None:
        return {}
    recorded = recorded or {}
    found = dataset_geometry(spec, split)
    for key, (value, where) in found.items():
        section_name, name = key.split(".")
        section = getattr(spec.model, section_name)
        current = getattr(section, name)
        if section_name == "frustum3d" and not spec.dataset.enable_3d and (
                name in section.model_fields_set or key in recorded):
            continue  # the 2D stage does not use the grid side: an old experiment.yaml's 256 stays harmless
        if name in section.model_fields_set:
            if not _same(current, value):
                raise SpecError(f"model.{key}={current} differs from {value} of the dataset ({where}): remove the "
                                "key (the dataset sets it) or point the spec at data with that grid")
        elif key in recorded:
            if not _same(current, value):
                raise SpecError(f"model.{key}={current} recorded in {recorded[key]} differs from {value} of the "
                                f"dataset ({where}): use data with the checkpoint's grid, or train on this data")
        else:
            fill_unset(spec.model, key, value)
    return found
