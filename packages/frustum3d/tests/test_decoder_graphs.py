"""The padded graphs of frustum3d.decoder_graphs against FrustumDecoder.forward, in PyTorch only.

A small test driver plans each batch item the way an exporter's driver does (sets, kernel maps, unions,
generative sets, prunes: all with frustum3d's own coordinate functions, padded to M rows) and chains the
four graphs; the dense 64^3 level runs through the decoder's public dense modules. Every voxel set must be
the decoder's set row for row and every value within 1e-4 (relative to the output's largest value).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from frustum3d.decoder import FrustumDecoder, frustum_mask_at, in_grid, keep_mask
from frustum3d.decoder_graphs import (
    GRAPH_PARTS,
    RowSet,
    build_sparse_graphs,
    padded_conv,
    padded_instance_norm,
    row_sum,
)
from frustum3d.sparse import CoordinateSet, SparseConv3d, SparseInstanceNorm, SparseVoxels, get_kernel_map
from frustum3d.sparse.functional import transposed_output_set
from torch import Tensor

GRID = 32
M = 6144  # padded row count; the largest set of the scene is ~5100 voxels
RTOL = 1e-4
DECODER_KW = dict(input_groups=(2, 6, 5), query_dim=8, unet_features=4, unet_output_channels=4, min_keep=8)
NUM_QUERIES = 5
BIASES = (0.0, -0.6, -0.3)  # occupancy biases: each prune keeps a real fraction by prediction


def _decoder(biases=BIASES) -> FrustumDecoder:
    torch.manual_seed(0)
    dec = FrustumDecoder(**DECODER_KW, grid_dims=(GRID,) * 3).eval()
    with torch.no_grad():
        dec.occupancy_64.bias.fill_(biases[0])
        dec.occupancy_128.linear.bias.fill_(biases[1])
        dec.sparse_head("occupancy_256").conv.bias.fill_(biases[2])
    return dec


def _shell(item: int, radius: float, centre: tuple[int, int, int]) -> Tensor:
    ax = torch.arange(GRID)
    x, y, z = torch.meshgrid(ax, ax, ax, indexing="ij")
    dist = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2).float().sqrt()
    xyz = ((dist - radius).abs() < 0.8).nonzero()
    return torch.cat([torch.full((len(xyz), 1), item), xyz], 1)


def _scene(seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    coords = torch.cat([_shell(0, 4, (14, 16, 18)), _shell(1, 3, (18, 12, 16))])
    feats = torch.randn(len(coords), sum(DECODER_KW["input_groups"]), generator=gen)
    lifted = SparseVoxels(coords, feats, spatial_shape=(GRID,) * 3, batch_size=2)
    queries = torch.randn(2, NUM_QUERIES, DECODER_KW["query_dim"], generator=gen)
    frustum = torch.zeros(2, GRID, GRID, GRID, dtype=torch.bool)
    frustum[:, 2:30, 2:30, 4:] = True
    return lifted, queries, frustum


# ---------------------------------------------------------------------------------------------- test driver
def _nbr(a: CoordinateSet, b: CoordinateSet, kernel: int, transposed: bool = False) -> Tensor:
    table = get_kernel_map(a, b, kernel, 1, transposed=transposed).nbr.to(torch.int64)
    out = torch.full((M, table.shape[1]), M, dtype=torch.int64)
    out[: table.shape[0]] = torch.where(table < 0, torch.full_like(table, M), table)
    return out


def _rows(positions: Tensor, sources: Tensor, sentinel: int) -> Tensor:
    out = torch.full((M,), sentinel, dtype=torch.int64)
    out[positions] = sources.to(torch.int64)
    return out


def _num(count: int) -> Tensor:
    return torch.tensor([count], dtype=torch.int64)


def _pad(feats: Tensor) -> Tensor:
    out = feats.new_zeros((M, feats.shape[1]))
    out[: feats.shape[0]] = feats
    return out


def _union(a: CoordinateSet, b: CoordinateSet) -> tuple[CoordinateSet, Tensor, Tensor]:
    keys, inverse = torch.unique(torch.cat([a.keys, b.keys]), sorted=True, return_inverse=True)
    return CoordinateSet.from_sorted_keys(keys, a.stride, a.spatial_shape, 1), inverse[: a.num_voxels], \
        inverse[a.num_voxels:]


def _cells(coords: Tensor, stride: int) -> Tensor:
    g = GRID // stride
    c = coords[:, 1:] // stride
    return (c[:, 0] * g + c[:, 1]) * g + c[:, 2]


def _keep(dec: FrustumDecoder, logits: Tensor) -> Tensor:
    return keep_mask(logits, torch.zeros(len(logits), dtype=torch.int64), 1, dec.threshold, dec.min_keep, None)


def _dense64(dec: FrustumDecoder, e64: Tensor, queries: Tensor, fm64: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The decoder's dense levels through its public dense modules (as its forward runs them)."""
    d2 = dec.enc2(e64)
    d3 = dec.enc3(d2)
    d4 = dec.enc4(d3)
    u16 = torch.cat([d3, dec.dec4(d4)], 1)
    u32 = torch.cat([d2, dec.dec3(u16)], 1)
    u64 = torch.cat([e64, dec.dec2(u32)], 1)
    occ = dec.occupancy_64(u64.permute(0, 2, 3, 4, 1))[..., 0].masked_fill(~fm64, float("-inf"))
    pan = torch.einsum("bqc,bcxyz->bqxyz", dec.query_projection(64)(queries), dec.segm_embed_64(u64))
    return occ, pan.masked_fill(~fm64[:, None], float("-inf")), u64


