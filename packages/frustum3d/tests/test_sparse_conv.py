"""Sparse conv / transposed conv / max pool against dense torch.nn.functional references (forward + grads)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frustum3d.sparse import (  # noqa: E402
    SparseConv3d,
    SparseConvTranspose3d,
    SparseVoxels,
    kernel_offsets,
    resolve_backend_name,
    sparse_conv3d,
    sparse_conv_transpose3d,
    sparse_max_pool3d,
)
from sparse_dense_reference import (  # noqa: E402
    dense_conv,
    dense_conv_transpose,
    dense_max_pool,
    gather_dense,
    random_mask,
    rel_err,
    scatter_dense,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

#: the torch backend's two forms (frustum3d.sparse.backends.torch_backend), each forced for every map: the gather
#: form in one chunk of offsets, one offset per chunk, uneven chunks; and the per-offset loop
CONV_FORMS = {
    "gather": {"GATHER_MIN_FILL": 0.0},
    "gather_chunks_of_1": {"GATHER_MIN_FILL": 0.0, "GATHER_CHUNK_ELEMENTS": 1},
    "gather_uneven_chunks": {"GATHER_MIN_FILL": 0.0, "GATHER_CHUNK_ELEMENTS": 1500},
    "loop": {"GATHER_MIN_FILL": 2.0, "GATHER_MAX_ENTRIES": -1},
}


@pytest.fixture(params=list(CONV_FORMS))
def conv_form(request, monkeypatch):
    """Runs a test once per form of the torch backend (the CPU path)."""
    from frustum3d.sparse.backends import torch_backend

    for key, value in CONV_FORMS[request.param].items():
        monkeypatch.setattr(torch_backend, key, value)
    return request.param


def make_input(seed: int, batch: int, grid: int, cin: int, dtype: torch.dtype, stride: int = 1, density=0.35):
    """Random sparse input with shuffled rows; returns (x, coords, leaf feats)."""
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(batch, grid, density, gen)
    coords = mask.nonzero()
    coords[:, 1:] *= stride
    coords = coords[torch.randperm(coords.shape[0], generator=gen)]
    feats = torch.randn(coords.shape[0], cin, generator=gen, dtype=dtype).requires_grad_()
    x = SparseVoxels(coords, feats, stride=stride, spatial_shape=(grid * stride,) * 3, batch_size=batch)
    return x, coords, feats


def backprop_pair(out_sparse, out_ref, leaves, seed: int):
    """Gradients of <out, g> w.r.t. leaves for the sparse and the reference output (same random g)."""
    g = torch.randn(out_sparse.shape, generator=torch.Generator().manual_seed(seed), dtype=out_sparse.dtype)
    gs = torch.autograd.grad((out_sparse * g).sum(), leaves, retain_graph=True)
    gr = torch.autograd.grad((out_ref * g).sum(), leaves, retain_graph=True)
    return gs, gr


CONV_CASES = [
    # (kernel, stride, dilation, in_stride, cin, cout)
    (1, 1, 1, 1, 3, 5),
    (3, 1, 1, 1, 3, 5),
    (4, 1, 1, 1, 2, 3),
    (5, 1, 1, 1, 4, 2),
    (3, 1, 2, 1, 3, 4),
    (2, 2, 1, 1, 3, 4),
    (3, 2, 1, 1, 5, 3),
    (4, 2, 1, 1, 3, 6),
    (5, 2, 1, 1, 2, 2),
    (3, 2, 1, 2, 3, 4),
    (4, 2, 1, 2, 1, 16),
    (3, 1, 1, 2, 4, 4),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "k{}s{}d{}ts{}_{}to{}".format(*c))
def test_conv_matches_dense(case, dtype, conv_form):
    k, s, d, ts, cin, cout = case
    batch, grid = 2, 7
    x, coords, feats = make_input(11 * k + s + 3 * d + ts, batch, grid, cin, dtype, stride=ts)
    w = (torch.randn(k**3, cin, cout, dtype=dtype, generator=torch.Generator().manual_seed(k)) * 0.3)
    w.requires_grad_()
    bias = torch.randn(cout, dtype=dtype).requires_grad_()
    y = sparse_conv3d(x, w, bias, stride=s, dilation=d)

    # Output set: input set at stride 1, floor(c / (ts*s)) * (ts*s) otherwise (brute force).
    out_stride = ts * s
    exp = coords.clone()
    exp[:, 1:] = torch.div(exp[:, 1:], out_stride, rounding_mode="floor") * out_stride
    assert y.stride == out_stride
    assert set(map(tuple, y.coords.tolist())) == set(map(tuple, exp.tolist()))
    assert y.num_voxels == len(set(map(tuple, exp.tolist())))

    dense_in = scatter_dense(coords, feats, ts, batch, grid)
    ref = gather_dense(dense_conv(dense_in, w, k, s, d), y.coords, out_stride) + bias
    assert rel_err(y.feats, ref) < TOL[dtype]
    gs, gr = backprop_pair(y.feats, ref, (feats, w, bias), seed=k)
    for a, b in zip(gs, gr):
        assert rel_err(a, b) < TOL[dtype]


@pytest.mark.parametrize("generative", [True, False])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_conv_transpose_matches_dense(k, generative, conv_form):
    dtype = torch.float64
    batch, fine_grid = 2, 8
    # Fine input, downsampled by a strided conv so the coarse tensor links back to its fine coordinates.
    xf, _, _ = make_input(5 + k, batch, fine_grid, 3, dtype, stride=1, density=0.25)
    down = SparseConv3d(3, 4, 2, stride=2).double()
    xc = down(xf)
    coarse_coords = xc.coords
    feats = torch.randn(xc.num_voxels, 4, dtype=dtype, generator=torch.Generator().manual_seed(k)).requires_grad_()
    xc = xc.replace_feats(feats)
    w = torch.randn(k**3, 4, 3, dtype=dtype, generator=torch.Generator().manual_seed(10 + k)).requires_grad_()
    y = sparse_conv_transpose3d(xc, w, None, stride=2, generative=generative)
    assert y.stride == 1
    if generative:
        offs = kernel_offsets(k)
        exp = {(b, x + ox, yy + oy, z + oz) for b, x, yy, z in coarse_coords.tolist() for ox, oy, oz in offs.tolist()}
        assert set(map(tuple, y.coords.tolist())) == exp
        if k == 4:
            assert y.num_voxels <= 64 * xc.num_voxels
    else:
        assert torch.equal(y.coords, xf.coords)
    dense_in = scatter_dense(coarse_coords, feats, 2, batch, fine_grid // 2)
    ref_dense, shift = dense_conv_transpose(dense_in, w, k, 2)
    ref = gather_dense(ref_dense, y.coords, 1, shift)
    assert rel_err(y.feats, ref) < 1e-10
    gs, gr = backprop_pair(y.feats, ref, (feats, w), seed=k)
    for a, b in zip(gs, gr):
        assert rel_err(a, b) < 1e-10


def test_torch_backend_picks_the_gather_form_for_full_or_small_maps():
    """The rule of :func:`frustum3d.sparse.backends.torch_backend.uses_gather`: a submanifold map of a dense block
    gathers; a big generative map (each coarse voxel makes 64 children, few of them reached by more than one)
    keeps the per-offset loop; the same map made small gathers again."""
    from frustum3d.sparse import CoordinateSet, get_kernel_map
    from frustum3d.sparse.backends import torch_backend

    def coordinate_set(xyz: torch.Tensor, stride: int):
        coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.int64), xyz], 1)
        return CoordinateSet.from_coords(coords, stride, (256, 256, 256))[0]

    block = torch.stack(torch.meshgrid(*[torch.arange(24)] * 3, indexing="ij"), -1).view(-1, 3)
    dense = coordinate_set(block, 1)
    subm = get_kernel_map(dense, dense, 3, 1, False)
    assert subm.fill() > 0.8 and torch_backend.uses_gather(subm)

    def generative(n: int):
        coarse = torch.stack(torch.meshgrid(*[torch.arange(n) * 8] * 3, indexing="ij"), -1).view(-1, 3)
        fine = (coarse[:, None] + kernel_offsets(4)[None]).view(-1, 3)
        return get_kernel_map(coordinate_set(coarse, 2), coordinate_set(fine, 1), 4, 1, True)

    big, small = generative(8), generative(2)
    assert big.fill() < 0.05 and not torch_backend.uses_gather(big)
    assert torch_backend.uses_gather(small)


def test_generative_k4s2_makes_64_children_per_isolated_voxel():
    coords = torch.tensor([[0, 0, 0, 0], [0, 16, 8, 4], [1, 4, 4, 4]])
    x = SparseVoxels(coords, torch.ones(3, 2), stride=4, spatial_shape=(32, 32, 32))
    up = SparseConvTranspose3d(2, 1, 4, stride=2, generative=True)
    y = up(x)
    assert y.stride == 2 and y.num_voxels == 3 * 64
    c = y.coords[y.coords[:, 0] == 1][:, 1:]
    assert c.min().item() == 4 and c.max().item() == 4 + 3 * 2


def test_cpu_bf16_autocast_runs_both_torch_backend_forms():
    """Under CPU bf16 autocast the torch backend accumulates in float32 itself (autocast off inside): the
    generative up-sampling (sparse table, per-offset loop form) and a subm conv (gather form) run forward and
    backward, and match their float32 results within bf16 rounding (the loop form used to fail in index_add_)."""
    x, _, _ = make_input(5, 2, 8, 3, torch.float32, stride=2)
    up = SparseConvTranspose3d(3, 4, 4, stride=2, generative=True)
    conv = SparseConv3d(4, 4, 3)
    for layer in (up, conv):
        layer.weight.data.normal_()
    ref = conv(up(x)).feats
    feats = x.feats.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = conv(up(x.replace_feats(feats))).feats
    assert got.dtype == torch.bfloat16 and rel_err(got.float(), ref) < 3e-2
    got.float().sum().backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()


def test_transpose_explicit_out_coords_and_missing_link_error():
    x, _, _ = make_input(3, 1, 6, 2, torch.float64, stride=2)
    fine, _, _ = make_input(4, 1, 12, 1, torch.float64, stride=1)
    up = SparseConvTranspose3d(2, 3, 3, stride=2).double()
    with pytest.raises(ValueError, match="out_coords"):
        up(x)
    y = up(x, out_coords=fine)
    assert torch.equal(y.coords, fine.coords)
    dense_in = scatter_dense(x.coords, x.feats, 2, 1, 6)
    ref_dense, shift = dense_conv_transpose(dense_in, up.weight, 3, 2)
    assert rel_err(y.feats, gather_dense(ref_dense, y.coords, 1, shift)) < 1e-10


@pytest.mark.parametrize("k,s", [(2, 2), (3, 1), (3, 2), (4, 2)])
def test_max_pool_matches_dense(k, s):
    x, coords, feats = make_input(20 + k + s, 2, 7, 3, torch.float64)
    y = sparse_max_pool3d(x, k, s)
    dense_in = scatter_dense(coords, feats, 1, 2, 7, fill=float("-inf"))
    ref = gather_dense(dense_max_pool(dense_in, k, s, 1), y.coords, s)
    assert torch.isfinite(y.feats).all()
    assert rel_err(y.feats, ref) < 1e-12
    (gs,), (gr,) = backprop_pair(y.feats, ref, (feats,), seed=k)
    assert rel_err(gs, gr) < 1e-12


def test_module_forward_and_strided_cache_shared():
    x, _, _ = make_input(1, 2, 8, 3, torch.float32)
    a = SparseConv3d(3, 4, 3, stride=2)
    b = SparseConv3d(3, 4, 4, stride=2)
    ya, yb = a(x), b(x)
    # Same output coordinate set object (MinkowskiEngine: same coordinate key for k3 and k4 stride 2).
    assert ya.coordinate_set is yb.coordinate_set
    assert a.weight.shape == (27, 3, 4) and b.weight.shape == (64, 3, 4)
    assert set(dict(a.named_parameters())) == {"weight"}


def test_empty_and_single_voxel_inputs():
    for n in (0, 1):
        coords = torch.tensor([[0, 2, 2, 2]])[:n]
        feats = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
        x = SparseVoxels(coords, feats, spatial_shape=(4, 4, 4), batch_size=1)
        conv = SparseConv3d(3, 2, 3).double()
        y = conv(x)
        assert y.feats.shape == (n, 2)
        if n == 1:
            # Only the centre tap sees the voxel.
            assert torch.allclose(y.feats, feats @ conv.weight[13])
        ys = SparseConv3d(3, 2, 4, stride=2).double()(x)
        assert ys.num_voxels == n
        yg = SparseConvTranspose3d(3, 2, 4, stride=1, generative=True).double()(x)
        assert yg.num_voxels == 64 * n
        y.feats.sum().backward()
        assert feats.grad is not None and feats.grad.shape == (n, 3)
        pooled = sparse_max_pool3d(x, 3, 2)
        assert pooled.num_voxels == n


def test_backend_resolution_on_cpu():
    # On CPU the torch backend runs unless the Triton interpreter is switched on.
    import os

    name = resolve_backend_name(torch.device("cpu"))
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        assert name == "torch"
    else:
        assert name == os.environ.get("FRUSTUM3D_SPARSE_BACKEND", "torch") or name == "torch"


def test_autocast_runs_conv_in_autocast_dtype():
    x, coords, feats = make_input(7, 1, 6, 8, torch.float32)
    conv = SparseConv3d(8, 8, 3)
    ref = conv(x).feats
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.feats.dtype == torch.bfloat16
    assert rel_err(y.feats.float(), ref) < 2e-2
    y.feats.float().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.dtype == torch.float32
