"""Norms, pointwise layers and the residual block against dense / per-item references."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frustum3d.sparse import (  # noqa: E402
    SparseActivation,
    SparseBasicBlock3D,
    SparseBatchNorm,
    SparseELU,
    SparseInstanceNorm,
    SparseLeakyReLU,
    SparseLinear,
    SparseReLU,
    SparseSigmoid,
    SparseSoftmax,
    SparseVoxels,
)
from sparse_dense_reference import dense_conv, gather_dense, random_mask, rel_err, scatter_dense  # noqa: E402


def _input(seed: int, c=4, b=3, g=6, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(b, g, 0.3, gen)
    dense = torch.randn(b, c, g, g, g, generator=gen, dtype=dtype) * 2 + 1
    return SparseVoxels.from_dense(dense, mask), mask


def _instance_norm_reference(x: SparseVoxels, weight, bias, eps):
    out = torch.empty_like(x.feats)
    for b in range(x.batch_size):
        rows = x.coords[:, 0] == b
        f = x.feats[rows].t()[None]  # (1, C, n)
        out[rows] = F.instance_norm(f, weight=weight, bias=bias, eps=eps)[0].t()
    return out


def test_instance_norm_per_batch_item():
    x, _ = _input(0)
    norm = SparseInstanceNorm(4).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    feats = x.feats.clone().requires_grad_()
    y = norm(x.replace_feats(feats))
    ref = _instance_norm_reference(x.replace_feats(feats), norm.weight, norm.bias, 1e-8)
    assert norm.eps == 1e-8
    assert rel_err(y.feats, ref) < 1e-12
    g = torch.randn_like(ref)
    ga = torch.autograd.grad((y.feats * g).sum(), (feats, norm.weight, norm.bias))
    gb = torch.autograd.grad((ref * g).sum(), (feats, norm.weight, norm.bias))
    for a, b in zip(ga, gb):
        assert rel_err(a, b) < 1e-10


def test_instance_norm_rows_equals_the_explicit_form():
    """The batch-norm formulation CUDA uses at batch size 1 (``instance_norm_rows``) equals F.instance_norm over
    the rows: values, input and affine gradients in float64; bf16 features come back bf16 within rounding."""
    from frustum3d.sparse.norm import instance_norm_rows

    x, _ = _input(3, b=1)
    weight = torch.rand(4, dtype=torch.float64) + 0.5
    bias = torch.rand(4, dtype=torch.float64) - 0.5
    feats = x.feats.clone().requires_grad_()
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    got = instance_norm_rows(feats, w, b, 1e-8)
    ref = _instance_norm_reference(x.replace_feats(feats), w, b, 1e-8)
    assert rel_err(got, ref) < 1e-12
    g = torch.randn_like(ref)
    for a, c in zip(torch.autograd.grad((got * g).sum(), (feats, w, b)),
                    torch.autograd.grad((ref * g).sum(), (feats, w, b))):
        assert rel_err(a, c) < 1e-10
    half = instance_norm_rows(x.feats.to(torch.bfloat16), weight.float(), bias.float(), 1e-8)
    assert half.dtype == torch.bfloat16 and rel_err(half.double(), ref.detach()) < 2e-2


def _per_block_instance_norm(x: SparseVoxels, eps: float) -> torch.Tensor:
    """The per-item form through autograd (frustum3d <= 0.3.6): one mean / var / rsqrt chain per batch item."""
    counts = torch.bincount(x.coords[:, 0], minlength=x.batch_size).tolist()
    parts = []
    for blk in (b for b in torch.split(x.feats, counts) if b.shape[0] > 0):
        d = blk - blk.mean(dim=0, keepdim=True)
        parts.append(d * torch.rsqrt((d * d).mean(dim=0, keepdim=True) + eps))
    return torch.cat(parts)


def test_batched_instance_norm_backward_with_an_empty_item_and_fewer_ops():
    """Several batch items, one of them empty: values and input gradients equal the per-item F.instance_norm
    (float64, gradcheck of the hand-written backward), and a forward + backward dispatches fewer ops than the
    per-item autograd form (the 3D training step is bound by kernel launches), without a gather by batch index."""
    from torch.utils._python_dispatch import TorchDispatchMode

    gen = torch.Generator().manual_seed(5)
    mask = random_mask(4, 5, 0.4, gen)
    mask[2] = False  # batch item 2 has no voxel
    dense = torch.randn(4, 3, 5, 5, 5, generator=gen, dtype=torch.float64) * 3 + 2
    x = SparseVoxels.from_dense(dense, mask)
    assert x.batch_size == 4 and x.coordinate_set.batch_counts()[2] == 0
    norm = SparseInstanceNorm(3, affine=False).double()
    feats = x.feats.clone().requires_grad_()
    ref = _instance_norm_reference(x.replace_feats(feats), None, None, 1e-8)
    assert rel_err(norm(x.replace_feats(feats)).feats, ref) < 1e-12
    assert torch.autograd.gradcheck(lambda f: norm(x.replace_feats(f)).feats, (feats,), eps=1e-6, atol=1e-7)

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            self.names.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    counts, names = {}, {}
    for name, run in (("batched", lambda f: norm(x.replace_feats(f)).feats),
                      ("per_block", lambda f: _per_block_instance_norm(x.replace_feats(f), 1e-8))):
        f = x.feats.clone().requires_grad_()
        with Ops() as ops:
            run(f).sum().backward()
        counts[name], names[name] = ops.n, ops.names
    assert counts["batched"] < counts["per_block"], counts
    # the statistics reach their rows by broadcasting over each block: no gather by batch index (1.1 ms per call
    # on a batch-4 256^3 frame's candidates, stop 46)
    assert not names["batched"] & {"index_select", "gather", "index", "index_put"}, names["batched"]


def test_instance_norm_half_precision_close_to_fp32():
    x, _ = _input(1, dtype=torch.float32)
    norm = SparseInstanceNorm(4, affine=False)
    ref = norm(x).feats
    out = norm(x.to(torch.bfloat16)).feats
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref) < 1e-2


def test_batch_norm_matches_torch_statistics():
    x, _ = _input(2)
    bn = SparseBatchNorm(4).double().train()
    y = bn(x).feats
    mean, var = x.feats.mean(0), x.feats.var(0, unbiased=False)
    assert rel_err(y, (x.feats - mean) / torch.sqrt(var + 1e-5)) < 1e-12
    assert torch.allclose(bn.bn.running_mean, 0.1 * mean)


def test_linear_and_activations():
    x, _ = _input(3)
    lin = SparseLinear(4, 2).double()
    y = lin(x)
    assert torch.equal(y.coords, x.coords)
    assert rel_err(y.feats, x.feats @ lin.linear.weight.t() + lin.linear.bias) < 1e-14
    f = x.feats
    assert torch.equal(SparseReLU()(x).feats, f.clamp(min=0))
    assert torch.equal(SparseLeakyReLU(0.2)(x).feats, torch.where(f > 0, f, 0.2 * f))
    assert torch.allclose(SparseELU()(x).feats, torch.where(f > 0, f, torch.expm1(f)))
    assert torch.allclose(SparseSigmoid()(x).feats, 1 / (1 + torch.exp(-f)))
    assert torch.allclose(SparseSoftmax()(x).feats.sum(1), torch.ones(x.num_voxels, dtype=f.dtype))
    assert torch.equal(SparseActivation(torch.tanh)(x).feats, torch.tanh(f))


def _dense_block_reference(block: SparseBasicBlock3D, dense_in, mask):
    """The block on a dense grid: convs as F.conv3d, re-masked (submanifold), instance norm over occupied cells."""

    def masked_in(d):
        m = mask[:, None].to(d.dtype)
        out = torch.empty_like(d)
        for b in range(d.shape[0]):
            vals = d[b][:, mask[b]]  # (C, n)
            normed = F.instance_norm(vals[None], eps=1e-8)[0]
            full = torch.zeros_like(d[b])
            full[:, mask[b]] = normed
            out[b] = full
        return out * m

    m = mask[:, None].to(dense_in.dtype)
    h = dense_conv(dense_in, block.conv1.weight, 3, 1, 1) * m
    h = torch.relu(masked_in(h))
    h = dense_conv(h, block.conv2.weight, 3, 1, 1) * m
    h = masked_in(h)
    res = dense_in
    if block.downsample is not None:
        conv = block.downsample[0]
        res = masked_in(dense_conv(dense_in, conv.weight, 1, 1, 1) * m)
    return torch.relu(h + res) * m


@pytest.mark.parametrize("cin,cout", [(4, 4), (4, 6)])
def test_basic_block_matches_dense_composition(cin, cout):
    x, mask = _input(4, c=cin, b=2)
    block = SparseBasicBlock3D(cin, cout).double()
    y = block(x)
    assert torch.equal(y.coords, x.coords)
    ref_dense = _dense_block_reference(block, x.to_dense(), mask)
    ref = gather_dense(ref_dense, y.coords, 1)
    assert rel_err(y.feats, ref) < 1e-10


def test_strided_basic_block_shapes_and_gradients():
    x, _ = _input(5, c=3, b=2, g=8)
    block = SparseBasicBlock3D(3, 5, stride=2, norm="batch").double()
    feats = x.feats.clone().requires_grad_()
    y = block(x.replace_feats(feats))
    assert y.stride == 2 and y.num_channels == 5
    assert y.coordinate_set is x.coordinate_set.downsample(2)
    y.feats.square().sum().backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()
    names = set(block.state_dict())
    assert {"conv1.weight", "conv2.weight", "downsample.0.weight", "norm1.bn.weight"} <= names
    assert block.conv1.weight.shape == (27, 3, 5) and block.downsample[0].weight.shape == (64, 3, 5)


def test_submanifold_conv_on_dense_mask_equals_masked_conv3d():
    # An independent restatement of submanifold conv: dense conv3d on the zero-filled grid, read at occupied cells.
    x, mask = _input(6, c=2, b=1)
    from frustum3d.sparse import SparseConv3d

    conv = SparseConv3d(2, 3, 3, bias=True).double()
    y = conv(x)
    ref = gather_dense(dense_conv(scatter_dense(x.coords, x.feats, 1, 1, 6), conv.weight, 3, 1, 1), x.coords, 1)
    assert rel_err(y.feats, ref + conv.bias) < 1e-12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the batch-norm form is CUDA only")
def test_sparse_instance_norm_cuda_batch_one_matches_cpu():
    """At batch size 1 on CUDA the sparse norm runs as a batch norm over the rows: equal to the CPU (explicit)
    result in float64, values and gradients."""
    x, _ = _input(7, b=1)
    norm = SparseInstanceNorm(4).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    f = x.feats.clone().requires_grad_()
    ref = norm(x.replace_feats(f)).feats
    w = torch.randn_like(ref)  # a random projection (a sum of squares of a normalised map has a ~zero gradient)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), f)
    xc = SparseVoxels(x.coords.cuda(), x.feats.cuda(), spatial_shape=x.spatial_shape)
    fc = xc.feats.clone().requires_grad_()
    got = norm.cuda()(xc.replace_feats(fc)).feats
    (g,) = torch.autograd.grad((got * w.cuda()).sum(), fc)
    assert g_ref.abs().max() > 0.1  # a gradient worth comparing
    assert rel_err(got.cpu(), ref) < 1e-12 and rel_err(g.cpu(), g_ref) < 1e-10
