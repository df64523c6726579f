"""The Triton kernel-map builders (:mod:`frustum3d.sparse.kmap_triton`) equal the torch ones: neighbour tables of
submanifold, strided and transposed maps (negative coordinates, two batch items given in shuffled order, inputs
outside the queried box) and the per-tile tap lists of both tables, in storage order and row-sorted; and the generated sets of generative
transposed convolutions (sorted keys and every candidate's row) from the marked grid."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from frustum3d.sparse import kernel_map as km
from frustum3d.sparse.backends import triton_available

SRC = Path(__file__).resolve().parent.parent / "src"

_CHECK = textwrap.dedent(
    """
    import itertools, os, sys
    import torch
    from frustum3d.sparse import CoordinateSet
    from frustum3d.sparse import kernel_map as km

    device, grid = torch.device(sys.argv[1]), int(sys.argv[2])
    gen = torch.Generator().manual_seed(0)

    def coordinate_set(size, stride, fill):
        coords = (torch.rand(2, size, size, size, generator=gen) < fill).nonzero()
        coords[:, 1:] = coords[:, 1:] * stride - 4  # some coordinates negative
        coords = coords[torch.randperm(coords.shape[0], generator=gen)].to(device)
        return CoordinateSet.from_coords(coords, stride, (4 * size,) * 3, 2)[0]

    def build(flag, cin, cout, k, transposed):
        os.environ["FRUSTUM3D_KMAP_TRITON"] = flag
        deltas = km._map_deltas(cin, cout, k, 1, transposed)
        return km.KernelMap(km.build_neighbour_table(cin, cout, deltas), cin.num_voxels)

    fine, coarse = coordinate_set(grid, 1, 0.3), coordinate_set(grid // 2, 2, 0.5)
    part = coordinate_set(grid // 2, 1, 0.3)  # a smaller output set: most input rows lie outside its box
    cases = [(fine, fine, 3, False), (fine, coarse, 4, False), (fine, coarse, 2, False), (coarse, fine, 4, True),
             (fine, part, 3, False), (coarse, coarse, 3, False)]
    n = 0
    for cin, cout, k, transposed in cases:
        ref, got = build("0", cin, cout, k, transposed), build("1", cin, cout, k, transposed)
        assert km.is_offset_major(got.nbr) and torch.equal(got.nbr, ref.nbr), (k, transposed)
        assert (got.nbr >= 0).any()
        n += 1
        for reverse, block_m, sorted_rows in itertools.product((False, True), (16, 128), (False, True)):
            os.environ["FRUSTUM3D_KMAP_TRITON"] = "0"
            want = ref.tile_taps(reverse, block_m, sorted_rows)
            os.environ["FRUSTUM3D_KMAP_TRITON"] = "1"
            have = got.tile_taps(reverse, block_m, sorted_rows)
            assert torch.equal(have, want), (k, transposed, reverse, block_m, sorted_rows)
            if sorted_rows:  # the opt-in per-row tap masks give the same lists
                from frustum3d.sparse.kmap_triton import tile_tap_lists
                table = got.reverse() if reverse else got.nbr
                os.environ["FRUSTUM3D_TILE_TAP_MASKS"] = "1"
                masked = tile_tap_lists(table.t(), block_m, got.row_order(reverse))
                os.environ["FRUSTUM3D_TILE_TAP_MASKS"] = "0"
                assert torch.equal(masked, want), (k, transposed, reverse, block_m, "masks")
            n += 1
    # generated sets (generative transposed convolutions): the marked-grid unique equals the sorted one
    from frustum3d.sparse.coords import generative_key
    from frustum3d.sparse.kernel_map import kernel_offsets
    for src, k, stride in [(coarse, 4, 2), (coarse, 2, 2), (fine, 3, 1), (part, 4, 1)]:
        made = {}
        for flag in ("0", "1"):
            os.environ["FRUSTUM3D_KMAP_TRITON"] = flag
            s = CoordinateSet.from_sorted_keys(src.keys, src.stride, src.spatial_shape, src.batch_size)
            out = s.generate(kernel_offsets(k, 1), src.stride // stride, generative_key(k, stride))
            made[flag] = (out.keys, s.generated_rows(out, generative_key(k, stride)), out.known_bounds())
        assert torch.equal(made["0"][0], made["1"][0]), (k, stride)
        assert torch.equal(made["0"][1], made["1"][1]) and made["1"][1].dtype == torch.int32, (k, stride)
        assert made["0"][2] == made["1"][2]
        n += 1
    print("OK", n)
    """
)


def _run(device: str, grid: int, env_extra: dict[str, str]) -> str:
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _CHECK, device, str(grid)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_kernel_map_builders_equal_torch_in_interpreter():
    # TRITON_INTERPRET must be set before the kernels are decorated, hence a fresh process.
    assert "OK 58" in _run("cpu", 8, {"TRITON_INTERPRET": "1"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_kernel_map_builders_equal_torch_on_cuda():
    assert "OK 58" in _run("cuda", 40, {"TRITON_INTERPRET": "0"})


def test_triton_builder_switch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for mode in ("auto", "0", "1"):  # outside the interpreter, CPU sets always take the torch ops
        monkeypatch.setenv("FRUSTUM3D_KMAP_TRITON", mode)
        assert km.use_triton_builder(cpu) is False
    monkeypatch.setenv("FRUSTUM3D_KMAP_TRITON", "yes")
    with pytest.raises(ValueError, match="FRUSTUM3D_KMAP_TRITON must be auto, 0 or 1"):
        km.use_triton_builder(cpu)
    if triton_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("FRUSTUM3D_KMAP_TRITON", "1")
        assert km.use_triton_builder(cpu) is True
        monkeypatch.setenv("FRUSTUM3D_KMAP_TRITON", "auto")
        assert km.use_triton_builder(cpu) is False


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_tile_tap_masks_switch(monkeypatch):
    from frustum3d.sparse.kmap_triton import tap_masks_enabled

    monkeypatch.delenv("FRUSTUM3D_TILE_TAP_MASKS", raising=False)
    assert tap_masks_enabled() is False  # opt-in
    monkeypatch.setenv("FRUSTUM3D_TILE_TAP_MASKS", "1")
    assert tap_masks_enabled() is True
    monkeypatch.setenv("FRUSTUM3D_TILE_TAP_MASKS", "yes")
    with pytest.raises(ValueError, match="FRUSTUM3D_TILE_TAP_MASKS must be 0 or 1"):
        tap_masks_enabled()
