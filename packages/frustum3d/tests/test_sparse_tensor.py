"""SparseVoxels data model: construction, dense conversion, pruning, cat/union, kernel maps and their cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frustum3d.sparse import (  # noqa: E402
    SparseConv3d,
    SparseCoordinateError,
    SparseVoxels,
    get_kernel_map,
    kernel_offsets,
    sparse_cat,
    sparse_features_at,
    sparse_union,
)
from frustum3d.sparse import kernel_map as km  # noqa: E402
from frustum3d.sparse.coords import CoordinateSet, pack_keys, unpack_keys  # noqa: E402
from sparse_dense_reference import random_mask  # noqa: E402


def _dense_pair(seed: int, b=2, g=6, c=3, density=0.3):
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(b, g, density, gen)
    dense = torch.randn(b, c, g, g, g, generator=gen, dtype=torch.float64)
    return dense, mask


def test_from_dense_to_dense_roundtrip_and_order():
    dense, mask = _dense_pair(0)
    x = SparseVoxels.from_dense(dense, mask)
    assert x.num_voxels == int(mask.sum()) and x.batch_size == 2 and x.spatial_shape == (6, 6, 6)
    assert torch.equal(x.to_dense(), dense * mask[:, None])
    filled = x.to_dense(default_value=3.0)
    assert torch.equal(filled, torch.where(mask[:, None], dense, torch.full_like(dense, 3.0)))
    keys = pack_keys(x.coords)
    assert bool((keys[1:] > keys[:-1]).all())  # sorted, unique


def test_from_dense_stride_and_to_dense_at_stride():
    dense, mask = _dense_pair(1, g=4)
    x = SparseVoxels.from_dense(dense, mask, stride=2)
    assert x.stride == 2 and x.spatial_shape == (8, 8, 8)
    assert bool((x.coords[:, 1:] % 2 == 0).all())
    assert torch.equal(x.to_dense(), dense * mask[:, None])


def test_constructor_sorts_rows_and_permutes_features():
    coords = torch.tensor([[1, 2, 0, 0], [0, 0, 0, 4], [0, 0, 0, 1]])
    feats = torch.tensor([[1.0], [2.0], [3.0]])
    x = SparseVoxels(coords, feats, spatial_shape=(8, 8, 8))
    assert x.coords.tolist() == [[0, 0, 0, 1], [0, 0, 0, 4], [1, 2, 0, 0]]
    assert x.feats.flatten().tolist() == [3.0, 2.0, 1.0]
    assert x.batch_size == 2


@pytest.mark.parametrize(
    "coords,stride,match",
    [
        (torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]]), 1, "duplicate"),
        (torch.tensor([[0, 1, 2, 2]]), 2, "multiples"),
        (torch.tensor([[0, 1, 2]]), 1, r"\(N, 4\)"),
        (torch.tensor([[-1, 0, 0, 0]]), 1, "batch"),
        (torch.tensor([[0, 70000, 0, 0]]), 1, "range"),
    ],
)
def test_bad_coordinates_raise(coords, stride, match):
    with pytest.raises(SparseCoordinateError, match=match):
        SparseVoxels(coords, torch.zeros(coords.shape[0], 1), stride=stride)


def test_pack_unpack_roundtrip_with_negative_coordinates():
    c = torch.tensor([[0, -5, 3, 255], [3, 258, -3, 0], [1, 0, 0, 0]])
    assert torch.equal(unpack_keys(pack_keys(c)), c)


def test_select_prunes_like_dense_mask():
    dense, mask = _dense_pair(2)
    x = SparseVoxels.from_dense(dense, mask)
    keep = x.feats[:, 0] > 0
    y = x.select(keep)
    dense_keep = torch.zeros_like(mask)
    c = x.coords[keep]
    dense_keep[c[:, 0], c[:, 1], c[:, 2], c[:, 3]] = True
    assert torch.equal(y.to_dense(), dense * dense_keep[:, None])
    with pytest.raises(SparseCoordinateError):
        x.select(keep.float())


def test_select_gradient_reaches_kept_rows_only():
    dense, mask = _dense_pair(3)
    feats = SparseVoxels.from_dense(dense, mask).feats.clone().requires_grad_()
    x = SparseVoxels.from_dense(dense, mask).replace_feats(feats)
    keep = torch.arange(x.num_voxels) % 2 == 0
    x.select(keep).feats.sum().backward()
    assert torch.equal(feats.grad, keep[:, None].double().expand_as(feats))


def test_union_cat_and_add_against_dense():
    da, ma = _dense_pair(4, c=2)
    db, mb = _dense_pair(5, c=3)
    a, b = SparseVoxels.from_dense(da, ma), SparseVoxels.from_dense(db, mb)
    u = sparse_union(a, b)
    ref_mask = ma | mb
    assert u.num_voxels == int(ref_mask.sum())
    ref = torch.cat([da * ma[:, None], db * mb[:, None]], dim=1)
    assert torch.equal(u.to_dense(), ref)
    db2, mb2 = _dense_pair(6, c=2)
    b2 = SparseVoxels.from_dense(db2, mb2)
    s = sparse_union(a, b2, mode="add")
    assert torch.allclose(s.to_dense(), da * ma[:, None] + db2 * mb2[:, None])
    assert torch.allclose((a + b2).to_dense(), s.to_dense())
    with pytest.raises(SparseCoordinateError, match="equal channels"):
        sparse_union(a, b, mode="add")


def test_features_at_reads_the_source_at_the_target_voxels_against_dense():
    da, ma = _dense_pair(11, c=3)
    _, mb = _dense_pair(12, c=1)
    src = SparseVoxels.from_dense(da, ma)
    like = SparseVoxels.from_dense(torch.zeros(*mb.shape[:1], 1, *mb.shape[1:], dtype=torch.float64), mb)
    out = sparse_features_at(src, like)
    assert out.coordinate_set is like.coordinate_set and out.num_channels == 3
    # brute force: the dense source at every target voxel, zero where the source has no voxel
    ref = (da * ma[:, None]) * mb[:, None]
    assert torch.equal(out.to_dense(), ref)
    assert 0 < int((ma & mb).sum()) < int(mb.sum())  # both cases (hit and miss) occur
    same = sparse_features_at(src, src.replace_feats(src.feats[:, :1]))
    assert torch.equal(same.feats, src.feats)
    empty = SparseVoxels(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 3, dtype=torch.float64),
                         spatial_shape=src.spatial_shape, batch_size=2)
    assert torch.equal(sparse_features_at(empty, like).feats, torch.zeros(like.num_voxels, 3, dtype=torch.float64))
    with pytest.raises(SparseCoordinateError, match="sparse_features_at: strides differ"):
        sparse_features_at(src, SparseVoxels.from_dense(da, ma, stride=2))


def test_union_reuses_superset_and_keeps_cache():
    dense, mask = _dense_pair(7)
    a = SparseVoxels.from_dense(dense, mask)
    sub = a.select(a.feats[:, 0] > 0)
    u = sparse_union(a, sub.replace_feats(sub.feats[:, :1]))
    assert u.coordinate_set is a.coordinate_set
    assert u.num_channels == 4


def test_cat_requires_identical_coordinates():
    dense, mask = _dense_pair(8)
    a = SparseVoxels.from_dense(dense, mask)
    b = a.replace_feats(a.feats * 2)
    c = sparse_cat(a, b)
    assert torch.equal(c.feats, torch.cat([a.feats, 2 * a.feats], 1))
    # Identical coordinates in a different set object also work.
    a2 = SparseVoxels.from_dense(dense, mask)
    assert sparse_cat(a, a2).num_channels == 6
    other = a.select(torch.arange(a.num_voxels) > 0)
    with pytest.raises(SparseCoordinateError, match="identical"):
        sparse_cat(a, other)


def test_kernel_offsets_convention():
    o3 = kernel_offsets(3)
    assert o3[0].tolist() == [-1, -1, -1] and o3[1].tolist() == [0, -1, -1]  # x fastest
    assert o3[13].tolist() == [0, 0, 0]
    o4 = kernel_offsets(4)
    assert o4.min().item() == 0 and o4.max().item() == 3 and o4[1].tolist() == [1, 0, 0]
    assert kernel_offsets(3, dilation=2)[0].tolist() == [-2, -2, -2]
    # the host copy is built once and shared (read-only), per size and dilation
    assert kernel_offsets(3) is o3 and kernel_offsets(3, dilation=2) is not o3


def _brute_force_nbr(in_coords, out_coords, deltas):
    table = {tuple(c): i for i, c in enumerate(in_coords.tolist())}
    rows = []
    for q in out_coords.tolist():
        rows.append([table.get((q[0], q[1] + dx, q[2] + dy, q[3] + dz), -1) for dx, dy, dz in deltas.tolist()])
    return torch.tensor(rows, dtype=torch.int32).reshape(len(out_coords), len(deltas))


def _map_sets(k: int, stride: int, transposed: bool):
    """(input set, output set, offsets in finest units) of one kernel map over a random batch-2 tensor at stride 2:
    a subm / strided conv's, or a generative transposed conv's."""
    dense, mask = _dense_pair(9, g=8, density=0.2)
    cin = SparseVoxels.from_dense(dense, mask, stride=2).coordinate_set
    if transposed:
        cout = cin.generate(kernel_offsets(k), 1, ("test", k))
        return cin, cout, -kernel_offsets(k) * cout.stride
    cout = cin if stride == 1 else cin.downsample(stride)
    return cin, cout, kernel_offsets(k) * cin.stride


@pytest.mark.parametrize("k,stride,transposed", [(3, 1, False), (4, 2, False), (5, 1, False), (4, 2, True)])
def test_kernel_map_grid_equals_search_equals_brute_force(k, stride, transposed):
    cin, cout, deltas = _map_sets(k, stride, transposed)
    ref = _brute_force_nbr(cin.coords, cout.coords, deltas)
    grid = km.build_neighbour_table(cin, cout, deltas, "grid")
    search = km.build_neighbour_table(cin, cout, deltas, "search")
    assert torch.equal(grid, ref) and torch.equal(search, ref)
    kmap = get_kernel_map(cin, cout, k, 1, transposed)
    assert torch.equal(kmap.nbr, ref)
    rev = kmap.reverse()
    for p, kk in [(0, 0), (1, 5)]:
        q = int(rev[p, kk])
        if q >= 0:
            assert int(ref[q, kk]) == p
    assert int((rev >= 0).sum()) == int((ref >= 0).sum())


@pytest.mark.parametrize("method", ["grid", "search"])
@pytest.mark.parametrize("k,stride,transposed", [(3, 1, False), (4, 2, False), (4, 2, True)])
def test_builders_store_tables_offset_major(method, k, stride, transposed):
    """Both builders and ``reverse()`` store their tables offset-major (padded to 16 rows): ``offset_major()``
    hands them to the Triton kernels as they are, with no transposed copy; the padding rows hold -1."""
    cin, cout, deltas = _map_sets(k, stride, transposed)
    table = km.build_neighbour_table(cin, cout, deltas, method)
    assert km.is_offset_major(table) and table.stride(1) == km.padded_rows(table.shape[0])
    storage = torch.as_strided(table, (table.shape[1], table.stride(1)), (table.stride(1), 1))
    assert bool((storage[:, table.shape[0]:] == -1).all())
    kmap = km.KernelMap(table, cin.num_voxels)
    assert kmap.offset_major() is table
    rev = kmap.reverse()
    assert km.is_offset_major(rev) and kmap.offset_major(reverse=True) is rev
    # a row-major table (built elsewhere) is still accepted: offset_major() copies it once into that layout
    dense = km.KernelMap(table.contiguous(), cin.num_voxels)
    om = dense.offset_major()
    assert om is not dense.nbr and km.is_offset_major(om) and torch.equal(om, table)


def test_grid_falls_back_to_search_when_too_large(monkeypatch):
    coords = torch.tensor([[0, 0, 0, 0], [0, 20000, 0, 0], [0, 20001, 0, 0]])
    x = SparseVoxels(coords, torch.ones(3, 1), spatial_shape=(30000, 4, 4))
    cset = x.coordinate_set
    deltas = kernel_offsets(3)
    monkeypatch.setattr(km, "GRID_MAX_CELLS", 1000)
    with pytest.raises(ValueError, match="GRID_MAX_CELLS"):
        km.build_neighbour_table(cset, cset, deltas, "grid")
    auto = km.build_neighbour_table(cset, cset, deltas, "auto")
    assert torch.equal(auto, _brute_force_nbr(cset.coords, cset.coords, deltas))


@pytest.mark.parametrize("k,stride,transposed", [(3, 1, False), (4, 2, False), (4, 2, True)])
def test_index_grid_cells_decides_the_auto_builder(monkeypatch, k, stride, transposed):
    """``index_grid_cells`` is the size the ``auto`` builder compares with the limit (batch 2 here: the grid
    spans both items): at that many cells it takes the grid, one fewer and it searches, with the same table;
    ``FRUSTUM3D_KMAP_GRID_CELLS`` overrides the limit and a bad value is refused by name."""
    cin, cout, deltas = _map_sets(k, stride, transposed)
    assert cin.batch_size == 2
    cells = km.index_grid_cells(cin, cout, k, 1, transposed)
    assert cells > 0 and cells % 2 == 0
    ref = _brute_force_nbr(cin.coords, cout.coords, deltas)
    searched = []
    search = km._search_lookup
    monkeypatch.setattr(km, "_search_lookup", lambda *a: searched.append(1) or search(*a))
    monkeypatch.setenv("FRUSTUM3D_KMAP_GRID_CELLS", str(cells))
    assert km.grid_max_cells() == cells
    assert torch.equal(km.build_neighbour_table(cin, cout, deltas, "auto"), ref) and not searched
    monkeypatch.setenv("FRUSTUM3D_KMAP_GRID_CELLS", str(cells - 1))
    assert torch.equal(km.build_neighbour_table(cin, cout, deltas, "auto"), ref) and searched == [1]
    monkeypatch.setenv("FRUSTUM3D_KMAP_GRID_CELLS", "lots")
    with pytest.raises(ValueError, match="FRUSTUM3D_KMAP_GRID_CELLS"):
        km.build_neighbour_table(cin, cout, deltas, "auto")
    monkeypatch.delenv("FRUSTUM3D_KMAP_GRID_CELLS")
    assert km.grid_max_cells() == km.GRID_MAX_CELLS
    # the default admits a 256^3 frustum with a k4 halo at batch 4 (the first limit, 2^25, sent it to the search)
    assert 4 * (256 + 3) ** 3 <= km.GRID_MAX_CELLS


def test_kernel_map_is_cached_and_shared_by_derived_tensors():
    dense, mask = _dense_pair(10)
    x = SparseVoxels.from_dense(dense, mask)
    c1, c2 = SparseConv3d(3, 3, 3).double(), SparseConv3d(3, 3, 3).double()
    y = c2(c1(x))
    assert y.coordinate_set is x.coordinate_set
    maps = [v for key, v in x.coordinate_set.cache.items() if key[0] == "kmap"]
    assert len(maps) == 1  # both convs used one cached map
    m1 = get_kernel_map(x.coordinate_set, x.coordinate_set, 3)
    assert m1 is maps[0]


def test_coordinate_set_select_keeps_finer_links():
    dense, mask = _dense_pair(11, g=8)
    x = SparseVoxels.from_dense(dense, mask)
    coarse = x.coordinate_set.downsample(2)
    pruned = coarse.select(torch.ones(coarse.num_voxels, dtype=torch.bool))
    assert pruned.finer[1] is x.coordinate_set
    assert isinstance(pruned, CoordinateSet)


def test_to_dense_drops_voxels_outside_grid():
    coords = torch.tensor([[0, -1, 0, 0], [0, 1, 1, 1], [0, 4, 0, 0]])
    x = SparseVoxels(coords, torch.tensor([[1.0], [2.0], [3.0]]), spatial_shape=(4, 4, 4))
    d = x.to_dense()
    assert d.shape == (1, 1, 4, 4, 4) and d.sum().item() == 2.0 and d[0, 0, 1, 1, 1].item() == 2.0


def test_grid_lookup_ignores_input_rows_outside_the_queried_box():
    """Input rows outside the box the queries span (a small output set inside a large input set) are parked
    in a spare cell no query reads, so the table still equals the brute force."""
    cin_t = SparseVoxels(torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1], [0, 2, 2, 2], [0, 9, 9, 9], [1, 1, 1, 1],
                                       [1, 14, 0, 3]]), torch.ones(6, 1), spatial_shape=(16, 16, 16))
    cout_t = SparseVoxels(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 2]]), torch.ones(2, 1), spatial_shape=(16, 16, 16),
                          batch_size=2)
    deltas = kernel_offsets(3)
    ref = _brute_force_nbr(cin_t.coordinate_set.coords, cout_t.coordinate_set.coords, deltas)
    grid = km.build_neighbour_table(cin_t.coordinate_set, cout_t.coordinate_set, deltas, "grid")
    assert torch.equal(grid, ref) and int((ref >= 0).sum()) == 4  # (0,0,0), (1,1,1), (2,2,2); (1,1,1) of item 1


def _sync_counter():
    """A dispatch mode recording the ops that make the host wait for a GPU (nonzero, unique, .item()); on the CPU
    they run as usual, so a CPU test can count what would be device synchronisations."""
    from torch.utils._python_dispatch import TorchDispatchMode

    sync_ops = ("aten.nonzero", "aten._unique2", "aten.unique", "aten._local_scalar_dense", "aten.is_nonzero")

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if name.startswith(sync_ops):
                self.ops.append(name)
            return func(*args, **(kwargs or {}))

    return Count()


@pytest.mark.parametrize("k,stride", [(4, 2), (3, 1), (2, 2)])
def test_generated_map_equals_looked_up_map(k, stride):
    """A generative transposed conv's map is read from the rows its output set's generation gave every (input,
    offset) pair: its table, reverse table, pair lists, fill, row order and tile tap lists all equal those of the
    map looked up over the output set, and building it (and its fill) needs no host read."""
    from frustum3d.sparse.functional import transposed_output_set

    dense, mask = _dense_pair(9, g=8, density=0.2)
    cin = SparseVoxels.from_dense(dense, mask, stride=2).coordinate_set
    cout = transposed_output_set(cin, k, stride, generative=True)
    with _sync_counter() as c:
        gen = get_kernel_map(cin, cout, k, 1, transposed=True)
        fill = gen.fill(False)
    assert c.ops == [] and gen._generated is not None
    xyz = cout.coords[:, 1:]  # the generated set's bounds, set from the input's and the offsets'
    assert cout.bounds() == (xyz.min(dim=0).values.tolist(), xyz.max(dim=0).values.tolist())
    deltas = -kernel_offsets(k) * cout.stride
    looked = km.KernelMap(km.build_neighbour_table(cin, cout, deltas, "search"), cin.num_voxels)
    assert torch.equal(gen.nbr, _brute_force_nbr(cin.coords, cout.coords, deltas))
    assert torch.equal(gen.nbr, looked.nbr) and km.is_offset_major(gen.nbr) and gen.offset_major() is gen.nbr
    assert gen.num_pairs() == looked.num_pairs() == cin.num_voxels * k**3 and fill == looked.fill(False)
    assert torch.equal(gen.reverse(), looked.reverse()) and km.is_offset_major(gen.reverse())
    (gi, go, gc), (li, lo, lc) = gen.pairs(), looked.pairs()
    assert torch.equal(gi, li) and torch.equal(go, lo) and gc == lc
    assert torch.equal(gen.pair_starts()[2], looked.pair_starts()[2])
    assert torch.equal(gen.row_order(False), looked.row_order(False))
    for block_m in (1, 16, 64):
        for sorted_rows in (False, True):
            for reverse in (False, True):
                assert torch.equal(gen.tile_taps(reverse, block_m, sorted_rows),
                                   looked.tile_taps(reverse, block_m, sorted_rows)), (block_m, sorted_rows, reverse)
    # under deterministic algorithms the row order and tap lists come from the table (no accumulating index_add_)
    fresh = km.KernelMap.from_generated_rows(gen._generated, cout.num_voxels)
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(fresh.row_order(False), looked.row_order(False))
        assert torch.equal(fresh.tile_taps(False, 16, True), looked.tile_taps(False, 16, True))
    finally:
        torch.use_deterministic_algorithms(False)


def test_kernel_map_and_coordinate_checks_need_few_host_reads():
    """Building a kernel map launches no op that makes the host wait for a GPU (nonzero, unique, .item()), and
    validating user coordinates reads the device once for all checks (plus the duplicate check): counted with
    a dispatch mode on the CPU, where each such op would be a device synchronisation on a GPU."""
    Count = _sync_counter

    dense, mask = _dense_pair(9, g=8, density=0.2)
    coords = mask.nonzero()
    with Count() as c:
        x = SparseVoxels(coords, torch.ones(coords.shape[0], 1), stride=1, spatial_shape=(8, 8, 8), batch_size=2)
    assert c.ops.count("aten._local_scalar_dense") <= 1, c.ops  # the duplicate check; the rest is one .tolist()
    cin = x.coordinate_set
    for k, cout in ((3, cin), (4, cin.downsample(2))):
        with Count() as c:
            get_kernel_map(cin, cout, k)
        assert c.ops == [], (k, c.ops)


def test_kernel_map_box_uses_no_torch_reduction_on_host_offsets():
    """The index grid's box is sized from the set's cached bounds and the kernel offsets, the offsets' bounds taken
    in Python: a torch min/max over dim 0 of a small CPU tensor enters an OpenMP region (grain size 1), about 1 ms
    per call on a busy training host. Once the set's bounds are cached, building maps dispatches no min/max."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reductions(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket).startswith(("aten.min", "aten.max", "aten.amin", "aten.amax")):
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    _, mask = _dense_pair(11, g=8, density=0.2)
    x = SparseVoxels(mask.nonzero(), torch.ones(int(mask.sum()), 1), stride=1, spatial_shape=(8, 8, 8), batch_size=2)
    cin = x.coordinate_set
    for k, cout in ((3, cin), (4, cin.downsample(2))):
        cout.bounds()
        with Reductions() as r:
            cells = km.index_grid_cells(cin, cout, k)
            km.build_neighbour_table(cin, cout, km._map_deltas(cin, cout, k, 1, False), method="grid")
        assert r.ops == [], (k, r.ops)
        # the box: every query plus every offset, in lattice steps, over both batch items
        xyz = cout.coords[:, 1:]
        d = km._map_deltas(cin, cout, k, 1, False)
        step = km._lattice_step(cin, cout, d)
        ext = ((xyz.max(0).values + d.max(0).values) - (xyz.min(0).values + d.min(0).values)) // step + 1
        assert cells == 2 * int(ext.prod())


