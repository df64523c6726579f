"""Generate a synthetic dataset in the exact processed 3D-FRONT on-disk format.

``generate(out_dir, scenes, frames_per_scene, grid=256, image_size=(320, 240), seed=0)`` writes::

    meta/{train,val,test}.json   meta/frustum_mask.npz   meta/colormap.json   meta/camera.json
    data/<scene_id>/{rgb_<id>.png, depth_<id>.exr, segmap_<id>.mapped.npz, geometry_<id>.npz,
                     segmentation_<id>.mapped.npz, weighting_<id>.npz}

Volumes are computed in the camera convention of ``frustum3d.geometry`` and stored the way the real data
is stored: geometry and weighting flipped on axes (0, 1), segmentation on axes (1, 2) of its (2, X, Y, Z)
array, and the frustum mask flipped on (0, 1) so that the toolkit's flip (``flip_frustum_mask=True``)
brings it back onto the data. Depth is stored unflipped. ``meta/camera.json`` (an addition, ignored by
other readers) records the intrinsic, voxel size, grid and depth range; the reader uses it for
``name="synthetic"``.

Each scene draws from its own generator seeded by ``(seed, scene_index)``, so a scene does not depend on
how many scenes are generated, and output is deterministic for a seed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from frustum3d.geometry import FrustumGeometry

from ..checks import depth_alignment
from ..colormap import default_colormap
from ..io import save_depth_exr, save_image, save_json, save_npz
from ..targets3d import conservative_frustum
from .render import render
from .scene import Room, make_room
from .shapes import pitch_rotation, yaw_rotation
from .volume import FrustumGrid, voxelise


@dataclass(frozen=True)
class CameraSetup:
    intrinsic: tuple[float, float, float, float]  # at image_size
    image_size: tuple[int, int]
    reduced_size: tuple[int, int]
    grid: tuple[int, int, int]
    voxel_size: float
    depth_min: float
    depth_max: float

    def reduced_intrinsic(self) -> np.ndarray:
        from frustum3d.geometry import intrinsic_matrix, rescale_intrinsic

        return rescale_intrinsic(intrinsic_matrix(*self.intrinsic), self.image_size, self.reduced_size).numpy()

    def geometry(self) -> FrustumGeometry:
        """The generated grid as a :class:`frustum3d.geometry.FrustumGeometry` (reduced plane, its intrinsic)."""
        return FrustumGeometry(grid_dims=self.grid, voxel_size=self.voxel_size, depth_min=self.depth_min,
                               depth_max=self.depth_max, plane_size=self.reduced_size, image_size=self.image_size,
                               intrinsic=self.reduced_intrinsic())

    def camera_to_grid(self) -> np.ndarray:
        return self.geometry().camera_to_grid().numpy()

    def frustum(self) -> np.ndarray:
        """Conservative analytic frustum: voxels whose centre is inside the view frustum, dilated by one
        voxel (3x3x3), so that every voxel containing a visible surface point is in the mask."""
        return conservative_frustum(self.geometry())


def make_camera_setup(
    grid: int | tuple[int, int, int] = 256,
    image_size: tuple[int, int] = (320, 240),
    intrinsic: tuple[float, float, float, float] | None = None,
    voxel_size: float | None = None,
    depth_range: tuple[float, float] = (0.4, 6.0),
) -> CameraSetup:
    """Defaults: the 3D-FRONT intrinsic rescaled to ``image_size``; voxel 0.03 m at 256^3, scaled as
    0.03 * 256 / grid for smaller grids so that the 0.4-6 m frustum still fits; reduced plane = half size."""
    from frustum3d.geometry import FRONT3D_IMAGE_SIZE, FRONT3D_INTRINSIC, intrinsic_matrix, rescale_intrinsic

    g = (grid,) * 3 if isinstance(grid, int) else tuple(int(v) for v in grid)
    w, h = (int(v) for v in image_size)
    if intrinsic is None:
        k = rescale_intrinsic(intrinsic_matrix(*FRONT3D_INTRINSIC), FRONT3D_IMAGE_SIZE, (w, h)).numpy()
        intrinsic = (float(k[0, 0]), float(k[1, 1]), float(k[0, 2]), float(k[1, 2]))
    if voxel_size is None:
        voxel_size = 0.03 * 256 / min(g)
    return CameraSetup(tuple(float(v) for v in intrinsic), (w, h), (max(1, w // 2), max(1, h // 2)), g,  # type: ignore[arg-type]
                       float(voxel_size), float(depth_range[0]), float(depth_range[1]))


def _camera_pose(room: Room, rng: np.random.Generator, setup: CameraSetup, tries: int = 60):
    """Random pose inside the room at about 0.75 m height, looking roughly horizontally.

    Poses are accepted when a coarse rendering sees >= 90 % valid depth and some furniture; the best
    candidate is kept if none passes.
    """
    lx, height, lz = room.size
    fx, fy, cx, cy = setup.intrinsic
    w, h = setup.image_size
    coarse = min(w, 80)
    s = coarse / w
    k_coarse = (fx * s, fy * s, (cx + 0.5) * s - 0.5, (cy + 0.5) * s - 0.5)
    size_coarse = (coarse, max(1, round(h * s)))
    best, best_score = None, -1.0
    for attempt in range(tries):
        x, z = rng.uniform(0.4, lx - 0.4), rng.uniform(0.4, lz - 0.4)
        blocked = any(np.hypot(x - fx_, z - fz_) < fr + 0.3 for fx_, fz_, fr in room.footprints)
        if blocked and (best is not None or attempt < tries - 1):
            continue  # inside furniture; the last attempt is kept anyway so that a pose always exists
        target = np.array([rng.uniform(0.3, lx - 0.3), rng.uniform(0.3, lz - 0.3)])
        yaw = float(np.arctan2(target[0] - x, target[1] - z) + rng.normal(0.0, 0.3))
        pitch = float(np.deg2rad(rng.uniform(-6.0, 4.0)))
        cam_h = 0.75 + rng.uniform(-0.03, 0.03)
        rot = yaw_rotation(yaw) @ pitch_rotation(pitch)  # camera -> room
        pos = np.array([x, -cam_h, z])
        prims = [p.transformed(rot.T, -rot.T @ pos) for p in room.primitives]
        r = render(prims, k_coarse, size_coarse, np.array([0.0, -1.0, 0.0]), shade=False)
        valid = ((r.depth >= setup.depth_min) & (r.depth <= setup.depth_max)).mean()
        things = ((r.semantic >= 1) & (r.semantic <= 9)).mean()
        score = valid + min(things, 0.2)
        if score > best_score:
            best, best_score = (rot, pos, prims), score
        if valid >= 0.9 and things >= 0.05:
            break
    return best


def _split_scenes(n: int, extra_test: int = 0) -> dict[str, list[int]]:
    """Scenes per split: with >= 3 scenes about 80/10/10 (at least one each); else every split gets all.

    ``extra_test`` more scenes (``n .. n + extra_test - 1``) join the test split only, so the training and
    validation scenes stay those of ``n`` scenes alone."""
    idx = list(range(n))
    extra = list(range(n, n + extra_test))
    if n < 3:
        return {"train": idx, "val": idx, "test": idx + extra}
    n_val = n_test = max(1, round(0.1 * n))
    return {"train": idx[: n - n_val - n_test], "val": idx[n - n_val - n_test : n - n_test],
            "test": idx[n - n_test :] + extra}


def render_frame(room: Room, rng: np.random.Generator, setup: CameraSetup, fg: FrustumGrid,
                 truncation: float = 12.0):
    """One camera pose in ``room``: rendering (RGB, depth, segmap) and camera-convention volumes."""
    rot, pos, prims = _camera_pose(room, rng, setup)
    light_room = np.array([rng.uniform(-0.5, 0.5), -1.0, rng.uniform(-0.5, 0.5)])
    rendering = render(prims, setup.intrinsic, setup.image_size, rot.T @ light_room, rng)
    volumes = voxelise(prims, fg, truncation)
    return rendering, volumes


def generate(
    out_dir: str | Path,
    scenes: int,
    frames_per_scene: int,
    grid: int = 256,
    image_size: tuple[int, int] = (320, 240),
    seed: int = 0,
    intrinsic: tuple[float, float, float, float] | None = None,
    voxel_size: float | None = None,
    depth_range: tuple[float, float] = (0.4, 6.0),
    truncation: float = 12.0,
    ceiling_prob: float = 0.5,
    max_objects: int = 10,
    check: bool = True,
    class_tint: float = 0.0,
    extra_test_scenes: int = 0,
) -> dict:
    """Write ``(scenes + extra_test_scenes) * frames_per_scene`` frames under ``out_dir``; returns a summary dict.

    ``scenes`` are split about 80/10/10 into train/val/test; ``extra_test_scenes`` more scenes are added to the
    test split only (the same training scenes, a held-out measure over more unseen rooms).

    The summary holds counts, timings (``seconds``, ``seconds_per_frame``) and, when ``check``, the
    worst-frame geometry checks: ``min_frac_df_below_1.5`` (valid depth pixels back-projected onto
    voxels with distance < 1.5) and ``min_semantic_agreement`` (2D class == 3D class at those voxels).
    ``class_tint`` > 0 pulls furniture colours towards a typical colour per class (``scene.make_room``);
    it is recorded in ``meta/camera.json`` when set.
    """
    if scenes < 1 or frames_per_scene < 1 or extra_test_scenes < 0:
        raise ValueError(f"need scenes >= 1, frames_per_scene >= 1 and extra_test_scenes >= 0, got {scenes}, "
                         f"{frames_per_scene} and {extra_test_scenes}")
    out = Path(out_dir)
    setup = make_camera_setup(grid, image_size, intrinsic, voxel_size, depth_range)
    c2g = setup.camera_to_grid()
    frustum = setup.frustum()
    fg = FrustumGrid.build(frustum, c2g)
    k_full = np.eye(4)
    k_full[0, 0], k_full[1, 1], k_full[0, 2], k_full[1, 2] = setup.intrinsic
    t0 = time.perf_counter()
    c0 = time.process_time()
    w, h = setup.image_size
    entries: dict[int, list[dict]] = {}
    checks: list[dict] = []
    for s in range(scenes + extra_test_scenes):
        rng = np.random.default_rng([seed, s])
        room = make_room(rng, ceiling_prob=ceiling_prob, max_objects=max_objects, class_tint=class_tint)
        scene_id = f"synth-{seed:04d}-{s:05d}"
        folder = out / "data" / scene_id
        entries[s] = []
        for f in range(frames_per_scene):
            image_id = f"{f:04d}"
            rendering, vol = render_frame(room, rng, setup, fg, truncation)
            if check:
                st = depth_alignment(rendering.depth, k_full, c2g, vol.tdf, rendering.semantic.astype(np.int64),
                                     vol.semantic, (setup.depth_min, setup.depth_max))
                checks.append({"key": f"{scene_id}_{image_id}", **st.as_dict()})
            segmap = np.stack([rendering.semantic, rendering.instance], axis=-1).astype(np.uint32)
            save_image(folder / f"rgb_{image_id}.png", rendering.rgb)
            save_depth_exr(folder / f"depth_{image_id}.exr", rendering.depth)
            save_npz(folder / f"segmap_{image_id}.mapped.npz", data=segmap)
            save_npz(folder / f"geometry_{image_id}.npz", data=np.ascontiguousarray(np.flip(vol.tdf, (0, 1))))
            seg3d = np.stack([vol.semantic, vol.instance]).astype(np.int32)
            save_npz(folder / f"segmentation_{image_id}.mapped.npz", data=np.ascontiguousarray(np.flip(seg3d, (1, 2))))
            save_npz(folder / f"weighting_{image_id}.npz", data=np.ascontiguousarray(np.flip(vol.weighting, (0, 1))))
            entries[s].append({"scene_id": scene_id, "image_id": image_id, "height": h, "width": w})
    meta = out / "meta"
    save_npz(meta / "frustum_mask.npz", mask=np.ascontiguousarray(np.flip(frustum, (0, 1))))
    save_json(meta / "colormap.json", default_colormap())
    save_json(meta / "camera.json", {
        "intrinsic": list(setup.intrinsic), "image_size": list(setup.image_size),
        "reduced_size": list(setup.reduced_size), "grid": list(setup.grid), "voxel_size": setup.voxel_size,
        "depth_range": [setup.depth_min, setup.depth_max], "truncation": truncation,
        "generator": "datasets3d.synth", "seed": seed, **({"class_tint": class_tint} if class_tint else {}),
    })
    splits = _split_scenes(scenes, extra_test_scenes)
    for name, idx in splits.items():
        save_json(meta / f"{name}.json", [e for s in idx for e in entries[s]])
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    n = (scenes + extra_test_scenes) * frames_per_scene
    summary = {
        "out_dir": str(out), "scenes": scenes + extra_test_scenes, "frames": n, "grid": list(setup.grid),
        "image_size": list(setup.image_size), "voxel_size": setup.voxel_size, "seed": seed,
        "splits": {k: len(v) * frames_per_scene for k, v in splits.items()},
        "seconds": elapsed, "seconds_per_frame": elapsed / n, "cpu_seconds_per_frame": cpu / n,
    }
    if check:
        summary["min_frac_df_below_1.5"] = min(c["frac_df_below"] for c in checks)
        summary["mean_frac_df_below_1.5"] = float(np.mean([c["frac_df_below"] for c in checks]))
        agree = [c["semantic_agreement"] for c in checks if c["n_labelled"]]
        summary["min_semantic_agreement"] = min(agree) if agree else float("nan")
        summary["mean_semantic_agreement"] = float(np.mean(agree)) if agree else float("nan")
        summary["checks"] = checks
    return summary
