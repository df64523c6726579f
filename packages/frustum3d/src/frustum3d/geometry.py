"""Camera / view-frustum / voxel-grid geometry shared by lifting, the decoder, losses and data generation.

Conventions
-----------
* Camera space: metres, x right, y down, z forward (OpenCV pinhole, pixel centres at integer u, v).
* Voxel grid ("camera convention"): axis 0 = camera x, axis 1 = camera y, axis 2 = depth. Continuous grid
  coordinates come from :meth:`FrustumGeometry.camera_to_grid`; a point with continuous coordinate ``g`` lies
  in voxel ``floor(g)`` (this is how lifting voxelises), so voxel ``i`` spans ``[i, i+1)`` and its centre is
  ``i+0.5``.
* The stored 3D-FRONT *geometry/weighting* volumes are mirrored on axes (0, 1) relative to this convention
  (flip them before use), and so is the stored ``meta/frustum_mask.npz``: the data generator worked in that
  mirrored frame. :meth:`FrustumGeometry.frustum_mask` with the default ``sampling="reference"`` rebuilds
  the generator's mask and flips it into the camera convention: it equals ``flip(stored, (0, 1))`` -- the
  mask the toolkit uses -- on 100.000 % of voxels of the real fixture, contains 100 % of its (flipped) GT
  surface voxels, and agrees with the unflipped stored file on 99.56 % (73,924 voxels differ; the mask is
  almost flip-symmetric). The masks sampled directly in the camera frame (``"center"``, ``"toolkit"``) leave
  0.6-1.7 % of the GT surface outside.
* The reference (Dahnert / BUOL / TAO) grid transform is built from the intrinsic of the *reduced* 160x120
  plane (fx = fy = 138.564, cx = 79.5, cy = 59.5): grid min corner = (-114.748, -85.881, 13.333) voxels,
  frustum dims (231, 174, 187), padding (12, 41, 34). The defaults (``FrustumGeometry()``: no stored
  intrinsic, ``plane_size=(160, 120)``) use exactly that. Passing the full 320x240 intrinsic with plane
  size (320, 240) gives a slightly different min corner (-115.11 in x), so pass the reduced one to stay on
  the reference grid.

Public API (numpy or torch in, torch out; all math in float64)
------------------------------------------------------------
``FRONT3D_INTRINSIC = (fx, fy, cx, cy) = (277.1281435, 277.1281435, 159.5, 119.5)`` at
``FRONT3D_IMAGE_SIZE = (320, 240)`` (W, H); ``FRONT3D_REDUCED_SIZE = (160, 120)``;
``FRONT3D_GRID = (256, 256, 256)``; ``FRONT3D_VOXEL_SIZE = 0.03``; ``FRONT3D_DEPTH_RANGE = (0.4, 6.0)``;
``FRONT3D_TRUNCATION = 3.0``.

* ``intrinsic_matrix(fx, fy, cx, cy) -> Tensor[4,4]``
* ``front3d_intrinsic(image_size=FRONT3D_REDUCED_SIZE) -> Tensor[4,4]`` (the 320x240 intrinsic rescaled)
* ``rescale_intrinsic(intrinsic[...,4,4|3,3], from_size=(W,H), to_size=(W,H)) -> Tensor`` (same shape): the
  one intrinsic-rescale convention of the package.
* ``FrustumGeometry(grid_dims, voxel_size, depth_min, depth_max, truncation, plane_size, image_size,
  intrinsic=None)``: frozen value object of the grid and its lifting plane. Constructors ``front3d(**kw)``,
  ``with_intrinsic(K, from_size=None)``, ``rescaled(plane_size)``; methods (each with an optional per-call
  plane ``intrinsic=``): ``plane_intrinsic(K=None, from_size=None)``, ``bounds()`` -> ``FrustumBounds``
  (voxel units), ``camera_to_grid()`` / ``grid_to_camera()`` -> [4,4] (or [...,4,4] for batched
  intrinsics; ``voxel = p/voxel_size - min + padding``), ``voxel_sample_offset(sampling)``,
  ``frustum_mask(sampling="reference")`` / ``frustum()`` -> bool [X,Y,Z], ``project_voxels(coords[N,3],
  sampling="toolkit")`` -> (u, v, depth), ``inside_image(u, v, depth, sampling)``, ``kept_mask(depth_map,
  frustum, sampling="toolkit")`` -> ``KeptMapping(kept[X,Y,Z], mapping[X,Y,Z,4] = (u, v, z_index, depth))``,
  ``grid_kwargs()``.

Sampling conventions (``sampling=``), i.e. which continuous grid point stands for voxel ``i``:
* ``"center"``: ``i + 0.5`` -- geometrically consistent with lifting (floor voxelisation).
* ``"reference"``: ``i - (ceil(p) - floor(p))`` with ``p = (grid - dims)/2``, i.e. the voxel's lower corner with
  the padding rounded up, and the inside-image test ``-0.5 <= u < W-0.5`` (the pixel ``round(u)`` exists),
  depth in ``[depth_min, depth_max]``. Evaluated in the generator's mirrored frame this is the rule that
  regenerates Dahnert's stored front3d ``frustum_mask.npz`` exactly (16,777,216 / 16,777,216 voxels).
* ``"toolkit"``: ``i - 1 - (p - floor(p))``: TAO/BUOL ``BackProjection`` (``get_kept_mapping``) subtracts the
  unrounded padding plus one from the voxel index before inverting camera->frustum. Inside-image test there:
  ``0 <= u < W``, ``0 <= v < H``, depth in ``[depth_min, depth_max]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FRONT3D_INTRINSIC",
    "FRONT3D_IMAGE_SIZE",
    "FRONT3D_REDUCED_SIZE",
    "FRONT3D_GRID",
    "FRONT3D_VOXEL_SIZE",
    "FRONT3D_DEPTH_RANGE",
    "FRONT3D_TRUNCATION",
    "FrustumBounds",
    "FrustumGeometry",
    "KeptMapping",
    "intrinsic_matrix",
    "front3d_intrinsic",
    "rescale_intrinsic",
]

FRONT3D_INTRINSIC: tuple[float, float, float, float] = (277.1281435, 277.1281435, 159.5, 119.5)
FRONT3D_IMAGE_SIZE: tuple[int, int] = (320, 240)  # (W, H) the intrinsic above belongs to
FRONT3D_REDUCED_SIZE: tuple[int, int] = (160, 120)  # (W, H) of the lifting plane / reference grid transform
FRONT3D_GRID: tuple[int, int, int] = (256, 256, 256)
FRONT3D_VOXEL_SIZE: float = 0.03
FRONT3D_DEPTH_RANGE: tuple[float, float] = (0.4, 6.0)
FRONT3D_TRUNCATION: float = 3.0

_SAMPLINGS = ("center", "reference", "toolkit")

ArrayLike = torch.Tensor | np.ndarray | Sequence[float]


class FrustumBounds(NamedTuple):
    """Axis-aligned box of the view frustum in voxel units (camera convention)."""

    min_corner: torch.Tensor  # [...,3] float64, min of the 8 corners / voxel_size
    dims: torch.Tensor  # [...,3] float64, ceil(max - min)
    padding: torch.Tensor  # [...,3] float64, floor((grid - dims) / 2)
    padding_exact: torch.Tensor  # [...,3] float64, (grid - dims) / 2 (may end in .5)


class KeptMapping(NamedTuple):
    """Result of :meth:`FrustumGeometry.kept_mask`: which voxels see a pixel, and where."""

    kept: torch.Tensor  # bool [X,Y,Z]
    mapping: torch.Tensor  # float64 [X,Y,Z,4] = (u, v, z_index, depth); -1 where not kept


def _as_f64(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def _check_size(size: Sequence[int], name: str, n: int = 2) -> tuple[int, ...]:
    size = tuple(int(s) for s in size)
    if len(size) != n or any(s <= 0 for s in size):
        raise ValueError(f"{name} must be {n} positive integers, got {size!r}")
    return size


def intrinsic_matrix(fx: float, fy: float, cx: float, cy: float) -> torch.Tensor:
    """Homogeneous 4x4 pinhole intrinsic (float64)."""
    k = torch.eye(4, dtype=torch.float64)
    k[0, 0], k[1, 1], k[0, 2], k[1, 2] = float(fx), float(fy), float(cx), float(cy)
    return k


def rescale_intrinsic(
    intrinsic: ArrayLike,
    from_size: Sequence[int] = FRONT3D_IMAGE_SIZE,
    to_size: Sequence[int] = FRONT3D_REDUCED_SIZE,
) -> torch.Tensor:
    """Adapt an intrinsic to a resized image (sizes are (W, H)).

    fx *= W'/W, fy *= H'/H, cx *= (W'-1)/(W-1), cy *= (H'-1)/(H-1): the last two keep the first and last pixel
    centres fixed, which is how the reference code resizes (align-corners style) the depth/feature planes.
    """
    w, h = _check_size(from_size, "from_size")
    w2, h2 = _check_size(to_size, "to_size")
    k = _as_f64(intrinsic).clone()
    if k.shape[-2:] not in ((3, 3), (4, 4)):
        raise ValueError(f"intrinsic must have shape [...,3,3] or [...,4,4], got {tuple(k.shape)}")
    k[..., 0, 0] *= w2 / w
    k[..., 1, 1] *= h2 / h
    k[..., 0, 2] *= (w2 - 1) / (w - 1)
    k[..., 1, 2] *= (h2 - 1) / (h - 1)
    return k


def front3d_intrinsic(image_size: Sequence[int] = FRONT3D_REDUCED_SIZE) -> torch.Tensor:
    """The 3D-FRONT intrinsic (defined at 320x240) rescaled to ``image_size`` (W, H)."""
    return rescale_intrinsic(intrinsic_matrix(*FRONT3D_INTRINSIC), FRONT3D_IMAGE_SIZE, image_size)


def _focal_centre(k: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return k[..., 0, 0], k[..., 1, 1], k[..., 0, 2], k[..., 1, 2]


def _check_intrinsic(k: torch.Tensor) -> torch.Tensor:
    if k.shape[-2:] not in ((3, 3), (4, 4)):
        raise ValueError(f"intrinsic must have shape [...,3,3] or [...,4,4], got {tuple(k.shape)}")
    return k


def _intrinsic_rows(value: ArrayLike) -> tuple[tuple[float, ...], ...]:
    """One [3,3] / [4,4] plane intrinsic as 4 rows of 4 floats (a [3,3] is embedded in the identity)."""
    k = _as_f64(value).detach().cpu()
    if tuple(k.shape) == (3, 3):
        k4 = torch.eye(4, dtype=torch.float64)
        k4[:3, :3] = k
        k = k4
    if tuple(k.shape) != (4, 4):
        raise ValueError(f"FrustumGeometry.intrinsic must be one [3,3] or [4,4] matrix of the lifting plane, got "
                         f"shape {tuple(k.shape)}; pass batched intrinsics per call (intrinsic=...)")
    if not (float(k[0, 0]) > 0 and float(k[1, 1]) > 0):
        raise ValueError(f"FrustumGeometry.intrinsic needs positive focal lengths, got fx={float(k[0, 0])}, "
                         f"fy={float(k[1, 1])}")
    return tuple(tuple(float(x) for x in row) for row in k.tolist())


@dataclass(frozen=True)
class FrustumGeometry:
    """The camera-frustum voxel grid as one value: grid, voxel size, depth range, truncation, lifting plane.

    It carries once the seven parameters (intrinsic, plane size, grid dims, voxel size, depth range) that
    the free functions removed in 0.4.0 took on every call. Defaults are the 3D-FRONT reference grid.

    Attributes:
        grid_dims: (X, Y, Z) voxels of the finest grid.
        voxel_size: metres per voxel.
        depth_min, depth_max: metric depth range of the frustum.
        truncation: TDF truncation / lifting half-width in voxels.
        plane_size: (W, H) of the *lifting plane*: the image the grid transform is defined on and the
            intrinsic belongs to (160x120 for 3D-FRONT).
        image_size: (W, H) of the network input (320x240); only the default ``from_size`` of
            :meth:`plane_intrinsic` / :meth:`with_intrinsic`.
        intrinsic: the plane's 4x4 intrinsic as rows of floats, or None = the 3D-FRONT camera rescaled to
            ``plane_size``. Any [3,3] / [4,4] tensor or array is accepted and normalised.

    Every method takes an optional ``intrinsic=`` (the per-frame plane intrinsic, [4,4] / [3,3], batched
    where the method says so) that overrides the stored one for that call, so one object can describe the
    grid of a whole data set while intrinsics change per frame. Frozen and hashable (usable as a cache key).
    """

    grid_dims: tuple[int, int, int] = FRONT3D_GRID
    voxel_size: float = FRONT3D_VOXEL_SIZE
    depth_min: float = FRONT3D_DEPTH_RANGE[0]
    depth_max: float = FRONT3D_DEPTH_RANGE[1]
    truncation: float = FRONT3D_TRUNCATION
    plane_size: tuple[int, int] = FRONT3D_REDUCED_SIZE
    image_size: tuple[int, int] = FRONT3D_IMAGE_SIZE
    intrinsic: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "grid_dims", _check_size(self.grid_dims, "grid_dims", 3))
        put(self, "plane_size", _check_size(self.plane_size, "plane_size"))
        put(self, "image_size", _check_size(self.image_size, "image_size"))
        vs, dmin, dmax = float(self.voxel_size), float(self.depth_min), float(self.depth_max)
        if not (0 < dmin < dmax) or not vs > 0:
            raise ValueError(f"need 0 < depth_min < depth_max and voxel_size > 0, got {dmin}, {dmax}, {vs} "
                             "(3D-FRONT: 0.4, 6.0, 0.03)")
        trunc = float(self.truncation)
        if not (math.isfinite(trunc) and trunc > 0):
            raise ValueError(f"truncation must be a positive number of voxels, got {self.truncation} (3D-FRONT: 3)")
        put(self, "voxel_size", vs)
        put(self, "depth_min", dmin)
        put(self, "depth_max", dmax)
        put(self, "truncation", trunc)
        if self.intrinsic is not None:
            put(self, "intrinsic", _intrinsic_rows(self.intrinsic))

    # ------------------------------------------------------------------------------------------ constructors
    @classmethod
    def front3d(cls, **overrides: object) -> FrustumGeometry:
        """The 3D-FRONT reference grid (256^3, 3 cm, 0.4-6 m, truncation 3, 160x120 plane, front3d camera),
        with any field replaced by ``overrides``."""
        return cls(**overrides)  # type: ignore[arg-type]

    def with_intrinsic(self, intrinsic: ArrayLike | None, from_size: Sequence[int] | None = None
                       ) -> FrustumGeometry:
        """Copy that stores ``intrinsic`` as the plane intrinsic (None = back to the front3d default).

        ``from_size`` (W, H): the image ``intrinsic`` belongs to; it is rescaled to ``plane_size`` with
        :func:`rescale_intrinsic`. None means it already is the plane's intrinsic.
        """
        if intrinsic is not None and from_size is not None:
            intrinsic = rescale_intrinsic(intrinsic, from_size, self.plane_size)
        return replace(self, intrinsic=intrinsic)

    def rescaled(self, plane_size: Sequence[int]) -> FrustumGeometry:
        """Copy on another lifting plane (W, H); a stored intrinsic is rescaled with :func:`rescale_intrinsic`
        (None stays None, i.e. the front3d camera at the new size)."""
        size = _check_size(plane_size, "plane_size")
        k = None if self.intrinsic is None else rescale_intrinsic(self.intrinsic, self.plane_size, size)
        return replace(self, plane_size=size, intrinsic=k)

    # ------------------------------------------------------------------------------------------ accessors
    @property
    def depth_range(self) -> tuple[float, float]:
        """(depth_min, depth_max) in metres."""
        return self.depth_min, self.depth_max

    def grid_kwargs(self) -> dict[str, object]:
        """``grid_dims, voxel_size, depth_min, depth_max`` as keywords of the older function signatures."""
        return {"grid_dims": self.grid_dims, "voxel_size": self.voxel_size, "depth_min": self.depth_min,
                "depth_max": self.depth_max}

    def plane_intrinsic(self, intrinsic: ArrayLike | None = None, from_size: Sequence[int] | None = None
                        ) -> torch.Tensor:
        """float64 intrinsic of the lifting plane.

        ``intrinsic=None``: the stored one, else the front3d camera rescaled to ``plane_size``. Otherwise
        ``intrinsic`` (of an image of ``from_size`` (W, H), default ``image_size``; [...,4,4] or [...,3,3])
        rescaled to ``plane_size``.
        """
        if intrinsic is None:
            if self.intrinsic is None:
                return front3d_intrinsic(self.plane_size)
            return torch.tensor(self.intrinsic, dtype=torch.float64)
        return rescale_intrinsic(intrinsic, tuple(from_size or self.image_size), self.plane_size)

    def _k(self, intrinsic: ArrayLike | None) -> torch.Tensor:
        """The per-call plane intrinsic (as given, float64, batch dims kept) or the stored / default one."""
        if intrinsic is None:
            return self.plane_intrinsic()
        return _check_intrinsic(_as_f64(intrinsic))

    # ------------------------------------------------------------------------------------------ transforms
    def bounds(self, intrinsic: ArrayLike | None = None) -> FrustumBounds:
        """Voxel-unit bounding box of the frustum spanned by the plane's corners between depth_min and
        depth_max (``intrinsic`` may be batched [...,4,4]).

        The corners are the pixel positions (0, 0), (W, 0), (0, H), (W, H) -- the reference uses W and H, not
        W-1 and H-1 -- back-projected at both depths and divided by ``voxel_size``.
        """
        k = self._k(intrinsic)
        w, h = self.plane_size
        grid = torch.tensor(self.grid_dims, dtype=torch.float64)
        depth_min, depth_max, voxel_size = self.depth_min, self.depth_max, self.voxel_size
        fx, fy, cx, cy = _focal_centre(k)
        us = torch.tensor([0.0, w], dtype=torch.float64)
        vs = torch.tensor([0.0, h], dtype=torch.float64)
        zs = torch.tensor([depth_min, depth_max], dtype=torch.float64)
        # x = (u - cx) z / fx ; min/max over the 2x2x2 corner set, broadcast over leading batch dims.
        xs = (us[:, None] - cx[..., None, None]) * zs[None, :] / fx[..., None, None]  # [...,2,2]
        ys = (vs[:, None] - cy[..., None, None]) * zs[None, :] / fy[..., None, None]
        lo = torch.stack([xs.flatten(-2).amin(-1), ys.flatten(-2).amin(-1), torch.full_like(fx, depth_min)], -1)
        hi = torch.stack([xs.flatten(-2).amax(-1), ys.flatten(-2).amax(-1), torch.full_like(fx, depth_max)], -1)
        lo, hi = lo / voxel_size, hi / voxel_size
        dims = torch.ceil(hi - lo)
        exact = (grid - dims) / 2
        if bool((exact < 0).any()):
            raise ValueError(f"grid_dims {tuple(grid.int().tolist())} is smaller than the frustum box "
                             f"{tuple(dims.int().tolist())}; increase grid_dims or voxel_size")
        return FrustumBounds(lo, dims, torch.floor(exact), exact)

    def camera_to_grid(self, intrinsic: ArrayLike | None = None) -> torch.Tensor:
        """4x4 (or [...,4,4] for batched intrinsics) affine map: camera metres -> continuous voxel coordinates.

        ``voxel = p_cam / voxel_size - min_corner + padding`` with padding = floor((grid - dims)/2).
        """
        b = self.bounds(intrinsic)
        m = torch.zeros(*b.min_corner.shape[:-1], 4, 4, dtype=torch.float64)
        idx = torch.arange(3)
        m[..., idx, idx] = 1.0 / self.voxel_size
        m[..., :3, 3] = b.padding - b.min_corner
        m[..., 3, 3] = 1.0
        return m

    def grid_to_camera(self, intrinsic: ArrayLike | None = None) -> torch.Tensor:
        """Inverse of :meth:`camera_to_grid` (continuous voxel coordinates -> camera metres)."""
        b = self.bounds(intrinsic)
        m = torch.zeros(*b.min_corner.shape[:-1], 4, 4, dtype=torch.float64)
        idx = torch.arange(3)
        m[..., idx, idx] = self.voxel_size
        m[..., :3, 3] = (b.min_corner - b.padding) * self.voxel_size
        m[..., 3, 3] = 1.0
        return m

    def voxel_sample_offset(self, sampling: str, intrinsic: ArrayLike | None = None) -> torch.Tensor:
        """Continuous grid coordinate of voxel ``i`` minus ``i`` under a sampling convention (module doc)."""
        if sampling not in _SAMPLINGS:
            raise ValueError(f"sampling must be one of {_SAMPLINGS}, got {sampling!r}")
        if sampling == "center":
            return torch.full((3,), 0.5, dtype=torch.float64)
        b = self.bounds(intrinsic)
        frac = b.padding_exact - b.padding  # 0 or 0.5 per axis
        if sampling == "reference":
            return -torch.ceil(frac)
        return -1.0 - frac  # toolkit

    # ------------------------------------------------------------------------------------------ projection
    def project_voxels(self, coords: ArrayLike, intrinsic: ArrayLike | None = None, sampling: str = "toolkit"
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project integer voxel indices [N,3] to pixel coordinates and metric depth (float64 each [N]).

        ``sampling`` selects the continuous point that stands for a voxel (module doc); the default reproduces
        the toolkit's ``BackProjection`` mapping. One (unbatched) intrinsic.
        """
        k = self._k(intrinsic)
        if k.dim() != 2:
            raise ValueError("project_voxels takes a single intrinsic [4,4] or [3,3]; loop over the batch")
        c = _as_f64(coords)
        if c.dim() != 2 or c.shape[1] != 3:
            raise ValueError(f"coords must be [N,3] voxel indices, got {tuple(c.shape)}")
        kc = k.cpu()
        c2g = self.camera_to_grid(kc).to(c.device)
        off = self.voxel_sample_offset(sampling, kc).to(c.device)
        return _project_grid_points(c + off, k.to(c.device), c2g)

    def inside_image(self, u: Tensor, v: Tensor, depth: Tensor, sampling: str = "toolkit") -> Tensor:
        """Bool mask of projected voxels that see a pixel of the plane: the image test of ``sampling`` (module
        doc) and depth in [depth_min, depth_max]."""
        return _inside(u, v, depth, self.plane_size, self.depth_min, self.depth_max, sampling)

    def frustum_mask(self, intrinsic: ArrayLike | None = None, sampling: str = "reference") -> torch.Tensor:
        """Analytic view-frustum mask (bool [X,Y,Z], camera convention): the voxel's sample point projects into
        the plane and its depth lies in [depth_min, depth_max].

        ``sampling="reference"`` (default) reproduces how the 3D-FRONT data were generated: the mask is built in
        a frame mirrored on x and y (the frame the stored geometry is in), with the mirrored intrinsic
        ``cx' = W-1-cx``, ``cy' = H-1-cy``, the lower-corner / padding-rounded-up sampling, and is then flipped
        on axes (0, 1) into the camera convention. For front3d this equals ``flip(stored frustum_mask.npz,
        (0, 1))`` -- the mask the toolkit uses -- voxel for voxel, and it contains every GT surface voxel of the
        flipped geometry; it agrees with the unflipped stored file on 99.56 % of voxels. ``"center"`` /
        ``"toolkit"`` evaluate the rule directly in the camera frame (module doc).
        """
        k = self._k(intrinsic)
        if k.dim() != 2:
            raise ValueError("frustum_mask takes a single intrinsic [4,4] or [3,3]")
        if sampling == "reference":
            w, h = self.plane_size
            mirrored = k.clone()
            mirrored[0, 2] = w - 1 - k[0, 2]
            mirrored[1, 2] = h - 1 - k[1, 2]
            return self._direct_frustum_mask(mirrored, sampling).flip(0, 1)
        return self._direct_frustum_mask(k, sampling)

    def frustum(self, intrinsic: ArrayLike | None = None) -> torch.Tensor:
        """:meth:`frustum_mask` with the reference sampling (the mask the data and the toolkit use)."""
        return self.frustum_mask(intrinsic)

    def _direct_frustum_mask(self, k: torch.Tensor, sampling: str) -> torch.Tensor:
        """The sampling rule evaluated in the frame of ``k`` (no mirroring)."""
        c2g = self.camera_to_grid(k)
        off = self.voxel_sample_offset(sampling, k)
        ax = [torch.arange(n, dtype=torch.float64) + off[i] for i, n in enumerate(self.grid_dims)]
        gx, gy, gz = ax[0][:, None, None], ax[1][None, :, None], ax[2][None, None, :]
        scale = c2g[0, 0]
        x = (gx - c2g[0, 3]) / scale
        y = (gy - c2g[1, 3]) / scale
        z = (gz - c2g[2, 3]) / scale
        fx, fy, cx, cy = _focal_centre(k)
        u = x * fx / z + cx  # [X,1,Z]
        v = y * fy / z + cy  # [1,Y,Z]
        return _inside(u, v, z, self.plane_size, self.depth_min, self.depth_max, sampling)

    def kept_mask(self, depth_map: ArrayLike | None = None, frustum: ArrayLike | None = None,
                  intrinsic: ArrayLike | None = None, sampling: str = "toolkit") -> KeptMapping:
        """Toolkit/BUOL ``get_kept_mapping`` for one image.

        A voxel is kept when it is inside ``frustum`` (all voxels when None), its sample point has depth in
        [depth_min, depth_max] and projects to 0 <= u < W, 0 <= v < H (toolkit sampling). ``mapping`` holds
        (u, v, z_index, depth) for kept voxels and -1 elsewhere (the toolkit's 5-channel mapping minus the
        batch index). ``depth_map`` (H, W), when given, is only checked against ``plane_size`` (the toolkit
        reads just its shape).
        """
        if depth_map is not None:
            dshape = tuple(np.shape(depth_map))[-2:]
            if (dshape[1], dshape[0]) != self.plane_size:
                raise ValueError(f"depth_map has (H,W)={dshape} but the plane size (W,H) is {self.plane_size}; "
                                 "use geometry.rescaled((W, H)) for another plane")
        k = self._k(intrinsic)
        gd = self.grid_dims
        if frustum is None:
            fm = torch.ones(gd, dtype=torch.bool)
        else:
            fm = torch.as_tensor(np.asarray(frustum) if not isinstance(frustum, torch.Tensor) else frustum).bool()
            if tuple(fm.shape) != gd:
                raise ValueError(f"frustum mask shape {tuple(fm.shape)} != grid_dims {gd}")
            fm = fm.cpu()
        idx = torch.nonzero(fm)
        u, v, z = self.project_voxels(idx, k, sampling)
        ok = _inside(u, v, z, self.plane_size, self.depth_min, self.depth_max, sampling)
        idx = idx[ok]
        kept = torch.zeros(gd, dtype=torch.bool)
        kept[idx[:, 0], idx[:, 1], idx[:, 2]] = True
        mapping = torch.full((*gd, 4), -1.0, dtype=torch.float64)
        mapping[idx[:, 0], idx[:, 1], idx[:, 2]] = torch.stack([u[ok], v[ok], idx[:, 2].double(), z[ok]], -1)
        return KeptMapping(kept, mapping)