def test_host_to_device_gives_the_values_on_the_device():
    """``host_to_device``: a host sequence or CPU tensor as the requested dtype on the device (CPU here)."""
    from frustum3d.sparse.transfer import host_to_device

    t = host_to_device([3, -1, 7], "cpu")
    assert t.dtype == torch.int64 and t.tolist() == [3, -1, 7]
    f = host_to_device(torch.tensor([1, 2]), torch.device("cpu"), torch.float32)
    assert f.dtype == torch.float32 and f.tolist() == [1.0, 2.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the host synchronisation is a CUDA effect")
def test_kernel_maps_on_cuda_make_no_blocking_host_copies():
    """On CUDA, building a kernel map on a set with cached bounds copies its box corner, extent and offsets from
    pinned memory without synchronising the stream: torch's sync debug mode raises on any blocking copy."""
    from frustum3d.sparse.transfer import host_to_device

    _, mask = _dense_pair(11, g=8, density=0.2)
    x = SparseVoxels(mask.nonzero().cuda(), torch.ones(int(mask.sum()), 1, device="cuda"), stride=1,
                     spatial_shape=(8, 8, 8), batch_size=2)
    cin = x.coordinate_set
    cout = cin.downsample(2)
    cin.bounds(), cout.bounds()
    expected = km.build_neighbour_table(cin, cout, km._map_deltas(cin, cout, 3, 1, False), method="grid").cpu()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        table = km.build_neighbour_table(cin, cout, km._map_deltas(cin, cout, 3, 1, False), method="grid")
        values = host_to_device([5, 6], "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(table.cpu(), expected) and values.tolist() == [5, 6]


def test_batch_counts_are_read_once_per_coordinate_set(monkeypatch):
    """``CoordinateSet.batch_counts``: voxels per batch item (an empty item counts 0), computed once and shared by
    every tensor on the same coordinates (replace_feats), so instance norms and per-item losses on one set pay one
    host read; a pruned set counts again."""
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [2, 0, 1, 0], [2, 3, 3, 3], [2, 1, 1, 1]])
    x = SparseVoxels(coords, torch.randn(5, 2), batch_size=4)
    calls = {"n": 0}
    bincount = torch.bincount

    def counted(*args, **kwargs):
        calls["n"] += 1
        return bincount(*args, **kwargs)

    monkeypatch.setattr(torch, "bincount", counted)
    assert x.coordinate_set.batch_counts() == [2, 0, 3, 0]
    y = x.replace_feats(torch.randn(5, 7))
    assert y.coordinate_set.batch_counts() == [2, 0, 3, 0] and calls["n"] == 1
    pruned = x.select(torch.tensor([True, False, True, True, False]))
    assert pruned.coordinate_set.batch_counts() == [1, 0, 2, 0] and calls["n"] == 2
    empty = x.select(torch.zeros(5, dtype=torch.bool))
    assert empty.coordinate_set.batch_counts() == [0, 0, 0, 0]


