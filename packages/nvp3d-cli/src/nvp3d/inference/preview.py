"""``<name>_preview.png``: the reconstructed 3D panoptic mesh seen from an oblique camera (CPU, no display).

A small z-buffer rasteriser in numpy: the mesh (camera metres: x right, y down, z forward) is turned by ``yaw``
about the vertical axis and tilted by ``pitch`` to look down on the scene, projected orthographically to fit
the image, and each pixel centre takes the nearest triangle that covers it, with flat Lambert shading of the
triangle's vertex colours (instance colours for things). Flat colours keep the PNG small (tens of kB).

Vectorised over triangles (grouped by the size of their pixel bounding boxes) rather than drawn one by one:
a 256^3 reconstruction has a few hundred thousand triangles, and a per-triangle Python loop held the GIL for
seconds per image, which made writing outputs, not the network, the bound of ``nvp3d inference``.
"""

from __future__ import annotations

import math

import numpy as np

from nvp3d.inference.mesh import Mesh

__all__ = ["MAX_PREVIEW_FACES", "PREVIEW_CELLS", "preview_stride", "rasterize", "render_preview"]

#: at most this many triangles are drawn (larger meshes are subsampled evenly; a memory bound, far above a
#: 256^3 reconstruction's triangle count)
MAX_PREVIEW_FACES = 4_000_000

BACKGROUND = (250, 250, 250)

#: the preview's mesh has about this many voxels across the grid's longest axis: a 480x360 picture shows no more
#: (a 256^3 grid is rendered from its 128^3 pooling, 4x fewer triangles; :func:`preview_stride`)
PREVIEW_CELLS = 128

#: candidate (triangle, pixel) pairs tested at once; bounds the rasteriser's temporary memory (~100 MB)
_CHUNK_PAIRS = 2_000_000


def preview_stride(grid_dims: tuple[int, ...] | list[int]) -> int:
    """Pooling stride of the preview's mesh for a grid of ``grid_dims`` (1 up to 2 x :data:`PREVIEW_CELLS`)."""
    return max(1, max(int(n) for n in grid_dims) // PREVIEW_CELLS)


def _rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """Camera-frame rotation: ``yaw`` about the y (down) axis, then ``pitch`` about x (looking down)."""
    y, p = math.radians(yaw_deg), math.radians(pitch_deg)
    ry = np.array([[math.cos(y), 0.0, math.sin(y)], [0.0, 1.0, 0.0], [-math.sin(y), 0.0, math.cos(y)]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, math.cos(p), -math.sin(p)], [0.0, math.sin(p), math.cos(p)]])
    return rx @ ry


