"""The training sample: what one ``Dataset.__getitem__`` returns (a plain dict of tensors + ``meta``).

Sizes: ``target_size`` = (W, H), ``reduced_target_size`` = (w, h), ``depth_size`` = (h_d, w_d), grid
``G = (X, Y, Z)`` from the geometry file (256^3 for the released data), half grid ``G/2``, quarter ``G/4``.
``n`` = number of 2D/3D segments (kept thing instances first, then one per present stuff class).

Always present
    image               float32 [3, H, W]   RGB, 0..255, resized to target_size (bilinear)
    intrinsic           float32 [4, 4]      pinhole intrinsic at target_size
    intrinsic_reduced   float32 [4, 4]      intrinsic at reduced_target_size (the lifting plane)
    depth               float32 [H, W]      metres, nearest-resized; 0 where invalid / outside depth range
    depth_reduced       float32 [h_d, w_d]  the same at depth_size (the back-projection plane)
    sem_seg             int64   [H, W]      train ids, ignore_label (255) for void
    inst_seg            int64   [H, W]      raw instance ids (0 = none)
    room_mask           bool    [H, W]      Matterport room mask (all True when absent / for 3D-FRONT)
    room_mask_reduced   bool    [h_d, w_d]
    labels              int64   [n]         train id of each segment
    masks               bool    [n, H, W]   2D mask of each segment
    instance_ids        int64   [n]         raw instance id (things) or 0 (stuff)
    is_thing            bool    [n]
    mean_depths         float32 [n]         mean valid depth inside each mask (0 if none)
    meta                dict                scene_id, image_id, key, dataset, index, image_size (W, H) on
                                            disk, notes (list of str, e.g. "room mask absent"); with
                                            augmentation also ``augment`` (what was drawn and done, see
                                            :mod:`datasets3d.augment`)

With augmentation (off by default) H, W, h_d, w_d and the reduced size are those of the resized / cropped
image (``meta["augment"]`` holds them), and a flip mirrors every key above together (README "Augmentations").

When geometry is loaded (enable_3d, enable_mp_occ or eval_targets)
    frustum_mask        bool    [X, Y, Z]   view frustum in camera-convention grid orientation; for 3D-FRONT
                                            one tensor shared by all samples of a split (treat read-only)
    camera_to_grid      float32 [4, 4]      camera metres -> continuous voxel coordinates (frustum3d.geometry;
                                            built on the grid plane, see DatasetConfig)

When enable_mp_occ
    mp_occ              bool    [X, Y, Z]   TDF < truncation_range[1] (cast to float on the device); with
                                            enable_3d it is the same tensor object as occupancy_256

When enable_3d (all volumes in camera convention: axis 0 = x right, 1 = y down, 2 = depth)
    geometry            float32 [X, Y, Z]   clip(TDF, truncation_range) in voxel units
    occupancy_256       bool    [X, Y, Z]   TDF < truncation_range[1]
    occupancy_128       bool    [G/2]       trilinear x0.5 TDF < occ_truncation_lvl[1]
    occupancy_64        bool    [G/4]       trilinear x0.25 TDF < occ_truncation_lvl[0]
    masks_3d_256        bool    [n, X, Y, Z] per segment (same order as ``labels``)
    masks_3d_128        bool    [n, G/2]     max_pool3d (4, 2, 1)
    masks_3d_64         bool    [n, G/4]     max_pool3d (8, 4, 2)
    weighting_256       float32 [X, Y, Z]   per-voxel loss weights
    weighting_128       float32 [G/2]       trilinear
    weighting_64        float32 [G/4]       trilinear
    semantic_3d         uint8   [X, Y, Z]   (with semantic_3d_target) train id of every labelled voxel, 0 elsewhere:
                                            all GT segments, also those no 2D target shows

When eval_targets (PRQ ground truth, resolution G / downsample_factor)
    eval_masks          bool    [m, G/d]    thickened surface segments AND frustum
    eval_labels         int64   [m]
    eval_instance_ids   int64   [m]         raw 3D instance id or 0 for stuff
    eval_is_thing       bool    [m]
    eval_frustum        bool    [G/d]

The names ``*_256/128/64`` denote the full / half / quarter level (named after the default grid); with a
64^3 test grid ``occupancy_256`` is 64^3.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .augment import AugmentPlan
from .augment2d import Planar, augment_planar
from .colormap import LabelSpace
from .config import DatasetConfig
from .eval_targets import build_eval_segments
from .frame import RawFrame
from .targets2d import build_instances_2d, resize_nearest
from .targets3d import LabelIndex, mp_occ_target, occupancy_targets, segment_masks_3d, weighting_targets

#: keys whose first dimension is the per-frame segment count (never stacked by the collate function)
SEGMENT_KEYS = (
    "labels", "masks", "instance_ids", "is_thing", "mean_depths", "masks_3d_256", "masks_3d_128", "masks_3d_64",
    "eval_masks", "eval_labels", "eval_instance_ids", "eval_is_thing",
)


def _resize_rgb(rgb: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    if (rgb.shape[1], rgb.shape[0]) == tuple(size_wh):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(size_wh, Image.BILINEAR))


def valid_depth(depth: np.ndarray, depth_min: float, depth_max: float) -> np.ndarray:
    """Depth with non-finite and out-of-range values set to 0 (0 = invalid)."""
    ok = np.isfinite(depth) & (depth >= depth_min) & (depth <= depth_max)
    return np.where(ok, depth, 0.0).astype(np.float32)


def planar_maps(frame: RawFrame, config: DatasetConfig) -> Planar:
    """The 2D maps and intrinsics of a frame resized to ``target_size`` / ``depth_size`` (numpy, no tensors)."""
    from frustum3d.geometry import rescale_intrinsic

    cfg = config
    tw, th = cfg.target_size
    dh, dw = cfg.depth_size
    depth = valid_depth(frame.depth, cfg.depth_min, cfg.depth_max)
    room = frame.room_mask if frame.room_mask is not None else np.ones(depth.shape, dtype=bool)
    return Planar(
        rgb=_resize_rgb(frame.rgb, cfg.target_size),
        depth=resize_nearest(depth, (tw, th)),
        semantic=resize_nearest(frame.semantic, (tw, th)),
        instance=resize_nearest(frame.instance, (tw, th)),
        room=resize_nearest(room, (tw, th)),
        depth_reduced=resize_nearest(depth, (dw, dh)),
        room_reduced=resize_nearest(room, (dw, dh)),
        k_target=rescale_intrinsic(frame.intrinsic, frame.image_size, cfg.target_size),
        k_reduced=rescale_intrinsic(frame.intrinsic, frame.image_size, cfg.reduced_target_size),
        reduced_size=tuple(cfg.reduced_target_size),  # type: ignore[arg-type]
    )


def semantic_volume(semantic_3d: np.ndarray, key: str) -> torch.Tensor:
    """The frame's 3D semantic labels as a uint8 volume (train ids fit a byte: the ignore label is 255)."""
    if semantic_3d.size and (int(semantic_3d.max()) > 255 or int(semantic_3d.min()) < 0):
        raise ValueError(f"{key}: 3D semantic labels span {int(semantic_3d.min())}..{int(semantic_3d.max())}, outside "
                         "0..255; check dataset.label_map")
    return torch.from_numpy(np.ascontiguousarray(semantic_3d, dtype=np.uint8))