def _run_item(dec, graphs, coords: Tensor, feats: Tensor, queries: Tensor, fm64: Tensor, record: dict) -> dict:
    """One batch item through the four graphs; ``record[part]`` gets the feeds."""
    grid = (GRID,) * 3

    def call(part: str, feeds: dict) -> dict:
        record[part] = feeds
        return graphs[part].run(feeds)

    s0, order = CoordinateSet.from_coords(coords, 1, grid, 1)
    s1 = s0.downsample(2)
    s2 = s1.downsample(2)
    cells = (GRID // 4) ** 3
    dense_from_s2 = torch.full((cells,), M, dtype=torch.int64)
    dense_from_s2[_cells(s2.coords, 4)] = torch.arange(s2.num_voxels)
    enc = call("encoder", {
        "lifted_feats": _pad(feats[order]), "num_s0": _num(s0.num_voxels), "num_s1": _num(s1.num_voxels),
        "num_s2": _num(s2.num_voxels), "nbr_s0_k3": _nbr(s0, s0, 3), "nbr_s0s1_k3": _nbr(s0, s1, 3),
        "nbr_s0s1_k4": _nbr(s0, s1, 4), "nbr_s1_k3": _nbr(s1, s1, 3), "nbr_s1s2_k3": _nbr(s1, s2, 3),
        "nbr_s1s2_k4": _nbr(s1, s2, 4), "nbr_s2_k3": _nbr(s2, s2, 3), "dense_from_s2": dense_from_s2})
    occ64, pan64, u64_dense = _dense64(dec, enc["encoder_features_64"], queries, fm64)

    cand = fm64.nonzero()
    cand4 = cand.clone()
    cand4[:, 1:] *= 4
    coords64 = cand4[_keep(dec, occ64[cand[:, 0], cand[:, 1], cand[:, 2], cand[:, 3]])]
    s64, _ = CoordinateSet.from_coords(coords64, 4, grid, 1)
    u64, from_s2, from_kept = _union(s2, s64)
    g128 = transposed_output_set(u64, 4, 2, True)
    lvl128 = call("level128", {
        "encoder_features_64_sparse": enc["encoder_features_64_sparse"], "decoder_features_64": u64_dense,
        "u64_from_s2": _rows(from_s2, torch.arange(s2.num_voxels), M),
        "u64_from_dense": _rows(from_kept, _cells(s64.coords, 4), cells),
        "nbr_u64g128_k4t": _nbr(u64, g128, 4, transposed=True), "num_g128": _num(g128.num_voxels),
        "nbr_g128_k3": _nbr(g128, g128, 3)})

    rows_x128 = in_grid(g128.coords, grid).nonzero().flatten()
    occ128 = lvl128["occupancy_128"][: g128.num_voxels][rows_x128]
    rows_k128 = rows_x128[_keep(dec, occ128[:, 0])]
    k128 = CoordinateSet(g128.coords[rows_k128], g128.keys[rows_k128], 2, grid, 1)
    u128, from_s1, from_k128 = _union(s1, k128)
    g256 = transposed_output_set(u128, 4, 2, True)
    rows_x256 = in_grid(g256.coords, grid).nonzero().flatten()
    x256 = CoordinateSet(g256.coords[rows_x256], g256.keys[rows_x256], 1, grid, 1)
    lvl256 = call("level256", {
        "encoder_features_128": enc["encoder_features_128"], "features_128": lvl128["features_128"],
        "u128_from_s1": _rows(from_s1, torch.arange(s1.num_voxels), M),
        "u128_from_g128": _rows(from_k128, rows_k128, M), "num_u128": _num(u128.num_voxels),
        "nbr_u128_k3": _nbr(u128, u128, 3), "segm_queries": queries,
        "nbr_u128g256_k4t": _nbr(u128, g256, 4, transposed=True), "num_g256": _num(g256.num_voxels),
        "x256_from_g256": _rows(torch.arange(x256.num_voxels), rows_x256, M), "num_x256": _num(x256.num_voxels),
        "nbr_x256_k3": _nbr(x256, x256, 3)})

    occ256 = lvl256["occupancy_256"][: x256.num_voxels]
    rows_k256 = _keep(dec, occ256[:, 0]).nonzero().flatten()
    k256 = CoordinateSet(x256.coords[rows_k256], x256.keys[rows_k256], 1, grid, 1)
    heads = call("heads256", {
        "features_256": lvl256["features_256"], "k256_from_x256": _rows(torch.arange(k256.num_voxels), rows_k256, M),
        "num_k256": _num(k256.num_voxels), "nbr_k256_k3": _nbr(k256, k256, 3), "segm_queries": queries})
    return {
        "occupancy_64": occ64, "panoptic_64": pan64,
        "occupancy_128": (g128.coords[rows_x128], occ128), "occupancy_256": (x256.coords, occ256),
        "panoptic_128": (u128.coords, lvl256["panoptic_128"][: u128.num_voxels]),
        "panoptic_256": (k256.coords, heads["panoptic_256"][: k256.num_voxels]),
        "geometry": (k256.coords, heads["geometry"][: k256.num_voxels]),
        "coords_64": s64.coords, "coords_128": u128.coords, "coords_256": k256.coords,
    }


def _rel_err(ref: Tensor, got: Tensor) -> float:
    """max|got - ref| / max|ref| over finite entries; non-finite entries must match exactly."""
    ref, got = ref.double(), got.double()
    assert ref.shape == got.shape
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(got)) and torch.equal(ref[~finite], got[~finite])
    scale = float(ref[finite].abs().max()) if bool(finite.any()) else 1.0
    return float((ref[finite] - got[finite]).abs().max()) / max(scale, 1e-12) if bool(finite.any()) else 0.0


