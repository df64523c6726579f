"""Per-pass path choice of the Triton backend and the per-tile tap lists it feeds (CPU, no Triton needed)."""

from __future__ import annotations

import pytest
import torch
from frustum3d.sparse import SparseVoxels, get_kernel_map
from frustum3d.sparse.backends import triton_policy as tp


def _strided_map():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(1, 12, 12, 12, generator=gen) < 0.3
    x = SparseVoxels.from_dense(torch.randn(1, 2, 12, 12, 12, generator=gen), mask)
    cset = x.coordinate_set
    return get_kernel_map(cset, cset.downsample(2), 4)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("sorted_rows", [False, True])
@pytest.mark.parametrize("block_m", [1, 8, 64])
def test_tile_taps_list_exactly_the_non_empty_taps_of_each_tile(reverse, sorted_rows, block_m):
    kmap = _strided_map()
    table = kmap.reverse() if reverse else kmap.nbr
    if sorted_rows:
        table = table[kmap.row_order(reverse).long()]
    taps = kmap.tile_taps(reverse, block_m, sorted_rows)
    assert taps.dtype == torch.int32 and taps.shape == (-(-table.shape[0] // block_m), kmap.kernel_volume)
    for t in range(taps.shape[0]):
        rows = table[t * block_m:(t + 1) * block_m]
        want = sorted(set((rows >= 0).any(dim=0).nonzero().flatten().tolist()))
        got = taps[t].tolist()
        assert got[:len(want)] == want and all(v == -1 for v in got[len(want):])
    assert kmap.tile_taps(reverse, block_m, sorted_rows) is taps  # cached
    counts = kmap.tile_tap_counts(reverse, block_m, sorted_rows)  # the counted tap loop's bound
    assert counts.dtype == torch.int32 and counts.tolist() == (taps >= 0).sum(dim=1).tolist()
    assert kmap.tile_tap_counts(reverse, block_m, sorted_rows) is counts


def test_strided_input_gradient_table_is_mostly_empty_taps():
    kmap = _strided_map()
    # each fine voxel meets at most 8 of the 64 taps of a k4 s2 conv: the dgrad table is <= 1/8 full
    assert 0 < kmap.fill(True) <= 1 / 8
    assert kmap.fill(False) > kmap.fill(True)
    # tiles of one row (the exact mask) never list more than 8 taps
    assert int((kmap.tile_taps(True, 1, False) >= 0).sum(dim=1).max()) <= 8


def test_automatic_choice_follows_the_measured_rules():
    f32, b16 = torch.float32, torch.bfloat16
    # the input gradient is always row-sorted; so is any very sparse table (generative forward)
    for dtype in (f32, b16):
        for c in (16, 64, 96):
            assert tp.choose("dgrad", dtype, c, c, 0.7) == "sorted"
            assert tp.choose("fwd", dtype, c, c, 0.1) == "sorted"
    # forward: sorted from C32 on, tap lists at C16 (and fp32 C96)
    assert tp.choose("fwd", b16, 64, 64, 0.7) == "sorted"
    assert tp.choose("fwd", f32, 64, 64, 0.46) == "sorted"
    assert tp.choose("fwd", b16, 16, 16, 0.46) == "plain"
    assert tp.choose("fwd", f32, 16, 16, 0.46) == "sorted"
    assert tp.choose("fwd", f32, 16, 16, 0.7) == "taps"
    assert tp.choose("fwd", f32, 96, 96, 0.7) == "taps"
    assert tp.choose("fwd", b16, 96, 96, 0.7) == "sorted"
    # weight gradient: pair lists only for fp32, C >= 32, on the strided map
    assert tp.choose("wgrad", f32, 64, 64, 0.46) == "pairs"
    assert tp.choose("wgrad", f32, 16, 16, 0.46) == "rows"
    assert tp.choose("wgrad", b16, 64, 64, 0.46) == "rows"
    assert tp.choose("wgrad", f32, 64, 64, 0.7) == "rows"


def test_env_override_and_forced_paths(monkeypatch):
    def fill():
        raise AssertionError("the fill is only needed for the automatic choice")

    monkeypatch.setenv("FRUSTUM3D_TRITON_ROW_SORT", "1")
    assert tp.path_for("fwd", torch.float16, 16, 16, fill) == "sorted"
    assert tp.path_for("wgrad", torch.float16, 16, 16, fill) == "pairs"
    monkeypatch.setenv("FRUSTUM3D_TRITON_ROW_SORT", "0")
    assert tp.path_for("dgrad", torch.float16, 16, 16, fill) == "plain"
    assert tp.path_for("wgrad", torch.float16, 16, 16, fill) == "rows"
    monkeypatch.setenv("FRUSTUM3D_TRITON_ROW_SORT", "dgrad")
    assert tp.path_for("dgrad", torch.float16, 16, 16, fill) == "sorted"
    assert tp.path_for("fwd", torch.float16, 16, 16, fill) == "plain"
    with tp.force_paths(fwd="taps"):
        assert tp.path_for("fwd", torch.float16, 16, 16, fill) == "taps"
    monkeypatch.setenv("FRUSTUM3D_TRITON_ROW_SORT", "auto")
    assert tp.path_for("wgrad", torch.float32, 64, 64, lambda: 0.3) == "pairs"
    # rules that do not depend on the fill never read it (no device sync): dgrad, half-precision wgrad / C >= 32 fwd
    assert tp.path_for("dgrad", torch.float32, 64, 64, fill) == "sorted"
    assert tp.path_for("wgrad", torch.bfloat16, 64, 64, fill) == "rows"
    assert tp.path_for("fwd", torch.bfloat16, 64, 64, fill) == "sorted"
    monkeypatch.setenv("FRUSTUM3D_TRITON_ROW_SORT", "bogus")
    with pytest.raises(ValueError, match="unknown passes"):
        tp.path_for("fwd", torch.float32, 16, 16, fill)
    with pytest.raises(ValueError, match="bad path"), tp.force_paths(wgrad="sorted"):
        pass


@pytest.mark.parametrize("reverse", [False, True])
def test_offset_major_tables_have_an_offset_stride_divisible_by_16(reverse):
    # a stable divisibility keeps one compiled Triton variant for every voxel count (pruning changes N per step)
    kmap = _strided_map()
    table = kmap.reverse() if reverse else kmap.nbr
    om = kmap.offset_major(reverse)
    assert om.shape == table.shape and om.stride(0) == 1 and om.stride(1) % 16 == 0
    assert om.stride(1) >= table.shape[0]
    assert torch.equal(om, table)
    assert kmap.offset_major(reverse) is om


def test_aligned_copies_only_misaligned_views():
    pytest.importorskip("triton")
    from frustum3d.sparse.backends.triton_backend import _aligned

    base = torch.randn(10, 3).to(torch.bfloat16)
    view = base[1:]  # 6 bytes past an aligned allocation
    assert view.data_ptr() % 16 != 0
    fixed = _aligned(view)
    assert fixed.data_ptr() % 16 == 0 and torch.equal(fixed, view)
    assert _aligned(base) is base


def test_counted_loop_falls_back_to_the_branching_loop_when_shared_memory_runs_out(monkeypatch):
    # A wide input (C_in 512 in the full model's input encoder) makes the counted loop's pipelined buffers exceed
    # the GPU's shared memory; Triton raises before launching, and that shape then takes the branching loop.
    pytest.importorskip("triton")
    from frustum3d.sparse.backends import triton_backend as tb
    from triton.runtime.errors import OutOfResources

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kmap = _strided_map()
    calls = []

    def fake_launch(x, w, strides, nbr, out, cfg, perm=None, taps=None, counts=None):
        calls.append(counts is not None)
        if counts is not None:
            raise OutOfResources(300_000, 232_448, "shared memory")
        out.fill_(1.0)

    monkeypatch.setattr(tb, "_launch_gemm", fake_launch)
    monkeypatch.setattr(tb, "_branch_only", set())
    x = torch.randn(kmap.num_in, 8)
    w = torch.randn(kmap.kernel_volume, 8, 4)
    strides = (w.stride(0), w.stride(1), w.stride(2))
    with tb.tap_loop("count"):
        out = tb._gather_gemm(x, w, strides, 4, kmap, False, "fwd", "taps")
        assert calls == [True, False] and bool((out == 1).all())
        tb._gather_gemm(x, w, strides, 4, kmap, False, "fwd", "taps")  # remembered: straight to the branching loop
        assert calls == [True, False, False]
    with tb.tap_loop("branch"):
        tb._gather_gemm(x, w, strides, 4, kmap, False, "fwd", "sorted")
    assert calls[-1] is False
    # a config chosen by autotuning is remembered the same way
    key = ("fwd", "sorted", kmap.kernel_volume, 8, 4, torch.float32)
    monkeypatch.setitem(tb._tuned, key, tb.GemmConfig(32, 16, 16))
    with tb.tap_loop("count"):
        tb._gather_gemm(x, w, strides, 4, kmap, False, "fwd", "sorted")
        tb._gather_gemm(x, w, strides, 4, kmap, False, "fwd", "sorted")
    assert calls[-3:] == [True, False, False]
    monkeypatch.setenv("FRUSTUM3D_TRITON_TAP_LOOP", "count")
    assert tb._count_loop()
    monkeypatch.setenv("FRUSTUM3D_TRITON_TAP_LOOP", "")
    assert not tb._count_loop()  # off by default
    monkeypatch.setenv("FRUSTUM3D_TRITON_TAP_LOOP", "bogus")
    with pytest.raises(ValueError, match="FRUSTUM3D_TRITON_TAP_LOOP"):
        tb._count_loop()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with tb.tap_loop("count"):
        assert not tb._count_loop()  # the interpreter cannot run the counted loop


def test_block_size_powers_of_two_match_tritons() -> None:
    """The backend's own power-of-two helper (called on every convolution) agrees with ``triton.next_power_of_2``."""
    triton = pytest.importorskip("triton")
    from frustum3d.sparse.backends.triton_backend import _next_pow2, _pow2

    for n in list(range(0, 2100)) + [2**20 - 1, 2**20, 2**20 + 1]:
        assert _next_pow2(n) == triton.next_power_of_2(max(n, 1))
    assert [_pow2(c, 16, 64) for c in (1, 16, 17, 48, 96)] == [16, 16, 32, 64, 64]
