"""``<name>_preview.png``: the reconstructed 3D panoptic mesh seen from an oblique camera (CPU, no display).

A small painter's-algorithm rasteriser (numpy + Pillow): the mesh (camera metres: x right, y down, z forward)
is turned by ``yaw`` about the vertical axis and tilted by ``pitch`` to look down on the scene, projected
orthographically to fit the image, and its triangles are drawn back to front with flat Lambert shading of
their vertex colours (instance colours for things). Flat colours keep the PNG small (tens of kB).
"""

from __future__ import annotations

import math

import numpy as np

from nvp3d.inference.mesh import Mesh

__all__ = ["MAX_PREVIEW_FACES", "render_preview"]

#: at most this many triangles are drawn (larger meshes are subsampled evenly; the preview is a thumbnail)
MAX_PREVIEW_FACES = 400_000

BACKGROUND = (250, 250, 250)


def _rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """Camera-frame rotation: ``yaw`` about the y (down) axis, then ``pitch`` about x (looking down)."""
    y, p = math.radians(yaw_deg), math.radians(pitch_deg)
    ry = np.array([[math.cos(y), 0.0, math.sin(y)], [0.0, 1.0, 0.0], [-math.sin(y), 0.0, math.cos(y)]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, math.cos(p), -math.sin(p)], [0.0, math.sin(p), math.cos(p)]])
    return rx @ ry


def render_preview(mesh: Mesh, size: tuple[int, int] = (480, 360), *, yaw: float = 35.0, pitch: float = 30.0,
                   margin: float = 0.06) -> np.ndarray:
    """Oblique view of ``mesh`` as an ``[H, W, 3]`` uint8 image (``size`` = (W, H)); an empty mesh gives a
    blank image. The view turns about the mesh centre, so the whole reconstruction stays in the frame."""
    from PIL import Image, ImageDraw

    w, h = int(size[0]), int(size[1])
    img = Image.new("RGB", (w, h), BACKGROUND)
    if mesh.num_faces == 0:
        return np.asarray(img)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    if len(faces) > MAX_PREVIEW_FACES:
        faces = faces[np.linspace(0, len(faces) - 1, MAX_PREVIEW_FACES).astype(np.int64)]
    v = np.asarray(mesh.vertices, dtype=np.float64)
    centre = 0.5 * (v.min(0) + v.max(0))
    r = (v - centre) @ _rotation(yaw, pitch).T
    tri = r[faces]  # [F, 3, 3]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-12
    light = np.array([-0.35, -0.75, -0.55])
    light /= np.linalg.norm(light)
    shade = 0.35 + 0.65 * np.abs(normal @ light)  # two-sided: marching-cubes winding is not relied upon
    colors = np.asarray(mesh.colors, dtype=np.float64)[faces].mean(1) * shade[:, None]
    colors = np.clip(colors, 0, 255).astype(np.uint8)
    lo, hi = r[:, :2].min(0), r[:, :2].max(0)
    scale = (1.0 - 2 * margin) * min(w / max(hi[0] - lo[0], 1e-9), h / max(hi[1] - lo[1], 1e-9))
    offset = np.array([w, h]) / 2.0 - scale * (lo + hi) / 2.0
    xy = tri[:, :, :2] * scale + offset  # orthographic: screen x = x, screen y = y (down)
    order = np.argsort(-tri[:, :, 2].mean(1), kind="stable")  # far (large z) first
    draw = ImageDraw.Draw(img)
    for i in order:
        p = xy[i]
        draw.polygon([(p[0, 0], p[0, 1]), (p[1, 0], p[1, 1]), (p[2, 0], p[2, 1])], fill=tuple(colors[i]))
    return np.asarray(img)