def _item(value: SparseVoxels | Tensor, item: int):
    if isinstance(value, SparseVoxels):
        rows = value.coords[:, 0] == item
        coords = value.coords[rows].clone()
        coords[:, 0] = 0
        return coords, value.feats[rows]
    return value[item:item + 1]


def _run_all(dec, lifted, queries, frustum, record: dict | None = None) -> list[dict]:
    graphs = build_sparse_graphs(dec)
    fm64 = frustum_mask_at(frustum, 4)
    out = []
    for item in range(lifted.batch_size):
        coords, feats = _item(lifted, item)
        out.append(_run_item(dec, graphs, coords, feats, queries[item:item + 1], fm64[item:item + 1],
                             record.setdefault(item, {}) if record is not None else {}))
    return out


def _assert_matches_forward(dec, scene) -> None:
    lifted, queries, frustum = scene
    with torch.no_grad():
        ref = dec(lifted, queries, frustum)
        got = _run_all(dec, lifted, queries, frustum)
    for item, res in enumerate(got):
        for key in ("occupancy_64", "panoptic_64"):
            assert _rel_err(ref[key][item:item + 1], res[key]) < RTOL, key
        for key in ("occupancy_128", "occupancy_256", "panoptic_128", "panoptic_256", "geometry"):
            coords, feats = _item(ref[key], item)
            assert torch.equal(coords, res[key][0]), f"{key}: voxel sets differ"
            assert _rel_err(feats, res[key][1]) < RTOL, key
        for key in ("coords_64", "coords_128", "coords_256"):
            ref_coords = ref[key][ref[key][:, 0] == item].clone()
            ref_coords[:, 0] = 0
            assert torch.equal(ref_coords, res[key]), key


