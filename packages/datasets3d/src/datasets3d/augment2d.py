"""Image-plane augmentations on the sample's 2D arrays at their final resolution (``Planar``).

Order (as the toolkit): resize of the shorter edge (``train_min_size`` / ``train_max_size``) -> crop
(``enable_crop``) -> flip -> SSD colour jitter. Every 2D target (masks, mean depths, ...) is derived from
the augmented maps afterwards, so they follow automatically. Intrinsics are updated with each geometric
step, in the pixel convention of ``frustum3d.geometry`` (pixel centres at integer u, v):

* flip: ``u' = W - 1 - u``, i.e. ``cx' = W - 1 - cx`` (the camera is mirrored, ``x' = -x``);
* crop at (x0, y0): ``cx' = cx - x0``, ``cy' = cy - y0``;
* resize by s: ``fx' = s fx``, ``cx' = (cx + 0.5) s - 0.5`` (half-pixel centres, which is how PIL and
  :func:`datasets3d.targets2d.resize_nearest` sample the resized image).

After a resize or crop the reduced plane (``intrinsic_reduced``, ``depth_reduced``, ``room_mask_reduced``)
is rebuilt from the augmented full-resolution maps at sizes scaled like the image.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .augment import CROP_TRIES, STREAM_COLOR, STREAM_CROP, STREAM_SCALE, AugmentPlan
from .targets2d import resize_nearest


@dataclass
class Planar:
    """The 2D arrays of a sample before they become tensors (H, W = image size; h_d, w_d = depth_size)."""

    rgb: np.ndarray  # uint8 [H, W, 3] (float32 0..255 after colour jitter)
    depth: np.ndarray  # float32 [H, W]
    semantic: np.ndarray  # int [H, W] train ids, 0 = void
    instance: np.ndarray  # int [H, W]
    room: np.ndarray  # bool [H, W]
    depth_reduced: np.ndarray  # float32 [h_d, w_d]
    room_reduced: np.ndarray  # bool [h_d, w_d]
    k_target: torch.Tensor  # float64 [4, 4] at (W, H)
    k_reduced: torch.Tensor  # float64 [4, 4] at reduced_size
    reduced_size: tuple[int, int]  # (w, h) of intrinsic_reduced

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) of the image."""
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])


# --------------------------------------------------------------------------- intrinsics
def mirror_intrinsic(k: torch.Tensor | np.ndarray, size_wh: tuple[int, int], axis: int) -> torch.Tensor:
    """Intrinsic of the image mirrored on ``axis`` (0: u' = W-1-u, 1: v' = H-1-v), camera mirrored with it.

    ``K' = F_img K F_cam``: the principal point is reflected and any skew term changes sign.
    """
    k = torch.as_tensor(np.asarray(k), dtype=torch.float64).clone()
    k[axis, :] = -k[axis, :]  # image mirror: u' = (W-1) - u
    k[axis, 2] += float(size_wh[axis] - 1) * k[2, 2]
    k[:, axis] = -k[:, axis]  # camera mirror: x' = -x
    return k


def crop_intrinsic(k: torch.Tensor, x0: int, y0: int) -> torch.Tensor:
    k = k.clone()
    k[0, 2] -= x0
    k[1, 2] -= y0
    return k


def resize_intrinsic(k: torch.Tensor, from_wh: tuple[int, int], to_wh: tuple[int, int]) -> torch.Tensor:
    """Half-pixel-centre rescale (the convention of the image resampling used here)."""
    k = k.clone()
    sx, sy = to_wh[0] / from_wh[0], to_wh[1] / from_wh[1]
    k[0, 0], k[0, 1], k[1, 1] = k[0, 0] * sx, k[0, 1] * sx, k[1, 1] * sy
    k[0, 2] = (k[0, 2] + 0.5) * sx - 0.5
    k[1, 2] = (k[1, 2] + 0.5) * sy - 0.5
    return k


