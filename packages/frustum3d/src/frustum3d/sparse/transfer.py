"""Small host values (grid extents, box corners, kernel offsets) on a device without making the host wait.

A plain ``torch.tensor(values, device="cuda")`` or ``host.to("cuda")`` copies from pageable memory, and torch
then synchronises the stream (a blocking copy waits until the device has run everything queued before it): in a
training step bound by the host, every such copy throws away the host's lead over the device. Copied from pinned
memory with ``non_blocking=True`` the copy is queued like a kernel; the pinned block is reused only after the copy
has run (torch's caching host allocator records an event for it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["host_to_device"]


def host_to_device(values: Sequence[int] | Sequence[float] | Tensor, device: torch.device | str,
                   dtype: torch.dtype = torch.int64) -> Tensor:
    """``values`` (a host sequence or CPU tensor) as a ``dtype`` tensor on ``device``; on CUDA through pinned
    memory and an asynchronous copy (module docstring). Must not run inside CUDA-graph capture."""
    host = values.to(dtype=dtype) if isinstance(values, Tensor) else torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
