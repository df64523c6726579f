"""Device outputs to host arrays in one copy (the Predictor's results).

A 256^3 frame's volumes (TDF, panoptic and semantic ids) are 192 MiB. Copied one by one with ``.cpu()`` they are
five pageable transfers per frame, each a separate wait. :func:`start_host_copy` packs the tensors of a whole batch
into one device buffer of 4-byte words and copies it once into page-locked host memory (about twice the bandwidth
of a pageable copy), optionally on a copy stream of its own so that the host need not wait for it yet;
:meth:`HostCopy.arrays` waits for that copy only (work queued on other streams goes on) and returns views of the
host buffer, which torch's pinned-memory cache takes back once no array uses it. :func:`to_host` does both at once.

On the CPU the arrays share memory with the tensors, as ``tensor.numpy()`` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["HostCopy", "start_host_copy", "to_host"]

_WORD_DTYPES = {torch.float32: np.float32, torch.int32: np.int32}


class HostCopy:
    """A device-to-host copy in flight (:func:`start_host_copy`); :meth:`arrays` waits for it."""

    def __init__(self, tensors: list[torch.Tensor], packed: list[int], host: torch.Tensor | None,
                 done: Any) -> None:
        self._specs = [(tuple(t.shape), t.dtype, t.numel()) for t in tensors]
        self._packed = packed
        self._host = host
        self._done = done
        # tensors that do not travel in the packed buffer keep their own (eager) copy
        travel = set(packed)
        self._rest = {i: t.detach().cpu().numpy() for i, t in enumerate(tensors) if i not in travel}

    def arrays(self) -> list[np.ndarray]:
        """The host arrays, in the order given (waits for the copy the first time)."""
        if self._done is not None:
            self._done.synchronize()
            self._done = None
        out: list[np.ndarray | None] = [self._rest.get(i) for i in range(len(self._specs))]
        if self._host is not None:
            flat = self._host.numpy()  # keeps the host buffer (and its pinned block) alive while a view lives
            start = 0
            for i in self._packed:
                shape, dtype, n = self._specs[i]
                out[i] = flat[start:start + n].view(_WORD_DTYPES[dtype]).reshape(shape)
                start += n
        return out  # type: ignore[return-value]


def start_host_copy(tensors: list[torch.Tensor], stream: Any = None) -> HostCopy:
    """Start copying ``tensors`` to the host in one transfer of their float32 / int32 ones (others take a
    ``.cpu()`` copy now). ``stream``: a CUDA stream to copy on (it first waits for the current stream's work);
    ``None`` copies on the current stream."""
    packed = [i for i, t in enumerate(tensors) if t.dtype in _WORD_DTYPES and t.is_cuda]
    if not packed:  # nothing on a CUDA device to pack (the CPU, or other dtypes only)
        return HostCopy(tensors, [], None, None)
    words = torch.cat([tensors[i].detach().reshape(-1).view(torch.int32) for i in packed])
    host = torch.empty(words.shape, dtype=torch.int32, pin_memory=True)
    here = torch.cuda.current_stream(words.device)
    copy_stream = here if stream is None else stream
    if copy_stream is not here:
        copy_stream.wait_stream(here)
        words.record_stream(copy_stream)  # made on this stream, read on the copy stream
    with torch.cuda.stream(copy_stream):
        host.copy_(words, non_blocking=True)
        done = torch.cuda.Event()
        done.record(copy_stream)
    return HostCopy(tensors, packed, host, done)


def to_host(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """NumPy arrays of ``tensors`` (same shapes and dtypes), copied from the device in one transfer."""
    return start_host_copy(tensors).arrays()