def build_sample(frame: RawFrame, config: DatasetConfig, labels: LabelSpace, index: int = -1,
                 plan: AugmentPlan | None = None, augment_record: dict | None = None) -> dict:
    """Turn a :class:`RawFrame` into the sample dict documented in this module.

    With an augmentation ``plan`` the image-plane steps run on the resized maps before any target is
    derived; the volumes must already be flipped (:func:`datasets3d.augment3d.flip_volumes`) when the plan
    flips. ``augment_record`` (what was done to the volumes) goes to ``meta["augment"]`` with the 2D steps.
    """
    cfg = config
    p = planar_maps(frame, cfg)
    record = None
    if plan is not None:
        record = {**plan.record(), **(augment_record or {})}
        p = augment_planar(p, plan, cfg, record)
    depth_t, semantic, instance = p.depth, p.semantic, p.instance
    image = torch.from_numpy(np.ascontiguousarray(p.rgb.transpose(2, 0, 1))).float()

    inst2d = build_instances_2d(semantic, instance, labels.stuff_ids, cfg.min_instance_pixels)
    mean_depths = np.array(
        [depth_t[m][depth_t[m] > 0].mean() if (depth_t[m] > 0).any() else 0.0 for m in inst2d.masks],
        dtype=np.float32,
    )
    sem_seg = np.where(semantic == 0, cfg.ignore_label, semantic).astype(np.int64)
    sample: dict = {
        "image": image,
        "intrinsic": p.k_target.float(),
        "intrinsic_reduced": p.k_reduced.float(),
        "depth": torch.from_numpy(np.ascontiguousarray(depth_t)),
        "depth_reduced": torch.from_numpy(np.ascontiguousarray(p.depth_reduced)),
        "sem_seg": torch.from_numpy(np.ascontiguousarray(sem_seg)),
        "inst_seg": torch.from_numpy(np.ascontiguousarray(instance, dtype=np.int64)),
        "room_mask": torch.from_numpy(np.ascontiguousarray(p.room)),
        "room_mask_reduced": torch.from_numpy(np.ascontiguousarray(p.room_reduced)),
        "labels": torch.from_numpy(inst2d.labels),
        "masks": torch.from_numpy(inst2d.masks),
        "instance_ids": torch.from_numpy(inst2d.instance_ids),
        "is_thing": torch.from_numpy(inst2d.is_thing),
        "mean_depths": torch.from_numpy(mean_depths),
    }
    if frame.geometry is not None:
        sample["frustum_mask"] = frame.frustum_tensor()
        sample["camera_to_grid"] = torch.from_numpy(frame.camera_to_grid).float()
    if cfg.enable_3d:
        assert frame.geometry is not None and frame.semantic_3d is not None and frame.weighting is not None
        sample.update(occupancy_targets(frame.geometry, cfg.truncation_range, cfg.occ_truncation_lvl))
        label_index = LabelIndex(frame.semantic_3d, frame.instance_3d)
        sample.update(segment_masks_3d(label_index, inst2d.instance_ids, inst2d.labels, inst2d.is_thing,
                                       labels.stuff_ids))
        sample.update(weighting_targets(frame.weighting))
        if cfg.semantic_3d_target:
            sample["semantic_3d"] = semantic_volume(frame.semantic_3d, frame.entry.key)
    if cfg.enable_mp_occ and frame.geometry is not None:
        # |TDF| < t equals clip(TDF) < t: reuse occupancy_256 (same tensor) instead of a second 256^3 copy
        occ = sample.get("occupancy_256")
        sample["mp_occ"] = occ if occ is not None else mp_occ_target(frame.geometry, cfg.truncation_range[1])
    if cfg.eval_targets:
        assert frame.semantic_3d is not None and frame.instance_3d is not None
        seg = build_eval_segments(frame.semantic_3d, frame.instance_3d, frame.geometry, frame.frustum,
                                  labels.stuff_ids, cfg.iso_value, cfg.downsample_factor)
        sample.update(eval_masks=seg.masks, eval_labels=seg.labels, eval_instance_ids=seg.instance_ids,
                      eval_is_thing=seg.is_thing, eval_frustum=seg.frustum)
    sample["meta"] = {
        "scene_id": frame.entry.scene_id,
        "image_id": frame.entry.image_id,
        "key": frame.entry.key,
        "dataset": cfg.name,
        "index": index,
        "image_size": frame.image_size,
        "notes": list(frame.notes),
    }
    if record is not None:
        sample["meta"]["augment"] = record
    return sample