def _direct_frustum_mask(k, size, gd, voxel_size, depth_min, depth_max, sampling) -> torch.Tensor:
    """The sampling rule evaluated in the frame of ``k`` without the reference mirroring (the generator's
    stored orientation for ``"reference"``); tests compare it with the stored mask file."""
    geometry = FrustumGeometry(grid_dims=tuple(gd), voxel_size=voxel_size, depth_min=depth_min,
                               depth_max=depth_max, plane_size=tuple(size))
    return geometry._direct_frustum_mask(_check_intrinsic(_as_f64(k)), sampling)


def _project_grid_points(
    g: torch.Tensor, k: torch.Tensor, c2g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Continuous grid points [...,3] -> (u, v, depth) with a single (unbatched) intrinsic/transform."""
    scale = c2g[0, 0]
    p = (g - c2g[:3, 3]) / scale  # camera metres (c2g is a scale plus a translation)
    fx, fy, cx, cy = _focal_centre(k)
    z = p[..., 2]
    u = p[..., 0] * fx / z + cx
    v = p[..., 1] * fy / z + cy
    return u, v, z


def _inside(u, v, z, size, depth_min, depth_max, sampling):
    w, h = size
    if sampling == "toolkit":
        # toolkit: u < W, v < H and (through its "mapping >= 0" test) u, v >= 0.
        in_img = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    else:
        # the pixel round(u), round(v) exists
        in_img = (u >= -0.5) & (u < w - 0.5) & (v >= -0.5) & (v < h - 0.5)
    return in_img & (z >= depth_min) & (z <= depth_max)
