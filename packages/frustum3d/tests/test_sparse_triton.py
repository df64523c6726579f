"""The Triton backend equals the torch backend: on CPU through the Triton interpreter, and on CUDA when present."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from frustum3d.sparse.backends import triton_available

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

# Compares both backends on a few layer types (forward, input and weight gradients); prints "OK <n>".
_CHECK = textwrap.dedent(
    """
    import sys
    import torch
    from frustum3d.sparse import SparseConv3d, SparseConvTranspose3d, SparseVoxels
    from frustum3d.sparse.backends import resolve_backend_name, use_backend
    from frustum3d.sparse.backends.triton_policy import force_paths

    device = torch.device(sys.argv[1])
    grid = int(sys.argv[2])
    assert resolve_backend_name(device) == "triton", resolve_backend_name(device)
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(2, grid, grid, grid, generator=gen) < 0.3
    cases = [
        ("subm k3", lambda ci, co: SparseConv3d(ci, co, 3), 3, 5, 1),
        ("subm k3 c16->32", lambda ci, co: SparseConv3d(ci, co, 3), 16, 32, 1),
        ("strided k4 s2", lambda ci, co: SparseConv3d(ci, co, 4, stride=2), 16, 20, 1),
        ("generative k4 s2", lambda ci, co: SparseConvTranspose3d(ci, co, 4, stride=2, generative=True), 6, 3, 2),
    ]
    if device.type == "cpu":  # the interpreter is slow: one case per layer type
        cases = [c for c in cases if c[0] != "subm k3 c16->32"]
    if len(sys.argv) > 3 and sys.argv[3] == "rowsort":  # mask-sorted rows matter for strided / transposed maps
        cases = [c for c in cases if not c[0].startswith("subm")]
    forced = dict(p.split("=") for p in sys.argv[4].split(",")) if len(sys.argv) > 4 and sys.argv[4] else {}
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if device.type == "cuda" else [])
    n = 0
    for dtype in dtypes:
        for name, make, ci, co, stride in cases:
            dense = torch.randn(2, ci, grid, grid, grid, generator=gen)
            x = SparseVoxels.from_dense(dense, mask, stride=stride).to(device).to(dtype)
            layer = make(ci, co).to(device).to(dtype)
            outs = {}
            for backend in ("torch", "triton"):
                feats = x.feats.detach().clone().requires_grad_()
                layer.zero_grad()
                with use_backend(backend), force_paths(**forced):
                    y = layer(x.replace_feats(feats))
                    g = torch.randn(y.feats.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
                    (y.feats.float() * g.float()).sum().backward()
                outs[backend] = (y.feats.float(), feats.grad.float(), layer.weight.grad.float().clone())
            for label, a, b in zip(("fwd", "dgrad", "wgrad"), outs["triton"], outs["torch"]):
                err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
                assert err < tol[dtype], f"{name} {dtype} {label}: rel err {err:.3e}"
                n += 1
    print("OK", n)
    """
)


def _run_check(device: str, grid: int, extra_env: dict[str, str], mode: str = "all", paths: str = "") -> str:
    env = dict(os.environ)
    env.update(extra_env)
    env["FRUSTUM3D_SPARSE_BACKEND"] = "triton"
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _CHECK, device, str(grid), mode, paths], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_kernels_match_torch_backend_in_interpreter():
    # TRITON_INTERPRET must be set before triton kernels are decorated, hence a fresh interpreter process.
    out = _run_check("cpu", 4, {"TRITON_INTERPRET": "1", "FRUSTUM3D_TRITON_ROW_SORT": "0"})
    assert "OK 9" in out


@pytest.mark.slow
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_row_sorted_kernels_match_torch_backend_in_interpreter():
    out = _run_check("cpu", 4, {"TRITON_INTERPRET": "1", "FRUSTUM3D_TRITON_ROW_SORT": "1"}, mode="rowsort")
    assert "OK 6" in out


@pytest.mark.slow
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("paths", ["fwd=taps,dgrad=taps,wgrad=pairs", "fwd=sorted,dgrad=sorted,wgrad=rows"])
def test_triton_tap_list_paths_match_torch_backend_in_interpreter(paths):
    # the per-tile tap lists, with and without row sorting, on every layer type (forward, dgrad, wgrad)
    out = _run_check("cpu", 4, {"TRITON_INTERPRET": "1", "FRUSTUM3D_TRITON_ROW_SORT": "auto"}, paths=paths)
    assert "OK 9" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_matches_torch_backend_on_cuda():
    out = _run_check("cuda", 24, {"TRITON_INTERPRET": "0", "FRUSTUM3D_TRITON_ROW_SORT": "0"})
    assert "OK 36" in out
    out = _run_check("cuda", 24, {"TRITON_INTERPRET": "0", "FRUSTUM3D_TRITON_ROW_SORT": "1"})
    assert "OK 36" in out
    out = _run_check("cuda", 24, {"TRITON_INTERPRET": "0", "FRUSTUM3D_TRITON_ROW_SORT": "auto"})
    assert "OK 36" in out
    out = _run_check("cuda", 24, {"TRITON_INTERPRET": "0"}, paths="fwd=taps,dgrad=taps,wgrad=pairs")
    assert "OK 36" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_conv_matches_dense_reference():
    sys.path.insert(0, str(HERE))
    from frustum3d.sparse import SparseVoxels, sparse_conv3d
    from sparse_dense_reference import dense_conv, gather_dense, rel_err, scatter_dense

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 20, 20, 20, generator=gen) < 0.3
    coords = mask.nonzero().cuda()
    feats = torch.randn(coords.shape[0], 16, generator=gen).cuda()
    x = SparseVoxels(coords, feats, spatial_shape=(20, 20, 20), batch_size=2)
    for k, s in ((3, 1), (4, 2)):
        w = torch.randn(k**3, 16, 32, generator=gen).cuda() * 0.1
        y = sparse_conv3d(x, w, stride=s)
        ref = gather_dense(dense_conv(scatter_dense(coords, feats, 1, 2, 20), w, k, s, 1), y.coords, s)
        assert rel_err(y.feats, ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_counted_tap_loop_equals_branching_loop_on_cuda():
    # Both loops visit the same taps in the same order, so every output is bitwise equal (fwd and dgrad, the tap
    # list with and without row sorting, a submanifold and a strided map).
    from frustum3d.sparse import SparseVoxels, get_kernel_map
    from frustum3d.sparse.backends import triton_backend as tb
    from frustum3d.sparse.backends.triton_policy import force_paths

    gen = torch.Generator().manual_seed(5)
    coords = (torch.rand(2, 24, 24, 24, generator=gen) < 0.25).nonzero().int().cuda()
    x = SparseVoxels(coords, torch.zeros(coords.shape[0], 1, device="cuda"), spatial_shape=(24, 24, 24), batch_size=2)
    cset = x.coordinate_set
    for k, s in ((3, 1), (4, 2)):
        kmap = get_kernel_map(cset, cset if s == 1 else cset.downsample(s), k)
        for dtype in (torch.float32, torch.bfloat16):
            feats = torch.randn(kmap.num_in, 32, generator=gen).to("cuda", dtype)
            grad = torch.randn(kmap.num_out, 48, generator=gen).to("cuda", dtype)
            w = (torch.randn(k**3, 32, 48, generator=gen) * 0.1).to("cuda", dtype)
            for path in ("taps", "sorted"):
                outs = {}
                for mode in tb.TAP_LOOPS:
                    with tb.tap_loop(mode), force_paths(fwd=path, dgrad=path):
                        outs[mode] = (tb.conv_forward(feats, w, kmap), tb.conv_dgrad(grad, w, kmap))
                for a, b in zip(outs["count"], outs["branch"]):
                    assert torch.equal(a, b), (k, s, dtype, path)
