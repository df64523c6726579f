"""Where each file of a frame lives, per dataset layout.

A split entry is ``{"scene_id", "image_id", "height", "width"}`` (optional ``"file_name"``). The layout
turns it into the paths of the frame's files. Paths are resolved without touching the disk except for
the depth file, whose suffix (``.exr`` or ``.npy`` for 3D-FRONT) is probed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import DatasetFormatError


@dataclass(frozen=True)
class FramePaths:
    """Paths of one frame. ``depth`` lists candidates in order of preference; the first existing is used."""

    rgb: Path
    depth: tuple[Path, ...]
    segmap: Path
    geometry: Path
    segmentation: Path
    weighting: Path
    intrinsic: Path | None = None
    room_mask: Path | None = None

    def existing_depth(self) -> Path | None:
        for p in self.depth:
            if p.is_file():
                return p
        return None


@dataclass(frozen=True)
class FrameEntry:
    """One validated split entry."""

    scene_id: str
    image_id: str
    height: int
    width: int
    file_name: str | None = None

    @property
    def key(self) -> str:
        return f"{self.scene_id}_{self.image_id}"


def parse_entry(raw: object, index: int, json_path: Path) -> FrameEntry:
    """Validate one split entry, naming the json file and the index on error."""
    if not isinstance(raw, dict):
        raise DatasetFormatError(f"{json_path} entry {index} is {type(raw).__name__}, expected an object")
    for key in ("scene_id", "image_id"):
        if key not in raw or raw[key] in (None, ""):
            raise DatasetFormatError(f"{json_path} entry {index} ({raw!r}) has no {key!r}; every entry needs one")
    try:
        height, width = int(raw.get("height", 0)), int(raw.get("width", 0))
    except (TypeError, ValueError) as exc:
        raise DatasetFormatError(f"{json_path} entry {index}: height/width must be integers ({raw!r})") from exc
    if height <= 0 or width <= 0:
        raise DatasetFormatError(
            f"{json_path} entry {index} ({raw!r}) needs positive 'height' and 'width' (the stored image size)"
        )
    return FrameEntry(str(raw["scene_id"]), str(raw["image_id"]), height, width, raw.get("file_name"))


def front3d_paths(root: Path, entry: FrameEntry) -> FramePaths:
    """3D-FRONT layout: ``data/<scene>/{rgb,depth,segmap,geometry,segmentation,weighting}_<id>.*``."""
    d = root / "data" / entry.scene_id
    i = entry.image_id
    rgb = Path(entry.file_name) if entry.file_name else d / f"rgb_{i}.png"
    if not rgb.is_absolute() and entry.file_name:
        rgb = root / rgb
    return FramePaths(
        rgb=rgb,
        depth=(d / f"depth_{i}.exr", d / f"depth_{i}.npy"),
        segmap=d / f"segmap_{i}.mapped.npz",
        geometry=d / f"geometry_{i}.npz",
        segmentation=d / f"segmentation_{i}.mapped.npz",
        weighting=d / f"weighting_{i}.npz",
    )


def split_matterport_id(image_id: str, where: str) -> tuple[str, str, str]:
    """``"<name>_<angle>_<rot>"`` -> (name, angle, rot); the toolkit requires exactly three parts."""
    parts = image_id.split("_")
    if len(parts) != 3 or not all(parts):
        raise DatasetFormatError(
            f"{where}: matterport image_id {image_id!r} must look like '<name>_<angle>_<rot>' (three '_' parts)"
        )
    return parts[0], parts[1], parts[2]


def matterport_paths(root: Path, entry: FrameEntry) -> FramePaths:
    """Matterport layout (Uni-3D / BUOL): RGB, intrinsics and 3D under ``data/``, depth under ``depth_gen/``.

    Depth candidates: ``depth_gen/<scene>/<name>_d<a>_<r>.png`` (BUOL re-rendered depth, what the
    toolkit reads), then ``data/<scene>/<name>_d<a>_<r>.png`` (Dahnert's original location).
    """
    name, a, r = split_matterport_id(entry.image_id, f"frame {entry.key}")
    d = root / "data" / entry.scene_id
    return FramePaths(
        rgb=d / f"{name}_i{a}_{r}.jpg",
        depth=(root / "depth_gen" / entry.scene_id / f"{name}_d{a}_{r}.png", d / f"{name}_d{a}_{r}.png"),
        segmap=d / f"{name}_segmap{a}_{r}.mapped.npz",
        geometry=d / f"{name}_geometry{a}_{r}.npz",
        segmentation=d / f"{name}_segmentation{a}_{r}.mapped.npz",
        weighting=d / f"{name}_weighting{a}_{r}.npz",
        intrinsic=d / f"{name}_intrinsics_{a}.npy",
        room_mask=root / "room_mask" / entry.scene_id / f"{name}_rm{a}_{r}.png",
    )