def test_generate_refuses_coordinates_outside_the_key_range():
    """A generative up-sampling whose candidates would leave the packed-key range is refused by name (checked from
    the set's bounds, before any key is built)."""
    from frustum3d.sparse.coords import COORD_MAX, SparseCoordinateError

    cset, _ = CoordinateSet.from_coords(torch.tensor([[0, COORD_MAX - 1, 0, 0]]), 1, (8, 8, 8))
    with pytest.raises(SparseCoordinateError, match="leave the supported range"):
        cset.generate(kernel_offsets(4), 1, ("gen", 4, 2))
    assert cset.generate(kernel_offsets(2), 1, ("gen", 2, 1)).num_voxels == 8  # + (0..1)^3 still fits


def _set_with_negative_coords(seed: int, stride: int = 1) -> CoordinateSet:
    gen = torch.Generator().manual_seed(seed)
    coords = (torch.rand(2, 9, 9, 9, generator=gen) < 0.3).nonzero()
    coords[:, 1:] = (coords[:, 1:] - 3) * stride  # both signs on every axis, odd bounds
    return CoordinateSet.from_coords(coords, stride, (64, 64, 64), 2)[0]


@pytest.mark.parametrize("stride,factor", [(1, 2), (1, 4), (2, 2), (1, 3), (2, 3)])
def test_downsample_floors_every_axis_from_the_keys(stride, factor):
    # power-of-two strides clear key bits; others (3, 6) take the coordinate path: both equal the floor rule
    cset = _set_with_negative_coords(stride, stride)
    down = cset.downsample(factor)
    s = stride * factor
    want = cset.coords.clone()
    want[:, 1:] = torch.div(want[:, 1:], s, rounding_mode="floor") * s
    want = torch.unique(want, dim=0)  # lexicographic (b, x, y, z) rows: the packed-key order
    assert down.stride == s and torch.equal(down.coords, want) and torch.equal(down.keys, pack_keys(want))