def _covered_pixels(xy: np.ndarray, z: np.ndarray, w: int, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (pixel, depth, triangle) with the pixel centre inside the screen triangle ``xy [F, 3, 2]``.

    Pixel ``(i, j)`` has its centre at ``(i + 0.5, j + 0.5)``; edges count as inside, so a closed surface
    leaves no pixel centre uncovered. Depth is interpolated with the barycentric weights.
    """
    # first and last pixel index whose centre is inside the bounding box; the corners' min / max are written
    # out because numpy's reduction over a length-3 middle axis is about 5x slower
    lo = np.ceil(np.minimum(np.minimum(xy[:, 0], xy[:, 1]), xy[:, 2]) - 0.5).astype(np.int64)
    hi = np.floor(np.maximum(np.maximum(xy[:, 0], xy[:, 1]), xy[:, 2]) - 0.5).astype(np.int64)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, np.array([w - 1, h - 1]))
    size = hi - lo + 1  # [F, 2] pixels per axis
    a, b, c = xy[:, 0], xy[:, 1], xy[:, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    keep = (size > 0).all(1) & (np.abs(area) > 1e-12)
    faces = np.nonzero(keep)[0]
    # bucket triangles by their bbox rounded up to powers of two, so each bucket is one dense candidate grid
    bucket = np.ceil(np.log2(size[faces])).astype(np.int64)
    key = bucket[:, 0] * 64 + bucket[:, 1]
    pix_out, z_out, face_out = [], [], []
    for k in np.unique(key):
        members = faces[key == k]
        bw, bh = 1 << int(k // 64), 1 << int(k % 64)
        oy, ox = np.divmod(np.arange(bw * bh), bw)
        step = max(1, _CHUNK_PAIRS // (bw * bh))
        for s in range(0, len(members), step):
            f = members[s:s + step]
            px = lo[f, 0:1] + ox  # [n, bw*bh]
            py = lo[f, 1:2] + oy
            inside = (ox < size[f, 0:1]) & (oy < size[f, 1:2])
            cx, cy = px + 0.5, py + 0.5
            ax, ay, bx, by, qx, qy = (v[:, None] for v in (a[f, 0], a[f, 1], b[f, 0], b[f, 1], c[f, 0], c[f, 1]))
            inv = 1.0 / area[f][:, None]
            w0 = ((bx - cx) * (qy - cy) - (by - cy) * (qx - cx)) * inv  # weight of vertex a
            w1 = ((qx - cx) * (ay - cy) - (qy - cy) * (ax - cx)) * inv  # weight of vertex b
            w2 = 1.0 - w0 - w1
            eps = -1e-9
            inside &= (w0 >= eps) & (w1 >= eps) & (w2 >= eps)
            rows, cols = np.nonzero(inside)
            if len(rows) == 0:
                continue
            zf = z[f]
            depth = (w0[rows, cols] * zf[rows, 0] + w1[rows, cols] * zf[rows, 1] + w2[rows, cols] * zf[rows, 2])
            pix_out.append(py[rows, cols] * w + px[rows, cols])
            z_out.append(depth)
            face_out.append(f[rows])
    if not pix_out:
        empty = np.zeros(0, np.int64)
        return empty, np.zeros(0), empty
    return np.concatenate(pix_out), np.concatenate(z_out), np.concatenate(face_out)


def _background(w: int, h: int) -> np.ndarray:
    """An ``[h, w, 3]`` uint8 image filled with :data:`BACKGROUND`."""
    img = np.empty((h, w, 3), np.uint8)
    img[:] = BACKGROUND
    return img


def render_preview(mesh: Mesh, size: tuple[int, int] = (480, 360), *, yaw: float = 35.0, pitch: float = 30.0,
                   margin: float = 0.06) -> np.ndarray:
    """Oblique view of ``mesh`` as an ``[H, W, 3]`` uint8 image (``size`` = (W, H)); an empty mesh gives a
    blank image. The view turns about the mesh centre, so the whole reconstruction stays in the frame."""
    w, h = int(size[0]), int(size[1])
    if mesh.num_faces == 0:
        return _background(w, h)
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
    vertex_colors = np.asarray(mesh.colors, dtype=np.float64)
    colors = (vertex_colors[faces[:, 0]] + vertex_colors[faces[:, 1]] + vertex_colors[faces[:, 2]]) / 3.0
    colors *= shade[:, None]
    colors = np.clip(colors, 0, 255).astype(np.uint8)
    lo, hi = r[:, :2].min(0), r[:, :2].max(0)
    scale = (1.0 - 2 * margin) * min(w / max(hi[0] - lo[0], 1e-9), h / max(hi[1] - lo[1], 1e-9))
    offset = np.array([w, h]) / 2.0 - scale * (lo + hi) / 2.0
    xy = tri[:, :, :2] * scale + offset  # orthographic: screen x = x, screen y = y (down)
    return rasterize(xy, tri[:, :, 2], colors, w, h)


def rasterize(xy: np.ndarray, z: np.ndarray, colors: np.ndarray, w: int, h: int) -> np.ndarray:
    """``[h, w, 3]`` uint8 image of flat-coloured screen triangles ``xy [F, 3, 2]`` (pixels, y down) with
    vertex depths ``z [F, 3]``: each pixel centre takes the nearest (smallest z) covering triangle's colour
    ``colors [F, 3]``; uncovered pixels stay :data:`BACKGROUND`."""
    img = _background(w, h)
    pix, depth, face = _covered_pixels(np.asarray(xy, np.float64), np.asarray(z, np.float64), w, h)
    if len(pix):
        order = np.lexsort((depth, pix))  # by pixel, nearest first
        pix, face = pix[order], face[order]
        first = np.ones(len(pix), bool)
        first[1:] = pix[1:] != pix[:-1]
        img.reshape(-1, 3)[pix[first]] = np.asarray(colors, np.uint8)[face[first]]
    return img