@pytest.fixture(scope="module")
def decoder_and_scene():
    return _decoder(), _scene()


# ---------------------------------------------------------------------------------------------- tests
def test_scene_prunes_a_real_fraction_at_every_level(decoder_and_scene) -> None:
    """Guard of the parity tests: each prune keeps some but not all candidates by prediction."""
    dec, (lifted, queries, frustum) = decoder_and_scene
    with torch.no_grad():
        ref = dec(lifted, queries, frustum)
    fractions = [float((ref["occupancy_64"][ref["frustum_mask_64"]] > 0).float().mean()),
                 float((ref["occupancy_128"].feats > 0).float().mean()),
                 float((ref["occupancy_256"].feats > 0).float().mean())]
    assert all(0.02 < f < 0.6 for f in fractions), fractions


def test_chained_graphs_equal_decoder_forward(decoder_and_scene) -> None:
    dec, scene = decoder_and_scene
    _assert_matches_forward(dec, scene)


def test_chained_graphs_equal_decoder_forward_when_a_prune_falls_back() -> None:
    dec = _decoder((0.0, -30.0, -0.3))  # nothing survives the 128 prune by prediction: top-min_keep
    scene = _scene()
    with torch.no_grad():
        assert not bool((dec(*scene)["occupancy_128"].feats > 0).any())
    _assert_matches_forward(dec, scene)


def test_padding_rows_do_not_reach_valid_outputs(decoder_and_scene) -> None:
    dec, (lifted, queries, frustum) = decoder_and_scene
    record: dict = {}
    with torch.no_grad():
        _run_all(dec, lifted, queries, frustum, record)
    graphs = build_sparse_graphs(dec)
    counts = {"lifted_feats": ("encoder", "num_s0"), "encoder_features_64_sparse": ("encoder", "num_s2"),
              "encoder_features_128": ("encoder", "num_s1"), "features_128": ("level128", "num_g128"),
              "features_256": ("level256", "num_x256")}
    gen = torch.Generator().manual_seed(11)
    changed = 0
    for part in GRAPH_PARTS:
        feeds = record[1][part]
        junk = dict(feeds)
        for name, (src, num) in counts.items():
            if name in feeds:
                n = int(record[1][src][num][0])
                value = feeds[name].clone()
                value[n:] = 1e3 * torch.randn(M - n, value.shape[1], generator=gen)
                junk[name] = value
                changed += 1
        graph = graphs[part]
        with torch.no_grad():
            clean, dirty = graph.run(feeds), graph.run(junk)
        for name in graph.output_names:
            rows = graph.output_rows.get(name)
            n = int(feeds[rows][0]) if rows else None
            torch.testing.assert_close(dirty[name][:n], clean[name][:n], rtol=1e-6, atol=1e-6)
    assert changed == 5


