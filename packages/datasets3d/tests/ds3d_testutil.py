"""Shared helpers: locating the shared fixtures and writing small hand-made datasets in both layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from datasets3d.colormap import default_colormap
from datasets3d.io import save_depth_exr, save_npz
from PIL import Image


def shared_dir() -> Path:
    """``../shared`` next to the repository root (walk up from this file to the folder holding .git/uv.lock)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "uv.lock").is_file() or (parent / ".git").exists():
            return parent.parent / "shared"
    return here.parents[3].parent / "shared"


FIXTURES = shared_dir() / "fixtures"
FRONT3D_REAL = FIXTURES / "front3d-real"
MATTERPORT_REAL = FIXTURES / "matterport-real"

needs_front3d_real = pytest.mark.skipif(not FRONT3D_REAL.is_dir(), reason=f"shared fixture {FRONT3D_REAL} absent")
needs_matterport_real = pytest.mark.skipif(not MATTERPORT_REAL.is_dir(),
                                           reason=f"shared fixture {MATTERPORT_REAL} absent")

GRID = 32
W, H = 40, 30
VOXEL = 0.03 * 256 / GRID  # so the 0.4-6 m frustum fits a 32^3 grid


def _write_meta(root: Path, entries: list[dict], colormap: list[dict] | None = None) -> None:
    (root / "meta").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        (root / "meta" / f"{split}.json").write_text(json.dumps(entries))
    (root / "meta" / "colormap.json").write_text(json.dumps(colormap or default_colormap()))