# --------------------------------------------------------------------------- geometric steps
def flip_planar(p: Planar, axis: int) -> Planar:
    """Mirror every map (``axis`` 0 = left/right, 1 = up/down) and both intrinsics. Exactly its own inverse
    on the maps; the intrinsics round-trip to within float64 rounding of ``W - 1 - cx``."""
    a = 1 - axis  # numpy axis of the image width (1) or height (0)
    return replace(
        p,
        rgb=np.flip(p.rgb, a), depth=np.flip(p.depth, a), semantic=np.flip(p.semantic, a),
        instance=np.flip(p.instance, a), room=np.flip(p.room, a), depth_reduced=np.flip(p.depth_reduced, a),
        room_reduced=np.flip(p.room_reduced, a),
        k_target=mirror_intrinsic(p.k_target, p.size, axis),
        k_reduced=mirror_intrinsic(p.k_reduced, p.reduced_size, axis),
    )


def _rebuild_reduced(p: Planar, base_wh: tuple[int, int], reduced_wh: tuple[int, int],
                     depth_hw: tuple[int, int]) -> Planar:
    """Reduced plane of an image that was resized/cropped from ``base_wh``: sizes scale with the image."""
    from frustum3d.geometry import rescale_intrinsic

    w, h = p.size
    rw = max(1, round(reduced_wh[0] * w / base_wh[0]))
    rh = max(1, round(reduced_wh[1] * h / base_wh[1]))
    dh = max(1, round(depth_hw[0] * h / base_wh[1]))
    dw = max(1, round(depth_hw[1] * w / base_wh[0]))
    return replace(
        p, depth_reduced=resize_nearest(p.depth, (dw, dh)), room_reduced=resize_nearest(p.room, (dw, dh)),
        k_reduced=rescale_intrinsic(p.k_target, (w, h), (rw, rh)), reduced_size=(rw, rh),
    )


def scaled_size(size_wh: tuple[int, int], short: int, max_size: int) -> tuple[int, int]:
    """(W, H) with the shorter edge at ``short`` and, when ``max_size`` > 0, the longer edge at most
    ``max_size`` (the aspect ratio is kept; sizes are rounded to the nearest pixel)."""
    w, h = size_wh
    scale = short / min(w, h)
    if max_size > 0 and max(w, h) * scale > max_size:
        scale = max_size / max(w, h)
    return max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))


def resize_planar(p: Planar, to_wh: tuple[int, int]) -> Planar:
    """RGB bilinear, maps nearest; the intrinsic follows (half-pixel centres)."""
    from PIL import Image

    if to_wh == p.size:
        return p
    rgb = np.asarray(Image.fromarray(np.ascontiguousarray(p.rgb)).resize(to_wh, Image.BILINEAR))
    return replace(
        p, rgb=rgb, depth=resize_nearest(p.depth, to_wh), semantic=resize_nearest(p.semantic, to_wh),
        instance=resize_nearest(p.instance, to_wh), room=resize_nearest(p.room, to_wh),
        k_target=resize_intrinsic(p.k_target, p.size, to_wh),
    )


def crop_planar(p: Planar, x0: int, y0: int, w: int, h: int) -> Planar:
    sl = (slice(y0, y0 + h), slice(x0, x0 + w))
    return replace(p, rgb=p.rgb[sl], depth=p.depth[sl], semantic=p.semantic[sl], instance=p.instance[sl],
                   room=p.room[sl], k_target=crop_intrinsic(p.k_target, x0, y0))


def draw_crop(rng: np.random.Generator, semantic: np.ndarray, crop_hw: tuple[int, int],
              max_area: float) -> tuple[int, int, int, int]:
    """(x0, y0, w, h) of a random crop of size ``crop_hw`` (clamped to the image). With ``max_area`` < 1,
    up to :data:`CROP_TRIES` positions are tried for one in which no single labelled class covers
    ``max_area`` or more of the labelled pixels; the last try is kept when none qualifies."""
    h_img, w_img = semantic.shape
    ch, cw = min(crop_hw[0], h_img), min(crop_hw[1], w_img)
    for _ in range(CROP_TRIES if max_area < 1.0 else 1):
        y0 = int(rng.integers(0, h_img - ch + 1))
        x0 = int(rng.integers(0, w_img - cw + 1))
        if max_area >= 1.0:
            break
        counts = np.bincount(semantic[y0:y0 + ch, x0:x0 + cw].ravel())[1:]  # 0 = void is not a class
        if counts.sum() == 0 or counts.max() < max_area * counts.sum():
            break
    return x0, y0, cw, ch


