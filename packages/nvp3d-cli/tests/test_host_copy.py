"""``nvp3d.inference.host_copy.to_host``: a batch's outputs in one device-to-host copy, same values, shapes and
dtypes as ``.cpu().numpy()`` one by one; arrays outlive their tensors."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from nvp3d.inference.host_copy import to_host


def _tensors(device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 4, 5, generator=g).to(device),
            torch.randint(-5, 50, (7, 2), generator=g, dtype=torch.int32).to(device),
            torch.randint(0, 9, (4,), generator=g).to(device),  # int64: copied on its own
            torch.randn(6, generator=g).to(device).to(torch.bfloat16).float(),
            torch.zeros(0, 3, device=device),  # empty
            torch.arange(12, dtype=torch.int32, device=device).reshape(3, 4)[:, 1:]]  # not contiguous


def test_cpu_arrays_are_the_tensors() -> None:
    ts = _tensors("cpu")
    arrays = to_host(ts)
    for t, a in zip(ts, arrays, strict=True):
        assert a.dtype == t.numpy().dtype and a.shape == tuple(t.shape)
        np.testing.assert_array_equal(a, t.numpy())
    assert to_host([]) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned copies)")
def test_cuda_copy_equals_one_by_one_and_outlives_the_tensors() -> None:
    ts = _tensors("cuda")
    want = [t.cpu().numpy().copy() for t in ts]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # the copy waits for its own stream only
        side.wait_stream(torch.cuda.default_stream())
        arrays = to_host(ts)
    del ts
    gc.collect()
    torch.cuda.empty_cache()
    _ = [torch.full((1 << 20,), 7, device="cuda") for _ in range(4)]  # reuse freed device memory
    for w, a in zip(want, arrays, strict=True):
        assert a.dtype == w.dtype and a.shape == w.shape
        np.testing.assert_array_equal(a, w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (copy streams)")
def test_cuda_copy_on_a_copy_stream_is_collected_later() -> None:
    from nvp3d.inference.host_copy import start_host_copy

    copy_stream = torch.cuda.Stream()
    ts = _tensors("cuda")
    want = [t.cpu().numpy().copy() for t in ts]
    pending = start_host_copy([t * 1 for t in ts], stream=copy_stream)  # sources freed right after the call
    _ = [torch.full((1 << 22,), -1, dtype=torch.int32, device="cuda") for _ in range(4)]  # overwrite freed memory
    torch.cuda._sleep(10_000_000)  # keep the current stream busy: the copy must not wait for it
    arrays = pending.arrays()
    for w, a in zip(want, arrays, strict=True):
        assert a.dtype == w.dtype and a.shape == w.shape
        np.testing.assert_array_equal(a, w)