def test_sets_made_from_keys_unpack_their_coordinates_only_when_read():
    cset = _set_with_negative_coords(7).downsample(2)
    assert cset._coords is None and cset.num_voxels == cset.keys.shape[0]
    lazy_batch = cset.batch_index()
    assert cset._coords is None  # the batch index comes from the keys
    assert torch.equal(cset.coords, unpack_keys(cset.keys)) and torch.equal(lazy_batch, cset.coords[:, 0])
    assert torch.equal(cset.batch_index(), lazy_batch)
    mask = torch.arange(cset.num_voxels) % 3 != 0
    lazy = CoordinateSet.from_sorted_keys(cset.keys, cset.stride, cset.spatial_shape, 2).select(mask)
    kept = cset.select(mask)  # coordinates already unpacked: selected alongside the keys
    assert lazy._coords is None and kept._coords is not None
    assert torch.equal(lazy.coords, kept.coords) and torch.equal(lazy.keys, kept.keys)
    assert torch.equal(kept.coords, cset.coords[mask])
    moved = cset.to("cpu")
    assert moved is not cset and torch.equal(moved.coords, cset.coords)


def test_select_shares_one_row_selection_and_passes_gradients():
    dense, mask = _dense_pair(5)
    x = SparseVoxels.from_dense(dense, mask)
    feats = x.feats.clone().requires_grad_()
    keep = torch.arange(x.num_voxels) % 2 == 0
    y = x.replace_feats(feats).select(keep)
    assert torch.equal(y.coords, x.coords[keep]) and torch.equal(y.feats, x.feats[keep])
    y.feats.sum().backward()
    assert torch.equal(feats.grad[:, 0], keep.double())


