"""Procedural rooms: a floor, four walls, an optional ceiling and furniture of the nine thing classes.

Room frame: metres, x and z horizontal, y pointing *down* (same handedness as the camera), floor surface
at y = 0, so heights above the floor are negative y. Walls, floor and ceiling are zero-thickness
rectangles (only the inner surfaces exist, as in the processed 3D-FRONT data where outer wall meshes were
removed). Furniture is built from boxes and cylinders, each piece carrying the object's class and
instance id so that all parts of a chair form one instance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .shapes import BOX, CYLINDER, Primitive, yaw_rotation

WALL, FLOOR, CEILING = 10, 11, 12
THING_NAMES = {1: "cabinet", 2: "bed", 3: "chair", 4: "sofa", 5: "table", 6: "desk", 7: "dresser", 8: "lamp",
               9: "other"}
# relative frequency of thing classes in a room
_CLASS_WEIGHTS = np.array([1.0, 0.6, 1.6, 0.8, 1.2, 0.7, 0.8, 0.9, 1.2])
_TEXTURES = ("solid", "checker", "stripes", "noise")


@dataclass
class Room:
    size: tuple[float, float, float]  # (Lx, height, Lz)
    primitives: list[Primitive] = field(default_factory=list)
    footprints: list[tuple[float, float, float]] = field(default_factory=list)  # (x, z, radius) of objects
    has_ceiling: bool = True


def _color(rng: np.random.Generator, lo: float = 0.15, hi: float = 0.95) -> np.ndarray:
    return rng.uniform(lo, hi, size=3)


def _part(kind, center, half, yaw, base, obj_yaw, sem, inst, color, rng, texture=None) -> Primitive:
    """A part given in object coordinates (centre relative to the object's floor point), placed in the room."""
    r = yaw_rotation(obj_yaw)
    c = base + r @ np.asarray(center, dtype=np.float64)
    rot = r @ yaw_rotation(yaw)
    tex = texture or _TEXTURES[int(rng.integers(len(_TEXTURES)))]
    return Primitive(kind, c, rot, np.asarray(half, dtype=np.float64), sem, inst, inst, color, tex,
                     float(rng.uniform(0.08, 0.4)))


def _furniture(cls: int, rng: np.random.Generator) -> tuple[list[tuple], float, float]:
    """Parts of one object as (kind, centre, half, yaw, colour-variant) in object coordinates
    (y down, floor at 0), plus its footprint width (x) and depth (z)."""
    u = rng.uniform
    parts: list[tuple] = []
    if cls in (1, 7):  # cabinet / dresser
        w, d, h = (u(0.5, 1.2), u(0.35, 0.6), u(0.8, 2.0)) if cls == 1 else (u(0.8, 1.5), u(0.4, 0.55), u(0.7, 1.0))
        parts.append((BOX, (0, -h / 2, 0), (w / 2, h / 2, d / 2), 0.0, 0))
        n_handles = int(rng.integers(1, 4))
        for k in range(n_handles):
            parts.append((BOX, (0, -h * (k + 1) / (n_handles + 1), -d / 2 - 0.01), (w * 0.2, 0.015, 0.01), 0.0, 1))
        if cls == 7 and rng.random() < 0.5:  # mirror on top
            parts.append((BOX, (0, -h - 0.35, d / 2 - 0.03), (w * 0.35, 0.35, 0.02), 0.0, 1))
        return parts, w, d
    if cls == 2:  # bed
        w, d = u(1.0, 2.0), u(1.9, 2.2)
        parts.append((BOX, (0, -0.15, 0), (w / 2, 0.15, d / 2), 0.0, 0))
        parts.append((BOX, (0, -0.4, 0.05), (w / 2 - 0.03, 0.1, d / 2 - 0.05), 0.0, 1))
        parts.append((BOX, (0, -0.5, d / 2 - 0.04), (w / 2, 0.5, 0.04), 0.0, 0))
        if rng.random() < 0.7:
            parts.append((BOX, (0, -0.55, d / 2 - 0.3), (w / 2 - 0.15, 0.06, 0.15), 0.0, 2))
        return parts, w, d
    if cls == 3:  # chair
        w, d, seat = u(0.4, 0.55), u(0.4, 0.55), u(0.42, 0.5)
        parts.append((BOX, (0, -seat, 0), (w / 2, 0.025, d / 2), 0.0, 0))
        parts.append((BOX, (0, -seat - 0.25, d / 2 - 0.02), (w / 2, 0.25, 0.02), 0.0, 0))
        r = u(0.015, 0.03)
        for sx in (-1, 1):
            for sz in (-1, 1):
                parts.append((CYLINDER, (sx * (w / 2 - r), -seat / 2, sz * (d / 2 - r)), (r, seat / 2, r), 0.0, 1))
        return parts, w, d
    if cls == 4:  # sofa
        w, d = u(1.4, 2.4), u(0.8, 1.0)
        parts.append((BOX, (0, -0.22, 0), (w / 2, 0.22, d / 2), 0.0, 0))
        parts.append((BOX, (0, -0.6, d / 2 - 0.1), (w / 2, 0.38, 0.1), 0.0, 0))
        for sx in (-1, 1):
            parts.append((BOX, (sx * (w / 2 - 0.1), -0.55, 0), (0.1, 0.15, d / 2), 0.0, 1))
        return parts, w, d
    if cls == 5:  # table (rectangular or round)
        top = u(0.7, 0.78)
        if rng.random() < 0.35:
            r = u(0.4, 0.6)
            parts.append((CYLINDER, (0, -top, 0), (r, 0.02, r), 0.0, 0))
            parts.append((CYLINDER, (0, -top / 2, 0), (0.05, top / 2, 0.05), 0.0, 1))
            return parts, 2 * r, 2 * r
        w, d = u(0.8, 1.8), u(0.6, 1.0)
        parts.append((BOX, (0, -top, 0), (w / 2, 0.02, d / 2), 0.0, 0))
        r = u(0.02, 0.04)
        for sx in (-1, 1):
            for sz in (-1, 1):
                parts.append((CYLINDER, (sx * (w / 2 - 0.06), -top / 2, sz * (d / 2 - 0.06)), (r, top / 2 - 0.01, r),
                              0.0, 1))
        return parts, w, d
    if cls == 6:  # desk: top and two side panels, a drawer block
        w, d, top = u(1.0, 1.6), u(0.55, 0.75), u(0.72, 0.78)
        parts.append((BOX, (0, -top, 0), (w / 2, 0.02, d / 2), 0.0, 0))
        for sx in (-1, 1):
            parts.append((BOX, (sx * (w / 2 - 0.02), -top / 2, 0), (0.02, top / 2 - 0.01, d / 2), 0.0, 0))
        parts.append((BOX, (w / 4, -top + 0.12, 0), (w / 5, 0.09, d / 2 - 0.02), 0.0, 1))
        return parts, w, d
    if cls == 8:  # floor lamp
        pole = u(1.2, 1.7)
        parts.append((CYLINDER, (0, -0.015, 0), (0.15, 0.015, 0.15), 0.0, 0))
        parts.append((CYLINDER, (0, -pole / 2, 0), (0.015, pole / 2, 0.015), 0.0, 0))
        parts.append((CYLINDER, (0, -pole - 0.12, 0), (0.2, 0.15, 0.2), 0.0, 2))
        return parts, 0.4, 0.4
    # other: shelf, plant pot or a box stack
    kind = int(rng.integers(3))
    if kind == 0:
        w, d, h = u(0.6, 1.2), u(0.25, 0.4), u(1.0, 2.0)
        for sx in (-1, 1):
            parts.append((BOX, (sx * (w / 2 - 0.015), -h / 2, 0), (0.015, h / 2, d / 2), 0.0, 0))
        n = int(rng.integers(3, 6))
        for k in range(n):
            parts.append((BOX, (0, -(k + 0.5) * h / n, 0), (w / 2 - 0.03, 0.015, d / 2), 0.0, 0))
        return parts, w, d
    if kind == 1:
        r = u(0.15, 0.3)
        pot = u(0.3, 0.5)
        parts.append((CYLINDER, (0, -pot / 2, 0), (r, pot / 2, r), 0.0, 0))
        parts.append((CYLINDER, (0, -pot - 0.3, 0), (r * 1.6, 0.3, r * 1.6), 0.0, 2))
        return parts, 3.2 * r, 3.2 * r
    w, d = u(0.3, 0.7), u(0.3, 0.6)
    h1, h2 = u(0.2, 0.5), u(0.1, 0.3)
    parts.append((BOX, (0, -h1 / 2, 0), (w / 2, h1 / 2, d / 2), 0.0, 0))
    parts.append((BOX, (0, -h1 - h2 / 2, 0), (w / 3, h2 / 2, d / 3), u(0, np.pi), 1))
    return parts, w, d


#: one typical colour per thing class (1..9), used with ``make_room(class_tint > 0)``
CLASS_TINTS = np.array([
    [0.55, 0.35, 0.20], [0.85, 0.85, 0.95], [0.80, 0.20, 0.20], [0.20, 0.35, 0.80], [0.45, 0.30, 0.15],
    [0.20, 0.70, 0.30], [0.90, 0.60, 0.10], [0.95, 0.90, 0.30], [0.60, 0.25, 0.70],
])


def make_room(rng: np.random.Generator, ceiling_prob: float = 0.5, max_objects: int = 10,
              class_tint: float = 0.0) -> Room:
    """Sample one room with furniture (see module docstring).

    ``class_tint`` in [0, 1] pulls every furniture colour towards its class's typical colour
    (:data:`CLASS_TINTS`): ``(1 - t) * random + t * typical``, as real categories have typical materials.
    0 (default) keeps the colours random, so the class shows only in the shape; the random draws are the same
    for every value, so the geometry of a seed never changes.
    """
    lx, lz, height = rng.uniform(3.5, 6.5), rng.uniform(3.5, 6.5), rng.uniform(2.6, 3.0)
    room = Room((lx, height, lz), has_ceiling=bool(rng.random() < ceiling_prob))
    next_2d = 1000
    wall_color, floor_color = _color(rng, 0.55, 0.95), _color(rng, 0.25, 0.7)
    eye = np.eye(3)
    # Floor and ceiling: rectangles spanning the room (zero half-height along y).
    room.primitives.append(Primitive(BOX, np.array([lx / 2, 0.0, lz / 2]), eye, np.array([lx / 2, 0.0, lz / 2]),
                                     FLOOR, 0, next_2d, floor_color, "stripes", float(rng.uniform(0.1, 0.3))))
    next_2d += 1
    if room.has_ceiling:
        room.primitives.append(Primitive(BOX, np.array([lx / 2, -height, lz / 2]), eye,
                                         np.array([lx / 2, 0.0, lz / 2]), CEILING, 0, next_2d,
                                         _color(rng, 0.8, 1.0), "solid"))
        next_2d += 1
    # Walls: x = 0, x = lx (normal along x) and z = 0, z = lz (normal along z).
    for center, half in (
        ((0.0, -height / 2, lz / 2), (0.0, height / 2, lz / 2)),
        ((lx, -height / 2, lz / 2), (0.0, height / 2, lz / 2)),
        ((lx / 2, -height / 2, 0.0), (lx / 2, height / 2, 0.0)),
        ((lx / 2, -height / 2, lz), (lx / 2, height / 2, 0.0)),
    ):
        tint = np.clip(wall_color + rng.normal(0, 0.04, 3), 0, 1)
        room.primitives.append(Primitive(BOX, np.array(center), eye, np.array(half), WALL, 0, next_2d, tint,
                                         "noise" if rng.random() < 0.5 else "solid", float(rng.uniform(0.2, 0.6))))
        next_2d += 1
    # Furniture.
    n_objects = int(rng.integers(max(3, max_objects // 2), max_objects + 1))
    probs = _CLASS_WEIGHTS / _CLASS_WEIGHTS.sum()
    instance = 1
    for _ in range(n_objects):
        cls = int(rng.choice(9, p=probs)) + 1
        parts, w, d = _furniture(cls, rng)
        radius = 0.5 * float(np.hypot(w, d))
        for _try in range(30):
            if rng.random() < 0.5:  # against a wall, facing into the room
                wall = int(rng.integers(4))
                along = rng.uniform(radius, (lz if wall < 2 else lx) - radius) if (lz if wall < 2 else lx) > 2 * radius \
                    else None
                if along is None:
                    continue
                gap = d / 2 + 0.02
                x, z, yaw = [(gap, along, -np.pi / 2), (lx - gap, along, np.pi / 2), (along, gap, np.pi),
                             (along, lz - gap, 0.0)][wall]
                r_fp = max(w, d) / 2
            else:
                x, z, yaw = rng.uniform(radius, lx - radius), rng.uniform(radius, lz - radius), rng.uniform(0, 2 * np.pi)
                r_fp = radius
            if x - 0.01 < 0 or z - 0.01 < 0 or x > lx or z > lz:
                continue
            if all(np.hypot(x - fx, z - fz) > r_fp + fr + 0.05 for fx, fz, fr in room.footprints):
                break
        else:
            continue
        room.footprints.append((x, z, r_fp))
        base = np.array([x, 0.0, z])
        colors = [_color(rng), _color(rng), _color(rng)]
        if class_tint > 0:
            colors = [(1.0 - class_tint) * c + class_tint * CLASS_TINTS[cls - 1] for c in colors]
        for kind, center, half, part_yaw, variant in parts:
            room.primitives.append(_part(kind, center, half, part_yaw, base, yaw, cls, instance, colors[variant], rng))
        instance += 1
    return room
