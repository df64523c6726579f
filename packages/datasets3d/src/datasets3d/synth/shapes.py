"""Primitives of the procedural scenes: oriented boxes (zero thickness = rectangles) and capped cylinders.

Each primitive knows its signed distance (for voxelising surfaces) and its ray intersection (for
rendering), both computed in the primitive's local frame: ``local = R^T (p - center)``; a cylinder's
axis is the local y axis. The same primitive list drives rendering and voxelisation, so 2D and 3D agree
by construction up to sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

BOX, CYLINDER = "box", "cylinder"
_EPS = 1e-6


@dataclass(frozen=True)
class Primitive:
    """One surface piece in some frame (room or camera). ``half`` = box half extents, or (r, half_height, r)."""

    kind: str
    center: np.ndarray  # (3,)
    rotation: np.ndarray  # (3,3), columns are the local axes expressed in the frame
    half: np.ndarray  # (3,)
    semantic: int
    instance: int  # 3D instance id (0 for stuff)
    instance_2d: int  # 2D instance id (stuff has one too, as in the released segmaps)
    color: np.ndarray  # (3,) albedo in 0..1
    texture: str = "solid"  # solid | checker | stripes | noise
    texture_scale: float = 0.25

    def transformed(self, rotation: np.ndarray, translation: np.ndarray) -> Primitive:
        """The primitive under ``p -> rotation @ p + translation``."""
        return replace(self, center=rotation @ self.center + translation, rotation=rotation @ self.rotation)

    def to_local(self, points: np.ndarray) -> np.ndarray:
        return (points - self.center) @ self.rotation

    def sdf(self, points: np.ndarray) -> np.ndarray:
        """Signed distance (metres) of points (N,3); negative inside (rectangles: never negative)."""
        q = self.to_local(points)
        if self.kind == BOX:
            d = np.abs(q) - self.half
        else:
            radial = np.sqrt(q[:, 0] ** 2 + q[:, 2] ** 2) - self.half[0]
            d = np.stack([radial, np.abs(q[:, 1]) - self.half[1]], axis=1)
        outside = np.sqrt((np.maximum(d, 0.0) ** 2).sum(axis=1))
        inside = np.minimum(d.max(axis=1), 0.0)
        return outside + inside

    def aabb(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounding box (min, max) in the primitive's frame."""
        ext = np.abs(self.rotation) @ self.half  # exact for boxes, conservative for cylinders
        return self.center - ext, self.center + ext

    def intersect(self, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """First hit of rays from the frame origin along ``dirs`` (N,3).

        Returns (t, normal (N,3) in the frame, local hit point (N,3)); t = inf where missed. With ray
        directions whose z component is 1 (camera frame), t is the z-depth of the hit.
        """
        o = -self.center @ self.rotation  # origin in local frame
        d = dirs @ self.rotation
        if self.kind == BOX:
            t, n_local = _ray_box(o, d, self.half)
        else:
            t, n_local = _ray_cylinder(o, d, self.half[0], self.half[1])
        local = o + d * np.where(np.isfinite(t), t, 0.0)[:, None]
        return t, n_local @ self.rotation.T, local


def _ray_box(o: np.ndarray, d: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / np.where(np.abs(d) < 1e-12, 1e-12, d)
        t1 = (-h - o) * inv
        t2 = (h - o) * inv
    tnear = np.minimum(t1, t2)
    tfar = np.maximum(t1, t2)
    t_in = tnear.max(axis=1)
    t_out = tfar.min(axis=1)
    hit = (t_out >= t_in - 1e-9) & (t_in > _EPS)
    t = np.where(hit, t_in, np.inf)
    axis = tnear.argmax(axis=1)
    n = np.zeros_like(d)
    rows = np.arange(len(d))
    n[rows, axis] = -np.sign(d[rows, axis])
    return t, n


def _ray_cylinder(o: np.ndarray, d: np.ndarray, r: float, hh: float) -> tuple[np.ndarray, np.ndarray]:
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = 2.0 * (o[0] * d[:, 0] + o[2] * d[:, 2])
    c = o[0] ** 2 + o[2] ** 2 - r * r
    disc = b * b - 4 * a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2 * a)
        y_side = o[1] + t_side * d[:, 1]
        ok_side = (disc >= 0) & (a > 1e-12) & (t_side > _EPS) & (np.abs(y_side) <= hh)
        t_side = np.where(ok_side, t_side, np.inf)
        best_t, best_cap = t_side, np.zeros(len(d))
        for s in (-1.0, 1.0):
            tc = (s * hh - o[1]) / np.where(np.abs(d[:, 1]) < 1e-12, 1e-12, d[:, 1])
            px, pz = o[0] + tc * d[:, 0], o[2] + tc * d[:, 2]
            ok = (tc > _EPS) & (px * px + pz * pz <= r * r)
            tc = np.where(ok, tc, np.inf)
            better = tc < best_t
            best_t = np.where(better, tc, best_t)
            best_cap = np.where(better, s, best_cap)
    p = o + d * np.where(np.isfinite(best_t), best_t, 0.0)[:, None]
    n = np.stack([p[:, 0], np.zeros(len(d)), p[:, 2]], axis=1)
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    cap = best_cap != 0
    n[cap] = 0.0
    n[cap, 1] = best_cap[cap]
    return best_t, n


def yaw_rotation(angle: float) -> np.ndarray:
    """Rotation about the vertical (y, pointing down) axis; forward (0,0,1) -> (sin a, 0, cos a)."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def pitch_rotation(angle: float) -> np.ndarray:
    """Rotation about the x axis; positive angles tilt the forward axis up (towards -y)."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