def test_downsampled_and_united_sets_derive_known_bounds_on_the_host():
    cset = _set_with_negative_coords(11)
    fine_bounds = cset.known_bounds()  # from_coords reads them with its input checks
    assert fine_bounds is not None
    cset.cache.pop("bounds")
    assert fine_bounds == cset.bounds()
    down = cset.downsample(2)
    derived = down.known_bounds()
    assert derived is not None and down._coords is None  # from the parent's bounds, nothing unpacked
    down.cache.pop("bounds")
    assert derived == down.bounds() and derived != fine_bounds
    a = SparseVoxels.from_set(cset, torch.zeros(cset.num_voxels, 1))
    other = _set_with_negative_coords(12)
    b = SparseVoxels.from_set(other, torch.zeros(other.num_voxels, 1))
    union = sparse_union(a, b).coordinate_set
    derived = union.known_bounds()
    assert derived is not None
    union.cache.pop("bounds")
    assert derived == union.bounds()


@pytest.mark.parametrize("unpacked", [False, True])
def test_inside_the_grid_from_keys_or_coordinates(unpacked):
    cset = _set_with_negative_coords(13)  # coordinates -3 .. 5 on every axis
    lazy = CoordinateSet.from_sorted_keys(cset.keys, 1, cset.spatial_shape, 2)
    if unpacked:
        assert torch.equal(lazy.coords, cset.coords)  # reading them unpacks (and keeps) them
    dims = (4, 5, 3)
    want = ((cset.coords[:, 1:] >= 0) & (cset.coords[:, 1:] < torch.tensor(dims))).all(1)
    assert want.any() and not want.all()
    assert torch.equal(lazy.inside(dims), want) and (lazy._coords is not None) == unpacked


