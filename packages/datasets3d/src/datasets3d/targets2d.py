"""2D panoptic targets from a segmap: one mask per kept instance, then one per present stuff class.

Rule (as the toolkit): every instance id > 0 with *more than* ``min_instance_pixels`` pixels becomes a
mask, labelled by the majority semantic class of its pixels; it is skipped when that class is void or
stuff. Then every stuff class present in the semantic map gets one mask. The order of the returned
masks is the order of the 3D instance masks built in :mod:`datasets3d.targets3d`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Instances2D:
    """Per-segment 2D targets, all arrays with leading dimension n (may be 0)."""

    labels: np.ndarray  # int64 [n] train ids
    masks: np.ndarray  # bool [n,H,W]
    instance_ids: np.ndarray  # int64 [n] raw instance id (things) or 0 (stuff segments)
    is_thing: np.ndarray  # bool [n]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def majority_label(values: np.ndarray, exclude: set[int]) -> int:
    """Most frequent value not in ``exclude`` (ties -> smallest id); 0 when nothing remains."""
    if values.size == 0:
        return 0
    counts = np.bincount(values.ravel())
    for e in exclude:
        if e < len(counts):
            counts[e] = 0
    return int(counts.argmax()) if counts.max() > 0 else 0


def build_instances_2d(
    semantic: np.ndarray,
    instance: np.ndarray,
    stuff_ids: tuple[int, ...],
    min_instance_pixels: int,
) -> Instances2D:
    """Build the target list from train-id ``semantic`` (0 = void) and raw ``instance`` maps (H, W)."""
    h, w = semantic.shape
    labels: list[int] = []
    masks: list[np.ndarray] = []
    ids: list[int] = []
    things: list[bool] = []
    exclude = {0, *stuff_ids}
    inst = instance.ravel()
    sem = semantic.ravel()
    if inst.size:
        order = np.argsort(inst, kind="stable")
        sorted_ids = inst[order]
        uniq, starts, counts = np.unique(sorted_ids, return_index=True, return_counts=True)
        for iid, start, count in zip(uniq.tolist(), starts.tolist(), counts.tolist(), strict=True):
            if iid <= 0 or count <= min_instance_pixels:
                continue
            pix = order[start : start + count]
            label = majority_label(sem[pix], exclude)
            if label == 0:
                continue
            m = np.zeros(h * w, dtype=bool)
            m[pix] = True
            labels.append(label)
            masks.append(m.reshape(h, w))
            ids.append(iid)
            things.append(True)
    present = set(np.unique(sem).tolist())
    for c in stuff_ids:
        if c in present:
            labels.append(c)
            masks.append(semantic == c)
            ids.append(0)
            things.append(False)
    return Instances2D(
        labels=np.asarray(labels, dtype=np.int64),
        masks=np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool),
        instance_ids=np.asarray(ids, dtype=np.int64),
        is_thing=np.asarray(things, dtype=bool),
    )


def resize_nearest(arr: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of the first two axes to (W, H), sampling pixel centres."""
    h, w = arr.shape[:2]
    tw, th = size_wh
    if (w, h) == (tw, th):
        return arr
    rows = np.minimum(((np.arange(th) + 0.5) * h / th).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(tw) + 0.5) * w / tw).astype(np.int64), w - 1)
    return arr[rows[:, None], cols[None, :]]
