"""Allocate large per-sample tensors in shared memory when running inside a DataLoader worker.

A 256^3 sample carries ~300 MB of volumes. Tensors built in ordinary memory are copied once more into
shared memory when the worker sends them; allocating them there from the start (as torch's default
collate does for its stacked output) removes that copy. Outside workers this is plain ``torch.empty``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import get_worker_info


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised tensor; in a DataLoader worker its storage lives in shared memory."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    numel = int(np.prod(shape)) if shape else 1
    storage = proto._typed_storage()._new_shared(numel, device=proto.device)
    return proto.new(storage).view(shape)


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zero tensor without touching its pages: a freshly created shared-memory segment (shm_open +
    ftruncate) and ``np.zeros`` (calloc) are both zero-filled lazily by the kernel, so sparse masks only
    pay for the pages they write."""
    if get_worker_info() is None:
        return torch.from_numpy(np.zeros(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))
    return empty(shape, dtype)


def from_array(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Copy a numpy array (any strides, e.g. a flipped view) into a new tensor of ``dtype``."""
    out = empty(tuple(arr.shape), dtype)
    np.copyto(out.numpy(), arr, casting="unsafe")
    return out