def test_bounds_of_a_set_from_keys_leave_its_coordinates_packed():
    cset = _set_with_negative_coords(14)
    want = cset.bounds()
    lazy = CoordinateSet.from_sorted_keys(cset.keys, 1, cset.spatial_shape, 2)
    assert lazy.bounds() == want and lazy._coords is None


def _dispatched(fn) -> set[str]:
    """Names of the ATen ops ``fn`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Names(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    with Names() as mode:
        fn()
    return mode.names


def test_from_coords_takes_sorted_unique_rows_as_they_are():
    """Rows that already come sorted and unique (a ``nonzero()``, a dense grid's voxels) are found within the one
    host read of the checks: no sort, no duplicate read, no gather, and SparseVoxels keeps the features without
    comparing the order with arange (a device sync each before)."""
    gen = torch.Generator().manual_seed(3)
    coords = (torch.rand(2, 6, 6, 6, generator=gen) < 0.4).nonzero()  # sorted (b, x, y, z), unique
    coords[:, 1:] -= 2  # negative coordinates keep the key order
    feats = torch.randn(coords.shape[0], 3, generator=gen)
    cset, order = CoordinateSet.from_coords(coords, 1, (8, 8, 8))
    assert cset.cache["input_order_is_identity"] is True
    assert torch.equal(order, torch.arange(coords.shape[0])) and torch.equal(cset.coords, coords)
    assert torch.equal(cset.keys, torch.sort(pack_keys(coords)).values)
    ops = _dispatched(lambda: SparseVoxels(coords, feats, spatial_shape=(8, 8, 8)))
    assert not ops & {"sort", "equal", "index", "index_select", "gather"}, ops
    x = SparseVoxels(coords, feats, spatial_shape=(8, 8, 8))
    assert x.feats is feats
    kept = coords.clone()
    coords[:, 1] += 1  # the caller's tensor stays the caller's: the set holds a copy
    assert torch.equal(x.coords, kept)
    coords = kept

    # shuffled rows: sorted once, the features follow their rows
    perm = torch.randperm(coords.shape[0], generator=gen)
    y = SparseVoxels(coords[perm], feats[perm], spatial_shape=(8, 8, 8))
    assert y.coordinate_set.cache["input_order_is_identity"] is False
    assert torch.equal(y.coords, coords) and torch.equal(y.feats, feats)
    assert "equal" not in _dispatched(lambda: SparseVoxels(coords[perm], feats[perm], spatial_shape=(8, 8, 8)))

    # sorted but with a repeated row: not strictly increasing, so the duplicate check still runs and refuses it
    twice = torch.cat([coords[:1], coords])
    with pytest.raises(SparseCoordinateError, match="duplicate rows"):
        CoordinateSet.from_coords(twice, 1, (8, 8, 8))
    # one row and no rows
    one, order1 = CoordinateSet.from_coords(coords[:1], 1, (8, 8, 8))
    assert one.cache["input_order_is_identity"] and torch.equal(order1, torch.zeros(1, dtype=torch.int64))
    empty, order0 = CoordinateSet.from_coords(coords[:0], 1, (8, 8, 8), batch_size=2)
    assert empty.num_voxels == 0 and order0.numel() == 0
