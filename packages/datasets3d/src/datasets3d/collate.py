"""Batch collation for sample dicts.

* Per-segment keys (:data:`datasets3d.sample.SEGMENT_KEYS`: labels, masks, 3D masks, ...) stay lists, one
  entry per sample: their first dimension is the frame's segment count.
* Other tensors are stacked when all shapes agree, else padded to the largest shape with a per-key fill
  (``sem_seg`` ignore 255, ``inst_seg`` -1, depth / masks / images 0) and stacked; the unpadded
  (H, W) sizes are then in ``batch["sizes"][key]``.
* Non-tensors (``meta``) become lists.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import get_worker_info

from .sample import SEGMENT_KEYS

PAD_VALUES = {"sem_seg": 255, "inst_seg": -1}


def _stack(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``; inside a DataLoader worker the result is allocated in shared memory directly
    (as torch's default collate does), which saves one copy of every 256^3 volume per batch."""
    first = values[0]
    if len(values) == 1:
        return first.unsqueeze(0)  # a view: no copy, and storage already in shared memory stays there
    if get_worker_info() is None:
        return torch.stack(list(values))
    numel = sum(v.numel() for v in values)
    storage = first._typed_storage()._new_shared(numel, device=first.device)
    out = first.new(storage).resize_(len(values), *first.shape)
    return torch.stack(list(values), out=out)


def pad_stack(tensors: Sequence[torch.Tensor], fill: float | int = 0) -> torch.Tensor:
    """Stack tensors of equal rank, padding each dimension at its end to the largest size."""
    shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    out = torch.full((len(tensors), *shape), fill, dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        out[(i, *(slice(0, n) for n in t.shape))] = t
    return out


def collate_samples(samples: Sequence[dict], ignore_label: int = 255) -> dict:
    """Collate a list of sample dicts (see module docstring)."""
    if not samples:
        raise ValueError("collate_samples needs at least one sample")
    batch: dict = {}
    sizes: dict = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key in SEGMENT_KEYS or not all(isinstance(v, torch.Tensor) for v in values):
            batch[key] = values
            continue
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) == 1:
            batch[key] = _stack(values)
        else:
            if len({v.dim() for v in values}) != 1:
                raise ValueError(f"cannot collate {key!r}: tensors of different rank {sorted(shapes)}")
            fill = ignore_label if key == "sem_seg" else PAD_VALUES.get(key, 0)
            batch[key] = pad_stack(values, fill)
            sizes[key] = [tuple(v.shape) for v in values]
    if sizes:
        batch["sizes"] = sizes
    return batch
