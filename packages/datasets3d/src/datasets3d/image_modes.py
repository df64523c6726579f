"""Any decoded image to the ``[H, W, 3]`` uint8 RGB the networks take, scaling instead of clipping.

``PIL.Image.convert("RGB")`` clips 16-bit greyscale (mode ``I;16``/``I``) to 255, so a 16-bit PNG became an
all-white image. :func:`to_rgb8` scales 16-bit values by 255/65535 (32-bit integer images whose values fit in
8 or 16 bits likewise), converts greyscale, palette, RGBA/LA (alpha dropped) and CMYK with Pillow's
conversions, and refuses what has no meaningful 8-bit RGB (float images, 32-bit values beyond 16 bits) with one
line naming the file.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageModeError(ValueError):
    """An image whose pixel format cannot be turned into 8-bit RGB (message names the file and the fix)."""


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    g = np.clip(np.round(grey), 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def to_rgb8(img: Image.Image, source: str) -> np.ndarray:
    """``img`` as contiguous ``[H, W, 3]`` uint8 RGB; :class:`ImageModeError` naming ``source`` when impossible."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img)
    if mode in SIXTEEN_BIT_MODES:
        return _grey_to_rgb(np.asarray(img).astype(np.float64) * (255.0 / 65535.0))
    if mode == "I":
        arr = np.asarray(img).astype(np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0 or hi > 65535:
            raise ImageModeError(f"{source} is a 32-bit integer image with values {lo:g}..{hi:g} (beyond 16 bits): "
                                 "save it as an 8- or 16-bit PNG or a JPEG")
        return _grey_to_rgb(arr if hi <= 255 else arr * (255.0 / 65535.0))
    if mode == "F":
        raise ImageModeError(f"{source} is a floating-point image (mode F): save it as an 8- or 16-bit PNG or a JPEG")
    try:
        return np.asarray(img.convert("RGB"))
    except (ValueError, OSError) as exc:
        raise ImageModeError(f"{source} has pixel mode {mode} that cannot be converted to RGB ({exc}): save it "
                             "as an 8-bit RGB PNG or a JPEG") from None


def check_rgb_matches_labels(rgb: np.ndarray, label_shape: tuple[int, ...], key: str, rgb_path: object,
                             label_path: object) -> None:
    """Refuse an RGB image whose size differs from its (pixel-aligned) labels.

    Samples resize the image and the labels to ``target_size`` independently, so a mismatched pair trained
    silently on misaligned targets. Raises :class:`~datasets3d.errors.DatasetFormatError` (skipped with
    ``skip_bad``) naming both files and sizes.
    """
    from .errors import DatasetFormatError

    if tuple(rgb.shape[:2]) != tuple(label_shape[:2]):
        raise DatasetFormatError(
            f"frame {key}: rgb {rgb_path} is {rgb.shape[1]}x{rgb.shape[0]} (WxH) but its labels {label_path} are "
            f"{label_shape[1]}x{label_shape[0]}; they must be pixel aligned: resize the image to the labels' size "
            "or fix the frame")
