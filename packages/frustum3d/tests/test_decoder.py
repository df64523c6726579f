"""FrustumDecoder: forward/backward on realistic lifted inputs at 64^3, pruning fallback, query products."""

from __future__ import annotations

import math

import pytest
import torch
from frustum3d import geometry as G
from frustum3d.decoder import FrustumDecoder, decoder_input_groups, frustum_mask_at, keep_mask
from frustum3d.lifting import fuse_lifted, lift_depth, lift_depth_multiscale, occupancy_aware_lift
from frustum3d.losses import FrustumLoss
from frustum3d.sparse import SparseVoxels

W, H = 40, 30
K = G.front3d_intrinsic((W, H))
NUM_CLASSES, FEAT, Q = 5, 6, 7
# the front3d frustum (0.4-6 m) fits a 64^3 grid at 0.12 m and a 32^3 grid at 0.24 m
SIZES = {32: 0.24, 64: 0.12}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The CPU sparse path runs many small ops; with 2+ threads on a busy shared machine they spin and run
    10x slower, so this module runs single-threaded and restores the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _geo(n):
    return dict(grid_dims=(n, n, n), voxel_size=SIZES[n])


def _inputs(batch=1, seed=0, n=32):
    GRID, GEO = (n, n, n), _geo(n)
    g = torch.Generator().manual_seed(seed)
    # a smooth-ish depth map: a slanted wall plus noise, all valid
    v, u = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    depth = (2.0 + 1.5 * u / W + 0.5 * v / H)[None].repeat(batch, 1, 1).double()
    depth = depth + 0.05 * torch.randn(batch, H, W, generator=g, dtype=torch.float64)
    feats = torch.randn(batch, FEAT, H // 2, W // 2, generator=g)
    sem = torch.softmax(torch.randn(batch, NUM_CLASSES, H, W, generator=g), 1)
    occ = torch.randn(batch, 20, H, W, generator=g)
    proj = lift_depth(depth.float(), K, feats, sem, **GEO)
    buol = occupancy_aware_lift(sem, occ, depth.float(), K, stuff_classes=(3, 4), **GEO)
    lifted = fuse_lifted(proj, buol)
    queries = torch.randn(batch, Q, 12, generator=g)
    frustum = G.FrustumGeometry(plane_size=(W, H), **GEO).frustum_mask(K)[None].expand(batch, *GRID)
    return depth, feats, lifted, queries, frustum


def _decoder(n=32, **kw):
    torch.manual_seed(0)
    return FrustumDecoder(decoder_input_groups(FEAT, NUM_CLASSES), query_dim=12, unet_features=4,
                          unet_output_channels=4, grid_dims=(n, n, n), **kw)


@pytest.mark.parametrize("n", [32, 64])
def test_forward_backward(n):
    _, _, lifted, queries, frustum = _inputs(batch=2, n=n)
    dec = _decoder(n)
    out = dec(lifted, queries, frustum)
    fm64 = frustum_mask_at(frustum, 4)
    c = n // 4
    assert out["occupancy_64"].shape == (2, c, c, c)
    assert bool(torch.isinf(out["occupancy_64"][~fm64]).all())
    assert bool(torch.isfinite(out["occupancy_64"][fm64]).all())
    assert out["panoptic_64"].shape == (2, Q, c, c, c)
    for lvl, stride in (("128", 2), ("256", 1)):
        occ, pan = out[f"occupancy_{lvl}"], out[f"panoptic_{lvl}"]
        assert occ.stride == stride and occ.num_channels == 1
        assert pan.num_channels == Q and pan.num_voxels > 0
        assert bool(((pan.coords[:, 1:] >= 0) & (pan.coords[:, 1:] < n)).all())
        assert torch.equal(out[f"coords_{lvl}"], pan.coords)
    geo = out["geometry"]
    assert torch.equal(geo.coords, out["panoptic_256"].coords)
    assert float(geo.feats.detach().min()) >= 0.0 and float(geo.feats.detach().max()) <= 3.0
    # kept 256 voxels are exactly the predicted-occupied candidates (sigmoid > 0.5) when that set is non-empty
    occ256 = out["occupancy_256"]
    pred_keep = occ256.coords[torch.sigmoid(occ256.feats[:, 0]) > 0.5]
    if pred_keep.shape[0] > 0:
        assert torch.equal(pred_keep, geo.coords)
    # losses + backward reach the input encoders and the query projections
    tg = {
        "occupancy_64": torch.rand(2, c, c, c) > 0.5,
        "occupancy_128": torch.rand(2, 2 * c, 2 * c, 2 * c) > 0.5,
        "occupancy_256": torch.rand(2, n, n, n) > 0.5,
        "geometry": 3 * torch.rand(2, n, n, n),
        "masks_64": [torch.rand(2, c, c, c) > 0.5] * 2,
        "masks_128": [torch.rand(2, 2 * c, 2 * c, 2 * c) > 0.5] * 2,
        "masks_256": [torch.rand(2, n, n, n) > 0.5] * 2,
    }
    indices = [(torch.tensor([0, 3]), torch.tensor([1, 0]))] * 2
    losses = FrustumLoss()(out, tg, indices)
    assert len(losses) == 7 and all(math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()
    for name in ("input_encoders.0.conv1.weight", "enc2.0.conv1.weight", "query_proj_64.weight",
                 "query_proj_256.weight", "geometry_head.3.weight", "occupancy_128.linear.weight"):
        p = dict(dec.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fine_skip_starts_as_the_reference_and_then_learns():
    _, _, lifted, queries, frustum = _inputs(batch=2, n=32)
    ref = _decoder(32).eval()
    dec = _decoder(32, fine_skip=True).eval()
    missing, unexpected = dec.load_state_dict(ref.state_dict(), strict=False)
    assert missing == ["skip_256.linear.weight"] and unexpected == []
    with torch.no_grad():
        a, b = ref(lifted, queries, frustum), dec(lifted, queries, frustum)
    for key in ("occupancy_256", "geometry", "panoptic_256"):  # zero projection: the reference's outputs
        assert torch.equal(a[key].coords, b[key].coords)
        assert torch.allclose(a[key].feats, b[key].feats, atol=1e-6), key
    dec.train()
    out = dec(lifted, queries, frustum)
    (out["panoptic_256"].feats.square().sum() + out["geometry"].feats.sum()).backward()
    grad = dec.skip_256.linear.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0  # the skip is trained from its zero start
    assert dec.skip_256.linear.weight.shape == (4, 4 * len(decoder_input_groups(FEAT, NUM_CLASSES)))


def test_prune_collapse_fallback():
    _, _, lifted, queries, frustum = _inputs(batch=2, seed=1)
    dec = _decoder(min_keep=5)
    with torch.no_grad():
        dec.occupancy_64.bias.fill_(-100.0)  # nothing survives level 64 by prediction
        dec.occupancy_128.linear.bias.fill_(-100.0)
        dec.eval()
        out = dec(lifted, queries, frustum)
    # inference: top-k fallback keeps min_keep voxels per batch item at 64, so 128/256 still exist
    assert out["panoptic_128"].num_voxels > 0 and out["geometry"].num_voxels > 0
    assert set(out["coords_256"][:, 0].tolist()) == {0, 1}
    occ64 = out["occupancy_64"]
    for b in (0, 1):
        kept = out["coords_64"][out["coords_64"][:, 0] == b][:, 1:] // 4
        assert kept.shape[0] == 5
        flat = occ64[b].flatten()
        top = torch.topk(flat, 5).indices
        c = occ64.shape[-1]
        expected = torch.stack([top // (c * c), (top // c) % c, top % c], 1)
        assert set(map(tuple, kept.tolist())) == set(map(tuple, expected.tolist()))
    # training with GT: the kept 64 set is exactly the GT-occupied frustum voxels
    gt64 = torch.zeros(2, 8, 8, 8, dtype=torch.bool)
    gt64[:, 4, 4, 6] = True
    gt64[1, 4, 5, 6] = True
    assert bool(out["frustum_mask_64"][gt64].all())
    dec.train()
    out_t = dec(lifted, queries, frustum, gt_occupancy={"64": gt64})
    kept_t = out_t["coords_64"]
    assert sorted(map(tuple, kept_t.tolist())) == sorted(
        (b, 4 * x, 4 * y, 4 * z) for b, x, y, z in gt64.nonzero().tolist())


def test_keep_mask_brute_force():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(40, generator=g)
    batch = torch.arange(40) % 3
    logits[batch == 1] = -5.0 - torch.rand(int((batch == 1).sum()), generator=g)
    gt = torch.zeros(40, dtype=torch.bool)
    gt[5] = True  # batch 2
    keep = keep_mask(logits, batch, 4, 0.5, 3, gt)
    for i in range(40):
        b = int(batch[i])
        if b == 1:  # nothing above threshold: top-3 of batch 1
            rows = [j for j in range(40) if batch[j] == 1]
            top = sorted(rows, key=lambda j: -float(logits[j]))[:3]
            assert bool(keep[i]) == (i in top)
        else:
            assert bool(keep[i]) == (float(torch.sigmoid(logits[i])) > 0.5 or bool(gt[i]))


def test_query_logits_brute_force():
    g = torch.Generator().manual_seed(3)
    c = torch.unique(torch.cat([torch.randint(0, 2, (30, 1), generator=g),
                                torch.randint(0, 8, (30, 3), generator=g)], 1), dim=0)
    x = SparseVoxels(c, torch.randn(c.shape[0], 4, generator=g), 1, (8, 8, 8), 2)
    q = torch.randn(2, 5, 4, generator=g)
    out = FrustumDecoder._query_logits(x, q)
    for i, (b, *_rest) in enumerate(out.coords.tolist()):
        for j in range(5):
            assert math.isclose(float(out.feats[i, j]), float(x.feats[i] @ q[b, j]), rel_tol=1e-5, abs_tol=1e-6)


def test_multi_scale_adapters_run():
    depth, feats, lifted, queries, frustum = _inputs(batch=1, seed=4)
    ms = lift_depth_multiscale(depth.float(), K, [feats, feats, feats], **_geo(32))
    dec = _decoder(use_multi_scale=True, multi_scale_channels=FEAT)
    out = dec(lifted, queries, frustum, ms_features=ms)
    out["occupancy_64"][torch.isfinite(out["occupancy_64"])].sum().backward()
    assert dec.adapters[2].conv1.weight.grad is not None
    with pytest.raises(ValueError, match="ms_features"):
        dec(lifted, queries, frustum)


def test_input_validation():
    _, _, lifted, queries, frustum = _inputs()
    dec = _decoder()
    with pytest.raises(ValueError, match="segm_queries"):
        dec(lifted, queries[0], frustum)
    with pytest.raises(ValueError, match="frustum_mask"):
        dec(lifted, queries, frustum[:, :16])
    with pytest.raises(ValueError, match="divisible by 32"):
        FrustumDecoder(grid_dims=(48, 48, 48))


def test_instance_norm_matches_torch():
    from frustum3d.decoder import InstanceNorm3d

    x = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    ours = InstanceNorm3d(3).double()
    with torch.no_grad():
        ours.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
        ours.bias.copy_(torch.tensor([0.1, 0.0, 3.0]))
    ref = torch.nn.InstanceNorm3d(3, affine=True).double()
    ref.load_state_dict({"weight": ours.weight.detach(), "bias": ours.bias.detach()})
    assert torch.allclose(ours(x), ref(x), atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the fused norm path is CUDA only")
def test_instance_norm_cuda_path_matches_the_explicit_form():
    """On CUDA the dense norm runs torch's fused instance norm; it equals the explicit form (float64, values and
    input gradients), keeps a bf16 map bf16, and a 1^3 map (a 32^3 grid's bottleneck) still trains."""
    from frustum3d.decoder import InstanceNorm3d

    norm = InstanceNorm3d(3).double()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
        norm.bias.copy_(torch.tensor([0.1, 0.0, 3.0]))
    x = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    ref = norm(x)
    w = torch.randn_like(ref)  # a random projection (a sum of squares of a normalised map has a ~zero gradient)
    (gx_ref,) = torch.autograd.grad((ref * w).sum(), x)
    xc = x.detach().cuda().requires_grad_()
    got = norm.cuda()(xc)
    (gx,) = torch.autograd.grad((got * w.cuda()).sum(), xc)
    assert gx_ref.abs().max() > 0.1  # a gradient worth comparing
    assert torch.allclose(got.cpu(), ref, atol=1e-10) and torch.allclose(gx.cpu(), gx_ref, atol=1e-10)
    assert norm.float()(x.detach().cuda().bfloat16()).dtype == torch.bfloat16
    one = torch.randn(2, 3, 1, 1, 1, device="cuda", requires_grad=True)
    norm(one).sum().backward()
    assert torch.isfinite(one.grad).all()


def test_drop_outside_uses_the_set_bounds():
    """Rows outside the grid are dropped (a generative up-sampling makes some at the border); a set inside the grid
    comes back as it is, and a generated set, whose bounds are known on the host, is decided without a device
    read (no ``.item()`` / ``nonzero``)."""
    from frustum3d.decoder import _drop_outside
    from frustum3d.sparse import SparseConvTranspose3d, SparseVoxels
    from torch.utils._python_dispatch import TorchDispatchMode

    coords = torch.tensor([[0, 0, 0, 0], [0, 6, 6, 6], [1, 2, 4, 6]])
    x = SparseVoxels(coords, torch.ones(3, 1), stride=2, spatial_shape=(8, 8, 8))
    assert _drop_outside(x) is x
    # children at 0 .. 9 per axis: some leave the 8^3 grid
    up = SparseConvTranspose3d(1, 1, 4, stride=2, generative=True)(x)
    kept = _drop_outside(up)
    c = kept.coords[:, 1:]
    assert kept.num_voxels < up.num_voxels and bool(((c >= 0) & (c < 8)).all())
    assert kept.num_voxels == int(((up.coords[:, 1:] >= 0) & (up.coords[:, 1:] < 8)).all(1).sum())

    class Reads(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket).startswith(("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero")):
                self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    inner = SparseVoxels(coords + torch.tensor([0, 2, 2, 2]), torch.ones(3, 1), stride=2, spatial_shape=(16, 16, 16))
    grown = SparseConvTranspose3d(1, 1, 4, stride=2, generative=True)(inner)  # all inside a 16^3 grid
    with Reads() as reads:
        assert _drop_outside(grown) is grown
    assert reads.ops == []


def test_dense_runner_stands_in_for_the_dense_levels_in_eval_no_grad_calls():
    # FrustumDecoder.dense_runner (a CUDA-graph replay in nvp3d) gets dense_levels' arguments and its results are
    # used as they are; training and gradient-enabled calls never consult it
    _, _, lifted, queries, frustum = _inputs(batch=2, seed=6)
    dec = _decoder().eval()
    with torch.no_grad():
        plain = dec(lifted, queries, frustum)
    calls = []

    def runner(*inputs):
        calls.append([tuple(t.shape) for t in inputs])
        return dec.dense_levels(*inputs)

    dec.dense_runner = runner
    with torch.no_grad():
        via = dec(lifted, queries, frustum)
    assert calls == [[(2, 8, 8, 8, 8), (2, Q, 12), (2, 8, 8, 8)]]  # e1 (2f channels at grid / 4), queries, mask
    for key in ("occupancy_64", "panoptic_64", "coords_256"):
        assert torch.equal(via[key], plain[key])
    assert torch.equal(via["geometry"].feats, plain["geometry"].feats)
    dec(lifted, queries, frustum)  # gradients on
    dec.train()
    with torch.no_grad():
        dec(lifted, queries, frustum)
    assert len(calls) == 1


def _with_reference_weights(**option):
    """A decoder with an opt-in part (``option``) loaded with a plain decoder's weights: only the part's own keys
    are missing, and in evaluation it gives the plain decoder's outputs (the part starts as the reference or adds an
    output). Returns (inputs..., the decoder, its outputs)."""
    _, _, lifted, queries, frustum = _inputs(batch=2, n=32)
    ref = _decoder(32).eval()
    dec = _decoder(32, **option).eval()
    missing, unexpected = dec.load_state_dict(ref.state_dict(), strict=False)
    prefix = {"query_refine_layers": "query_refiner.layers.", "semantic_classes": "semantic_256."}[next(iter(option))]
    assert missing and all(k.startswith(prefix) for k in missing) and unexpected == []
    with torch.no_grad():
        a, b = ref(lifted, queries, frustum), dec(lifted, queries, frustum)
    for key in ("panoptic_64", "panoptic_128", "panoptic_256", "geometry"):
        x, y = (a[key], b[key]) if key == "panoptic_64" else (a[key].feats, b[key].feats)
        assert torch.equal(x, y), key
    assert "semantic_256" not in a
    return lifted, queries, frustum, dec, b


def test_query_refiner_starts_as_the_reference_and_then_learns():
    """``query_refine_layers``: a new refiner returns the 2D queries (the reference's outputs); the 3D loss reaches
    it through the level-128 and level-256 mask logits."""
    lifted, queries, frustum, dec, _ = _with_reference_weights(query_refine_layers=2)
    dec.train()
    out = dec(lifted, queries, frustum)
    (out["panoptic_128"].feats.square().sum() + out["panoptic_256"].feats.square().sum()).backward()
    for layer in dec.query_refiner.layers:  # the zero-started projections get gradients: the refiner is trained
        assert float(layer.out.weight.grad.abs().sum()) > 0 and float(layer.mlp[2].weight.grad.abs().sum()) > 0


def test_semantic_head_labels_the_finest_voxels_and_learns():
    """``semantic_classes``: per-voxel class logits at exactly the ``panoptic_256`` voxels; every other output equals
    a decoder without the head (the same weights); the semantic loss reaches the head only."""
    from frustum3d.losses import semantic_loss_sparse

    lifted, queries, frustum, dec, b = _with_reference_weights(semantic_classes=6)
    assert torch.equal(b["semantic_256"].coords, b["panoptic_256"].coords) and b["semantic_256"].feats.shape[1] == 6
    dec.train()
    out = dec(lifted, queries, frustum)
    sem = torch.randint(1, 6, (2, 32, 32, 32))
    semantic_loss_sparse(out["semantic_256"], sem).backward()
    assert float(dec.semantic_256[3].weight.grad.abs().sum()) > 0
    assert dec.query_proj_256.weight.grad is None
