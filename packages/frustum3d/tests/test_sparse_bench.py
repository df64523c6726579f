"""pytest-benchmark cases for the sparse core, sized to stay cheap on CPU in the normal suite.

The GPU-sized benchmark (307k / 700k frustum voxels, both backends, fp32/bf16/fp16) is
``tools/bench_sparse_conv.py``. Each case here also checks its result against a dense reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytest_benchmark")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frustum3d.sparse import SparseVoxels, get_kernel_map, sparse_conv3d  # noqa: E402
from frustum3d.sparse.coords import CoordinateSet  # noqa: E402
from sparse_dense_reference import dense_conv, gather_dense, random_mask, rel_err, scatter_dense  # noqa: E402

GRID, CH = 16, 8


@pytest.fixture(scope="module")
def shell():
    gen = torch.Generator().manual_seed(0)
    mask = random_mask(1, GRID, 0.2, gen)
    coords = mask.nonzero()
    feats = torch.randn(coords.shape[0], CH, generator=gen)
    weight = torch.randn(27, CH, CH, generator=gen) * 0.1
    return coords, feats, weight


@pytest.mark.parametrize("method", ["grid", "search"])
def test_bench_kernel_map_build(benchmark, shell, method):
    coords = shell[0]

    def build():
        cset, _ = CoordinateSet.from_coords(coords, 1, (GRID,) * 3, 1)
        return get_kernel_map(cset, cset, 3, method=method)

    kmap = benchmark.pedantic(build, rounds=3, iterations=1, warmup_rounds=1)
    # centre tap of a submanifold map is the identity
    assert torch.equal(kmap.nbr[:, 13].long(), torch.arange(coords.shape[0]))


def test_bench_subm_conv_forward_cached(benchmark, shell):
    coords, feats, weight = shell
    x = SparseVoxels(coords, feats, spatial_shape=(GRID,) * 3)
    sparse_conv3d(x, weight)  # build and cache the map
    y = benchmark.pedantic(lambda: sparse_conv3d(x, weight), rounds=3, iterations=1, warmup_rounds=1)
    ref = gather_dense(dense_conv(scatter_dense(coords, feats, 1, 1, GRID), weight, 3, 1, 1), y.coords, 1)
    assert rel_err(y.feats, ref) < 1e-5


def test_bench_strided_conv_forward_backward(benchmark, shell):
    coords, feats, _ = shell
    w = torch.randn(64, CH, CH, generator=torch.Generator().manual_seed(1)) * 0.1
    x = SparseVoxels(coords, feats, spatial_shape=(GRID,) * 3)

    def step():
        f = feats.clone().requires_grad_()
        out = sparse_conv3d(x.replace_feats(f), w, stride=2)
        out.feats.sum().backward()
        return f.grad

    grad = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    f = feats.clone().requires_grad_()
    y = sparse_conv3d(x, w, stride=2)
    ref = gather_dense(dense_conv(scatter_dense(coords, f, 1, 1, GRID), w, 4, 2, 1), y.coords, 2)
    ref.sum().backward()
    assert rel_err(grad, f.grad) < 1e-5