def test_graph_names_and_rejections(decoder_and_scene) -> None:
    dec, _ = decoder_and_scene
    graphs = build_sparse_graphs(dec)
    assert tuple(graphs) == GRAPH_PARTS
    for graph in graphs.values():
        assert set(graph.output_rows) <= set(graph.output_names)
        assert all(v in graph.input_names for v in graph.output_rows.values())
        assert not graph.training
    with pytest.raises(ValueError, match="takes 12 inputs"):
        graphs["encoder"](torch.zeros(1))
    multi = FrustumDecoder(**DECODER_KW, use_multi_scale=True, multi_scale_channels=6, grid_dims=(GRID,) * 3)
    with pytest.raises(ValueError, match="use_multi_scale"):
        build_sparse_graphs(multi)
    skip = FrustumDecoder(**DECODER_KW, fine_skip=True, grid_dims=(GRID,) * 3)
    with pytest.raises(ValueError, match="fine_skip"):
        build_sparse_graphs(skip)


def test_decoder_accessors_name_its_layers(decoder_and_scene) -> None:
    dec, _ = decoder_and_scene
    assert dec.sparse_encoder_stage(0).strided is dec.enc0[0] and dec.sparse_encoder_stage(1).block is dec.enc1[1]
    up128, up256 = dec.sparse_upsample_stage(128), dec.sparse_upsample_stage(256)
    assert up128.transposed is dec.dec1[0] and up128.block is dec.dec1[3] and up256.block is None
    assert dec.sparse_head("geometry").conv is dec.geometry_head[3]
    assert dec.sparse_head("panoptic_256").conv is None
    assert dec.query_projection(128) is dec.query_proj_128
    for call, bad in ((dec.sparse_encoder_stage, 2), (dec.sparse_upsample_stage, 64), (dec.sparse_head, "x"),
                      (dec.query_projection, 32)):
        with pytest.raises(ValueError, match="must be"):
            call(bad)


def test_padded_ops_equal_sparse_modules() -> None:
    """padded_conv == SparseConv3d and padded_instance_norm == SparseInstanceNorm on the valid rows;
    row_sum == sum."""
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    coords = torch.unique(torch.randint(0, 10, (300, 3), generator=gen), dim=0)
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1)
    x = SparseVoxels(coords, torch.randn(len(coords), 5, generator=gen), spatial_shape=(10, 10, 10), batch_size=1)
    conv = SparseConv3d(5, 3, 3, bias=True)
    with torch.no_grad():
        ref = conv(x)
    cset, order = CoordinateSet.from_coords(x.coords, 1, (10, 10, 10), 1)
    m = len(coords) + 7
    table = get_kernel_map(cset, cset, 3, 1).nbr.to(torch.int64)
    nbr = torch.full((m, table.shape[1]), m, dtype=torch.int64)
    nbr[: len(coords)] = torch.where(table < 0, torch.full_like(table, m), table)
    padded = torch.cat([x.feats[order], 50 * torch.randn(7, 5, generator=gen)])
    got = padded_conv(padded, nbr, conv.weight.detach(), conv.bias.detach())[: len(coords)]
    ref_sorted = SparseVoxels(ref.coords, ref.feats, spatial_shape=(10, 10, 10), batch_size=1)
    _, ref_order = CoordinateSet.from_coords(ref_sorted.coords, 1, (10, 10, 10), 1)
    torch.testing.assert_close(got, ref_sorted.feats[ref_order], rtol=1e-5, atol=1e-5)

    norm = SparseInstanceNorm(5)
    with torch.no_grad():
        normed = norm(x.replace_feats(x.feats[order]))
        rows = RowSet(torch.arange(m), torch.tensor([len(coords)]), torch.float32)
        got_norm = padded_instance_norm(padded, rows, norm)[: len(coords)]
    torch.testing.assert_close(got_norm, normed.feats, rtol=1e-4, atol=1e-4)
    values = torch.randn(1000, 3, dtype=torch.float64, generator=gen)
    assert np.allclose(row_sum(values).numpy(), values.sum(0, keepdim=True).numpy(), rtol=1e-12)
