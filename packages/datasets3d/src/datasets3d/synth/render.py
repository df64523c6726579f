"""Ray-cast renderer: RGB with textures and lighting, metric z-depth, and the 2D semantic/instance segmap.

Pixel (u, v) is the ray through ``((u - cx)/fx, (v - cy)/fy, 1)`` (pixel centres at integer u, v, the
convention of the intrinsic), so the ray parameter of a hit is its z-depth directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shapes import Primitive


@dataclass
class Rendering:
    rgb: np.ndarray  # uint8 (H, W, 3)
    depth: np.ndarray  # float32 (H, W) z-depth in metres, 0 where no surface was hit
    semantic: np.ndarray  # uint32 (H, W), 0 = void
    instance: np.ndarray  # uint32 (H, W), 2D instance id, 0 = none
    hit: np.ndarray  # int32 (H, W) index of the primitive seen, -1 for none


def pixel_rays(fx: float, fy: float, cx: float, cy: float, width: int, height: int) -> np.ndarray:
    """Ray directions (H*W, 3) with z = 1, row-major over (v, u)."""
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    return np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], axis=-1).reshape(-1, 3)


def _hash_noise(cells: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic value noise in [0, 1) per integer cell (N,3)."""
    c = cells.astype(np.int64)
    h = (c[:, 0] * 73856093) ^ (c[:, 1] * 19349663) ^ (c[:, 2] * 83492791) ^ (seed * 2654435761)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFF).astype(np.float64) / 65536.0


def _texture(prim: Primitive, local: np.ndarray, seed: int) -> np.ndarray:
    """Albedo modulation factor (N,) for hit points given in the primitive's local frame."""
    s = prim.texture_scale
    if prim.texture == "checker":
        cells = np.floor(local / s).astype(np.int64).sum(axis=1)
        return np.where(cells % 2 == 0, 1.0, 0.7)
    if prim.texture == "stripes":
        return 0.85 + 0.15 * np.sin(2 * np.pi * (local[:, 0] + 0.3 * local[:, 2]) / s)
    if prim.texture == "noise":
        return 0.8 + 0.2 * _hash_noise(np.floor(local / (s * 0.25)), seed)
    return np.ones(len(local))


def _candidate_pixels(prim: Primitive, intrinsic, w: int, h: int) -> np.ndarray | None:
    """Flat indices of the pixels whose rays can hit ``prim`` (its projected bounding box), None = all."""
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    corners = prim.center + (signs * prim.half) @ prim.rotation.T
    if prim.kind != "box":  # a cylinder's box: radius along local x and z
        corners = prim.center + (signs * np.array([prim.half[0], prim.half[1], prim.half[0]])) @ prim.rotation.T
    z = corners[:, 2]
    if (z <= 1e-6).all():
        return np.zeros(0, dtype=np.int64)
    if (z <= 1e-3).any():
        return None
    fx, fy, cx, cy = intrinsic
    u = corners[:, 0] * fx / z + cx
    v = corners[:, 1] * fy / z + cy
    u0, u1 = max(0, int(np.floor(u.min())) - 1), min(w - 1, int(np.ceil(u.max())) + 1)
    v0, v1 = max(0, int(np.floor(v.min())) - 1), min(h - 1, int(np.ceil(v.max())) + 1)
    if u1 < u0 or v1 < v0:
        return np.zeros(0, dtype=np.int64)
    vv, uu = np.mgrid[v0 : v1 + 1, u0 : u1 + 1]
    return (vv * w + uu).ravel()


def render(
    primitives: list[Primitive],
    intrinsic: tuple[float, float, float, float],
    image_size: tuple[int, int],
    light_dir: np.ndarray,
    rng: np.random.Generator | None = None,
    shade: bool = True,
) -> Rendering:
    """Render camera-frame primitives. ``light_dir`` points from surfaces towards the light (camera frame)."""
    w, h = image_size
    dirs = pixel_rays(*intrinsic, w, h)
    n = len(dirs)
    best_t = np.full(n, np.inf)
    best_i = np.full(n, -1, dtype=np.int64)
    normals = np.zeros((n, 3))
    locals_ = np.zeros((n, 3))
    for i, prim in enumerate(primitives):
        rows = _candidate_pixels(prim, intrinsic, w, h)
        if rows is not None and rows.size == 0:
            continue
        sub = dirs if rows is None else dirs[rows]
        t, nrm, loc = prim.intersect(sub)
        better = t < (best_t if rows is None else best_t[rows])
        if not better.any():
            continue
        idx = np.flatnonzero(better) if rows is None else rows[better]
        best_t[idx] = t[better]
        best_i[idx] = i
        normals[idx] = nrm[better]
        locals_[idx] = loc[better]
    hit = best_i >= 0
    depth = np.where(hit, best_t, 0.0).astype(np.float32)
    semantic = np.zeros(n, dtype=np.uint32)
    instance = np.zeros(n, dtype=np.uint32)
    lut_sem = np.array([p.semantic for p in primitives] + [0], dtype=np.uint32)
    lut_ins = np.array([p.instance_2d for p in primitives] + [0], dtype=np.uint32)
    semantic[:] = lut_sem[best_i]
    instance[:] = lut_ins[best_i]
    rgb = np.zeros((n, 3))
    if shade:
        albedo = np.zeros((n, 3))
        for i, prim in enumerate(primitives):
            sel = best_i == i
            if sel.any():
                albedo[sel] = prim.color[None, :] * _texture(prim, locals_[sel], i)[:, None]
        # two-sided Lambert: orient normals towards the camera
        facing = np.where((normals * dirs).sum(axis=1, keepdims=True) > 0, -normals, normals)
        ld = light_dir / np.linalg.norm(light_dir)
        lambert = np.clip(facing @ ld, 0.0, 1.0)
        # head light term keeps surfaces facing the camera readable, mild falloff with distance
        view = np.clip(-(facing * (dirs / np.linalg.norm(dirs, axis=1, keepdims=True))).sum(axis=1), 0.0, 1.0)
        falloff = 1.0 / (1.0 + 0.04 * np.where(hit, best_t, 0.0) ** 2)
        light = (0.25 + 0.45 * lambert + 0.3 * view) * (0.6 + 0.4 * falloff)
        rgb = albedo * light[:, None] * 255.0
        if rng is not None:
            rgb += rng.normal(0.0, 2.0, size=rgb.shape)
        rgb[~hit] = (30.0, 30.0, 35.0)
    return Rendering(
        rgb=np.clip(rgb, 0, 255).astype(np.uint8).reshape(h, w, 3),
        depth=depth.reshape(h, w),
        semantic=semantic.reshape(h, w),
        instance=instance.reshape(h, w),
        hit=best_i.reshape(h, w).astype(np.int32),
    )