# --------------------------------------------------------------------------- colour
@dataclass(frozen=True)
class ColorJitter:
    """One draw of the SSD photometric distortion; None = that step is skipped."""

    brightness: float | None  # added to all channels, in 0..255 units
    contrast: float | None  # all channels multiplied
    saturation: float | None  # HSV saturation multiplied
    hue: float | None  # HSV hue shifted, in degrees
    contrast_last: bool  # contrast after (True) or before (False) the HSV steps

    @classmethod
    def draw(cls, rng: np.random.Generator) -> ColorJitter:
        """Each step happens with probability 1/2: brightness +-32, contrast and saturation x[0.5, 1.5],
        hue +-36 degrees (18 in OpenCV's 0..180 hue units)."""
        def maybe(lo: float, hi: float) -> float | None:
            on = rng.random() < 0.5
            value = float(rng.uniform(lo, hi))  # always drawn: the stream position does not depend on `on`
            return value if on else None

        return cls(maybe(-32.0, 32.0), maybe(0.5, 1.5), maybe(0.5, 1.5), maybe(-36.0, 36.0), bool(rng.random() < 0.5))

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """float32 [H, W, 3] in 0..255, clipped after every step."""
        img = rgb.astype(np.float32, copy=True)
        if self.brightness is not None:
            np.clip(img + self.brightness, 0.0, 255.0, out=img)
        if self.contrast is not None and not self.contrast_last:
            np.clip(img * self.contrast, 0.0, 255.0, out=img)
        if self.saturation is not None or self.hue is not None:
            hsv = rgb_to_hsv(img / 255.0)
            if self.saturation is not None:
                hsv[..., 1] = np.clip(hsv[..., 1] * self.saturation, 0.0, 1.0)
            if self.hue is not None:
                hsv[..., 0] = np.mod(hsv[..., 0] + self.hue, 360.0)
            img = np.clip(hsv_to_rgb(hsv) * 255.0, 0.0, 255.0).astype(np.float32)
        if self.contrast is not None and self.contrast_last:
            np.clip(img * self.contrast, 0.0, 255.0, out=img)
        return img

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] RGB in [0, 1] -> HSV with hue in degrees [0, 360), saturation and value in [0, 1]."""
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    safe = np.where(chroma > 0, chroma, 1.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.where(mx == r, np.mod((g - b) / safe, 6.0), np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = np.where(chroma > 0, hue * 60.0, 0.0)
    sat = np.where(mx > 0, chroma / np.where(mx > 0, mx, 1.0), 0.0)
    return np.stack([hue, sat, mx], -1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv[..., 0] / 60.0, hsv[..., 1], hsv[..., 2]

    def channel(n: float) -> np.ndarray:
        k = np.mod(n + h, 6.0)
        return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)

    return np.stack([channel(5.0), channel(3.0), channel(1.0)], -1)


# --------------------------------------------------------------------------- the 2D pipeline
def augment_planar(p: Planar, plan: AugmentPlan, cfg, record: dict) -> Planar:
    """Apply the plan's image-plane steps in the toolkit's order; what was done is added to ``record``."""
    base_wh, geometric = p.size, False
    if cfg.train_min_size:
        short = int(plan.rng(STREAM_SCALE, by_group=True).choice(np.asarray(cfg.train_min_size)))
        to_wh = scaled_size(p.size, short, int(cfg.train_max_size))
        record["resize"] = to_wh
        if to_wh != p.size:
            p, geometric = resize_planar(p, to_wh), True
    if cfg.enable_crop:
        x0, y0, w, h = draw_crop(plan.rng(STREAM_CROP), p.semantic, tuple(cfg.crop_size),
                                 float(cfg.single_category_max_area))
        record["crop"] = (x0, y0, w, h)
        if (w, h) != p.size:
            p, geometric = crop_planar(p, x0, y0, w, h), True
    if geometric:
        p = _rebuild_reduced(p, base_wh, p.reduced_size, p.depth_reduced.shape)
    if plan.flip_axis is not None:
        p = flip_planar(p, plan.flip_axis)
    if cfg.color_aug_ssd:
        jitter = ColorJitter.draw(plan.rng(STREAM_COLOR))
        record["color"] = jitter.as_dict()
        p = replace(p, rgb=jitter.apply(p.rgb))
    record["image_size"], record["reduced_size"] = p.size, p.reduced_size
    record["depth_size"] = tuple(p.depth_reduced.shape)
    return p