def handmade_2d(h: int = H, w: int = W) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Semantic / instance maps and depth with known content.

    Left third: wall (10, 2D instance 50); bottom rows: floor (11, instance 51); a chair (3) instance 7 of
    10x10 = 100 px; a table (5) instance 8 of 4x5 = 20 px (below a 50 px filter); one void pixel.
    """
    sem = np.full((h, w), 10, dtype=np.uint32)
    ins = np.full((h, w), 50, dtype=np.uint32)
    sem[24:, :] = 11
    ins[24:, :] = 51
    sem[5:15, 20:30] = 3
    ins[5:15, 20:30] = 7
    sem[2:6, 32:37] = 5
    ins[2:6, 32:37] = 8
    sem[0, 0] = 0
    ins[0, 0] = 0
    depth = np.linspace(1.0, 3.0, h * w, dtype=np.float32).reshape(h, w)
    return sem, ins, depth


def handmade_volumes(grid: int = GRID) -> dict[str, np.ndarray]:
    """Camera-convention volumes with an asymmetric pattern so that any wrong flip is detected."""
    x, y, z = np.meshgrid(np.arange(grid), np.arange(grid), np.arange(grid), indexing="ij")
    geometry = ((x * 7 + y * 3 + z) % 13).astype(np.float32)  # 0..12, asymmetric in every axis
    sem = np.zeros((grid,) * 3, dtype=np.int32)
    ins = np.zeros((grid,) * 3, dtype=np.int32)
    sem[2:6, 20:24, 10:14] = 3  # chair instance 7, in a corner (x low, y high)
    ins[2:6, 20:24, 10:14] = 7
    sem[20:30, 28:30, :] = 11  # floor slab
    sem[0:2, :, 25:30] = 10  # wall
    sem[10:12, 3:5, 3:5] = 5  # table instance 8 (too small in 2D, present in 3D)
    ins[10:12, 3:5, 3:5] = 8
    weighting = (1 + (x > y) + 2 * (z > 20)).astype(np.int16)
    frustum = (x + 2 * y < 60) & (z > 2)
    return {"geometry": geometry, "semantic": sem, "instance": ins, "weighting": weighting, "frustum": frustum}


def write_front3d(root: Path, scene: str = "scene-a", image_id: str = "0007", depth_format: str = "exr",
                  colormap: list[dict] | None = None, segmentation_layout: str = "channels_first") -> dict:
    """A one-frame 3D-FRONT-layout dataset whose stored volumes are the flipped camera-convention ones."""
    sem, ins, depth = handmade_2d()
    vol = handmade_volumes()
    d = root / "data" / scene
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W, 3), 100, dtype=np.uint8)).save(d / f"rgb_{image_id}.png")
    if depth_format == "exr":
        save_depth_exr(d / f"depth_{image_id}.exr", depth)
    else:
        np.save(d / f"depth_{image_id}.npy", depth)
    save_npz(d / f"segmap_{image_id}.mapped.npz", data=np.stack([sem, ins], axis=-1))
    save_npz(d / f"geometry_{image_id}.npz", data=np.flip(vol["geometry"], (0, 1)).astype(np.float64))
    seg = np.stack([vol["semantic"], vol["instance"]])
    seg = np.flip(seg, (1, 2))
    if segmentation_layout == "channels_last":
        seg = np.moveaxis(seg, 0, -1)
    save_npz(d / f"segmentation_{image_id}.mapped.npz", data=np.ascontiguousarray(seg))
    save_npz(d / f"weighting_{image_id}.npz", data=np.flip(vol["weighting"], (0, 1)))
    # Stored mask = flip of the camera-convention frustum, as the toolkit's flip expects.
    save_npz(root / "meta" / "frustum_mask.npz", mask=np.flip(vol["frustum"], (0, 1)))
    _write_meta(root, [{"scene_id": scene, "image_id": image_id, "height": H, "width": W}], colormap)
    return vol


def write_matterport(root: Path, scene: str = "SCENE", name: str = "abc123", angle: str = "1", rot: str = "4",
                     room_mask: bool = False) -> dict:
    """A one-frame Matterport-layout dataset (no flips, signed geometry, mask True outside the frustum)."""
    sem, ins, depth = handmade_2d()
    sem[sem == 10] = 12  # make the wall a ceiling here: Matterport has ceiling as a real stuff class
    vol = handmade_volumes()
    d = root / "data" / scene
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W, 3), 90, dtype=np.uint8)).save(d / f"{name}_i{angle}_{rot}.jpg")
    raw = np.round(depth * 4000).astype(np.uint16)
    raw[0, :5] = 0  # missing depth
    raw[1, :3] = 30000  # 7.5 m, out of range
    dg = root / "depth_gen" / scene
    dg.mkdir(parents=True, exist_ok=True)
    Image.fromarray(raw).save(dg / f"{name}_d{angle}_{rot}.png")
    k = np.array([[35.0, 0, 19.7, 0], [0, 33.0, 15.2, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.save(d / f"{name}_intrinsics_{angle}.npy", k.reshape(-1))
    room = np.zeros((H, W), dtype=np.uint32)
    save_npz(d / f"{name}_segmap{angle}_{rot}.mapped.npz", data=np.stack([sem, ins, room], axis=-1))
    signed = np.where(vol["frustum"], vol["geometry"], -12.0).astype(np.float32)
    signed[::2] *= -1  # signed distances: the reader must take the absolute value
    save_npz(d / f"{name}_geometry{angle}_{rot}.npz", data=signed, mask=~vol["frustum"])
    save_npz(d / f"{name}_segmentation{angle}_{rot}.mapped.npz", data=np.stack([vol["semantic"], vol["instance"]]))
    save_npz(d / f"{name}_weighting{angle}_{rot}.npz", data=vol["weighting"])
    if room_mask:
        rm = np.full((H, W), 255, dtype=np.uint8)
        rm[:, :10] = 0
        (root / "room_mask" / scene).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rm).save(root / "room_mask" / scene / f"{name}_rm{angle}_{rot}.png")
    _write_meta(root, [{"scene_id": scene, "image_id": f"{name}_{angle}_{rot}", "height": H, "width": W}])
    return {**vol, "intrinsic": k, "depth_raw": raw}


def small_config(**kw) -> dict:
    """Keyword arguments for DatasetConfig sized for the hand-made 40x30 / 32^3 data."""
    base = dict(target_size=(W, H), reduced_target_size=(W // 2, H // 2), depth_size=(H // 2, W // 2),
                voxel_size=VOXEL, min_instance_pixels=50, num_thing_classes=9)
    base.update(kw)
    return base
