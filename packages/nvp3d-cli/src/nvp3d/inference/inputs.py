"""Inputs of inference: images (any Pillow-readable RGB), intrinsics beside them, the images of a folder.

* :func:`load_image` -- ``[H, W, 3]`` uint8 RGB from a path, PIL image, array or ``[3, H, W]`` tensor.
* :func:`as_intrinsic` -- a 3x3 / 4x4 pinhole matrix, checked.
* :func:`find_images`, :func:`output_name`, :func:`read_intrinsic` -- ``inference.images_dir`` and the
  optional per-image intrinsic files (``<stem>.json`` / ``<stem>_intrinsic.json`` with ``fx, fy, cx, cy`` or
  ``intrinsic``, or ``<stem>.npy`` / ``<stem>_intrinsic.npy``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "NoImagesError", "PredictInputError", "as_intrinsic", "find_images", "folder_camera",
           "image_intrinsic", "load_image", "output_name", "read_intrinsic"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class PredictInputError(ValueError):
    """Bad image / intrinsic / checkpoint given to the predictor (the message names it and the fix)."""


def load_image(image: Any) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB from a path, PIL image, array or ``[3, H, W]`` tensor (module docstring)."""
    from datasets3d.image_modes import ImageModeError, to_rgb8
    from PIL import Image

    if isinstance(image, str | os.PathLike):
        p = Path(image)
        if not p.is_file():
            raise FileNotFoundError(f"image {p} does not exist")
        try:
            with Image.open(p) as im:
                return to_rgb8(im, f"image {p}")  # 16-bit scaled, not clipped; unusable modes refused
        except ImageModeError as exc:
            raise PredictInputError(str(exc)) from None
        except OSError as exc:
            raise PredictInputError(f"image {p} cannot be read as an image ({exc})") from exc
    if isinstance(image, Image.Image):
        return to_rgb8(image, "image")
    try:
        import torch

        if isinstance(image, torch.Tensor):
            t = image.detach().cpu()
            if t.dim() != 3 or t.shape[0] != 3:
                raise PredictInputError(f"image tensor must be [3, H, W] RGB in 0..255, got {tuple(t.shape)}")
            image = t.permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).numpy()
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise PredictInputError(f"image array must be [H, W, 3] RGB, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return arr


def as_intrinsic(k: Any, what: str) -> np.ndarray:
    m = np.asarray(k, dtype=np.float64)
    if m.size == 16:
        m = m.reshape(4, 4)
    elif m.size == 9:
        m4 = np.eye(4)
        m4[:3, :3] = m.reshape(3, 3)
        m = m4
    else:
        raise PredictInputError(f"{what}: an intrinsic must be 3x3 or 4x4 (9 or 16 numbers), got shape {m.shape}")
    if not (m[0, 0] > 0 and m[1, 1] > 0 and np.isfinite(m).all()):
        raise PredictInputError(f"{what}: intrinsic needs positive fx, fy and finite values, got {m[:3, :3].tolist()}")
    return m


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


CAMERA_FILENAME = "camera.json"


def _camera_file(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    """(K 4x4, (W, H)) of a camera file in the dataset format: ``{"intrinsic": [fx, fy, cx, cy],
    "image_size": [W, H]}`` (what ``datasets3d.synth`` writes as ``meta/camera.json``)."""
    try:
        data = json.loads(path.read_text())
        fx, fy, cx, cy = (float(v) for v in data["intrinsic"])
        w, h = (int(v) for v in data["image_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"camera file {path} needs 'intrinsic': [fx, fy, cx, cy] and 'image_size': [W, H] "
                         f"({type(exc).__name__}: {exc})") from exc
    k = np.eye(4)
    k[0, 0], k[1, 1], k[0, 2], k[1, 2] = fx, fy, cx, cy
    return as_intrinsic(k, str(path)), (w, h)


def folder_camera(images_dir: str | Path, intrinsic: list[float] | None = None
                  ) -> tuple[np.ndarray, tuple[int, int], str] | None:
    """The camera of a whole folder of images, or None (then the 3D-FRONT default applies).

    In order: ``inference.intrinsic`` ([fx, fy, cx, cy, width, height]); ``<images_dir>/camera.json``; the
    dataset's ``meta/camera.json`` when ``images_dir`` is a dataset's ``data`` folder (or a scene folder in it).
    Returns (K 4x4, (W, H) the intrinsic is given for, where it came from).
    """
    if intrinsic:
        fx, fy, cx, cy, w, h = intrinsic
        k = np.eye(4)
        k[0, 0], k[1, 1], k[0, 2], k[1, 2] = fx, fy, cx, cy
        return as_intrinsic(k, "inference.intrinsic"), (int(w), int(h)), "inference.intrinsic"
    root = Path(images_dir)
    for cand in (root / CAMERA_FILENAME, root.parent / "meta" / CAMERA_FILENAME,
                 root.parent.parent / "meta" / CAMERA_FILENAME):
        if cand.is_file():
            k, size = _camera_file(cand)
            return k, size, str(cand)
    return None


def image_intrinsic(image: Path, camera: tuple[np.ndarray, tuple[int, int], str] | None
                    ) -> tuple[np.ndarray | None, str]:
    """The intrinsic of ``image`` at its own pixel size: a file beside it (:func:`read_intrinsic`) first, else
    the folder's ``camera`` rescaled from its image size, else (None, ``"default"``)."""
    k, source = read_intrinsic(image)
    if k is not None or camera is None:
        return k, source
    from frustum3d import geometry as G
    from PIL import Image

    k_folder, size, source = camera
    with Image.open(image) as im:
        own = im.size
    if tuple(own) == tuple(size):
        return k_folder, source
    return G.rescale_intrinsic(k_folder, tuple(size), tuple(own)).numpy().astype(np.float64), source
