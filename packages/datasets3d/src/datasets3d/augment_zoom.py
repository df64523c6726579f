"""Random zoom: a crop of the image resampled back to its full size, with the camera and the volumes re-framed.

Why a zoom and not the toolkit's plain crop: the 3D stage lifts onto a fixed plane and the multi-plane
occupancy head predicts on a fixed grid, so a sample must keep its image size. Cropping a window of
``1/z`` of the image and resampling it to the full size is what a camera with a ``z`` times longer focal
length, looking the same way, would have seen. So the zoomed frame is again a valid frame:

* 2D maps (at the stored resolution): RGB bilinear, depth / labels / room mask nearest (depth values are
  unchanged: the camera centre does not move);
* intrinsic (pixel centres at integer u): ``fx' = z fx``, ``cx' = (cx + 0.5 - x0) z - 0.5`` (same for y);
* volumes: the grid of ``frustum3d.geometry`` is placed from the frustum's bounding box, which shrinks and
  moves with the intrinsic, while the voxel size and the depth range stay. The grid therefore moves by a
  pure translation ``d = t' - t`` (t, t' = translations of ``camera_to_grid`` before/after). Every volume
  is shifted by ``n = round(d)`` whole voxels (a permutation: all targets stay mutually consistent) and
  ``camera_to_grid`` becomes the exact transform of the shifted volumes (translation ``t + n``); the grid
  that frustum3d builds from the new intrinsic (the lifting's) differs from it by ``d - n`` (at most half a
  voxel per axis), recorded in ``meta["augment"]["zoom"]``, as for the flip (:mod:`datasets3d.augment3d`);
* frustum: the shifted mask AND the new camera's frustum (:func:`datasets3d.targets3d.conservative_frustum`:
  voxel centres in the view, dilated by one voxel, as the synthetic generator builds it; the 3D-FRONT
  ``reference`` rule holds only for a centred principal point). Voxels that leave the frustum are cleared as
  the data generator writes voxels outside it: distance = truncation, labels 0, weighting = the value the
  frame has outside its frustum.

Only zooming in (``z >= 1``) is supported: zooming out would need image content outside the frame.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from .augment import STREAM_ZOOM, AugmentPlan, zooms
from .frame import FrameReader, RawFrame
from .targets3d import conservative_frustum

if TYPE_CHECKING:
    from .config import DatasetConfig


@dataclass(frozen=True)
class ZoomWindow:
    """The part of the stored image that fills the zoomed frame, in pixel-edge coordinates (the image spans
    ``[0, W) x [0, H)``; pixel ``u`` covers ``[u, u+1)``)."""

    x0: float
    y0: float
    width: float
    height: float

    def factors(self, size_wh: tuple[int, int]) -> tuple[float, float]:
        """(sx, sy): output pixels per source pixel."""
        return size_wh[0] / self.width, size_wh[1] / self.height

    def as_list(self) -> list[float]:
        return [self.x0, self.y0, self.width, self.height]


def draw_zoom(rng: np.random.Generator, size_wh: tuple[int, int], zoom_range: tuple[float, float]) -> ZoomWindow:
    """A window of ``1/z`` of the image (aspect kept) at a uniform random position, ``z ~ U(zoom_range)``.

    Three draws always (factor, x, y), so the stream position does not depend on the values."""
    z = float(rng.uniform(zoom_range[0], zoom_range[1]))
    fx, fy = float(rng.random()), float(rng.random())
    w, h = size_wh[0] / z, size_wh[1] / z
    return ZoomWindow(fx * (size_wh[0] - w), fy * (size_wh[1] - h), w, h)


def zoom_intrinsic(intrinsic: np.ndarray, window: ZoomWindow, size_wh: tuple[int, int]) -> np.ndarray:
    """Intrinsic of the zoomed frame (module docstring); a skew term scales with x."""
    k = np.array(intrinsic, dtype=np.float64, copy=True)
    sx, sy = window.factors(size_wh)
    k[0, 0], k[0, 1], k[1, 1] = k[0, 0] * sx, k[0, 1] * sx, k[1, 1] * sy
    k[0, 2] = (k[0, 2] + 0.5 - window.x0) * sx - 0.5
    k[1, 2] = (k[1, 2] + 0.5 - window.y0) * sy - 0.5
    return k


def _source_pixels(start: float, extent: float, n: int) -> np.ndarray:
    """Source pixel index under the centre of each of the ``n`` output pixels (nearest sampling)."""
    centres = start + (np.arange(n, dtype=np.float64) + 0.5) * (extent / n)
    return np.clip(np.floor(centres).astype(np.int64), 0, n - 1)


def zoom_maps(frame: RawFrame, window: ZoomWindow) -> RawFrame:
    """The frame's 2D maps and intrinsic zoomed to ``window`` (volumes untouched)."""
    from PIL import Image

    w, h = frame.image_size
    rows = _source_pixels(window.y0, window.height, h)[:, None]
    cols = _source_pixels(window.x0, window.width, w)[None, :]
    box = (window.x0, window.y0, window.x0 + window.width, window.y0 + window.height)
    rgb = np.asarray(Image.fromarray(np.ascontiguousarray(frame.rgb)).transform((w, h), Image.EXTENT, box,
                                                                               Image.BILINEAR))

    def pick(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.ascontiguousarray(a[rows, cols])

    return replace(frame, rgb=rgb, depth=pick(frame.depth), semantic=pick(frame.semantic),
                   instance=pick(frame.instance), room_mask=pick(frame.room_mask),
                   intrinsic=zoom_intrinsic(frame.intrinsic, window, frame.image_size), notes=list(frame.notes))


def translate(volume: np.ndarray, shift: tuple[int, int, int], fill) -> np.ndarray:
    """``out[i] = volume[i - shift]`` per axis; voxels shifted in from outside the grid take ``fill``."""
    out = np.full(volume.shape, fill, dtype=volume.dtype)
    dst, src = [], []
    for s, n in zip(shift, volume.shape):
        s = max(-n, min(n, int(s)))
        dst.append(slice(max(0, s), min(n, n + s)))
        src.append(slice(max(0, -s), min(n, n - s)))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def _outside_weight(frame: RawFrame) -> float:
    """Weighting of a voxel outside the frustum: the grid corner's value (always outside the view frustum),
    1 when the corner is inside (never for the released data)."""
    assert frame.weighting is not None and frame.frustum is not None
    return 1.0 if bool(frame.frustum[0, 0, 0]) else float(frame.weighting[0, 0, 0])


def reframe_volumes(frame: RawFrame, reader: FrameReader, intrinsic: np.ndarray, truncation: float
                    ) -> tuple[RawFrame, dict]:
    """The frame's volumes moved into the grid of a camera with ``intrinsic`` (same image size, same camera
    centre and orientation) and cut to its frustum; see the module docstring. Returns the frame with
    ``intrinsic`` set and a record (grid shift, residual, occupied voxels cleared)."""
    if frame.geometry is None:
        return replace(frame, intrinsic=intrinsic), {}
    assert frame.camera_to_grid is not None and frame.frustum is not None
    grid = tuple(frame.geometry.shape)
    new_geometry = reader.geometry_for(intrinsic, frame.image_size, grid)
    target = new_geometry.camera_to_grid().numpy()
    old = np.asarray(frame.camera_to_grid, dtype=np.float64)
    d = target[:3, 3] - old[:3, 3]
    n = tuple(int(np.floor(v + 0.5)) for v in d)
    c2g = old.copy()
    c2g[:3, 3] += n
    weight_out = _outside_weight(frame) if frame.weighting is not None else 1.0
    frustum = translate(frame.frustum, n, False) & conservative_frustum(new_geometry)
    outside = ~frustum
    geometry = translate(frame.geometry, n, truncation)
    cleared = int((geometry[outside] < truncation).sum())
    geometry[outside] = np.maximum(geometry[outside], truncation)
    vol: dict = {"geometry": geometry, "frustum": frustum}
    for name, fill in (("semantic_3d", 0), ("instance_3d", 0), ("weighting", weight_out)):
        arr = getattr(frame, name)
        if arr is not None:
            arr = translate(arr, n, fill)
            arr[outside] = fill
        vol[name] = arr
    out = replace(frame, intrinsic=intrinsic, camera_to_grid=c2g, frustum_geometry=new_geometry,
                  shared_frustum=None, **vol)
    record = {"grid_shift": list(n), "grid_residual": [float(v) for v in d - np.asarray(n)],
              "cleared_occupied_voxels": cleared}
    return out, record


def zoom_frame(frame: RawFrame, reader: FrameReader, window: ZoomWindow, truncation: float
               ) -> tuple[RawFrame, dict]:
    """The frame as seen through ``window`` at full size: maps, intrinsic and volumes (module docstring)."""
    zoomed = zoom_maps(frame, window)
    out, record = reframe_volumes(frame, reader, zoomed.intrinsic, truncation)
    out = replace(out, rgb=zoomed.rgb, depth=zoomed.depth, semantic=zoomed.semantic, instance=zoomed.instance,
                  room_mask=zoomed.room_mask)
    return out, {"factor": window.factors(frame.image_size)[0], "window": window.as_list(), **record}


def maybe_zoom(frame: RawFrame, reader: FrameReader, plan: AugmentPlan, cfg: DatasetConfig
               ) -> tuple[RawFrame, dict | None]:
    """Apply the plan's zoom draw when ``cfg.zoom_range`` asks for one; the record goes to ``meta["augment"]``."""
    if not zooms(cfg):
        return frame, None
    window = draw_zoom(plan.rng(STREAM_ZOOM), frame.image_size, cfg.zoom_range)
    return zoom_frame(frame, reader, window, cfg.truncation_range[1])
