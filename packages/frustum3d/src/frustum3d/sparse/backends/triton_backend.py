"""Triton sparse-convolution backend: implicit GEMM forward / input gradient, gather-gather weight gradient.

All products accumulate in float32. float32 inputs use exact IEEE products unless TF32 is allowed through
``torch.backends.cuda.matmul.allow_tf32`` (then ``tf32``); float16 / bfloat16 use the tensor cores. float64
(and anything else Triton's ``dot`` does not take) runs on the torch backend.

Block sizes come from a shipped table tuned on an H100 (sm_90) keyed by (pass, C_in, C_out, dtype);
set ``FRUSTUM3D_TRITON_AUTOTUNE=1`` to time a candidate list on the first call per key instead (minutes of
warm-up across a network; the winners are printed by :func:`tuned_configs`).

Each pass picks its path per call (storage-order / tap-list / row-sorted GEMMs; row-walk / pair-list weight
gradient) through :mod:`.triton_policy` (``FRUSTUM3D_TRITON_ROW_SORT`` overrides it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import triton
from torch import Tensor
from triton.runtime.errors import OutOfResources

from ..kernel_map import KernelMap
from . import torch_backend
from .triton_kernels import conv_gather_gemm_kernel, conv_wgrad_kernel, conv_wgrad_pairs_kernel
from .triton_policy import path_for

name = "triton"
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    skip_empty: bool = True


@dataclass(frozen=True)
class WgradConfig:
    block_p: int
    block_ci: int
    block_co: int
    num_warps: int = 4
    num_stages: int = 2


def _next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for n <= 1): integer bit arithmetic, since ``triton.next_power_of_2`` is a
    Triton-callable function whose Python call costs microseconds on every convolution call."""
    return 1 << max(int(n) - 1, 0).bit_length()


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, _next_pow2(n)))


# Exact-shape overrides of the shipped sm_90 rules below (``load_config_table`` fills them from a sweep).
SHIPPED_GEMM: dict[tuple[int, int, int], GemmConfig] = {}
SHIPPED_WGRAD: dict[tuple[int, int, int], WgradConfig] = {}
_tuned: dict[tuple, object] = {}
# (shape key, config) pairs whose counted tap loop did not fit the GPU's shared memory: they take the branching loop
_branch_only: set[tuple] = set()


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def default_gemm_config(c_in: int, c_out: int, dtype: torch.dtype) -> GemmConfig:
    """Shipped sm_90 block sizes (H100 sweep at 307k frustum voxels, subm k3; see the README table)."""
    key = (int(c_in), int(c_out), 2 if _half(dtype) else 4)
    if key in SHIPPED_GEMM:
        return SHIPPED_GEMM[key]
    half = _half(dtype)
    bk = _pow2(c_in, 16, 64 if half else 32)
    if c_out <= 16:
        # measured: fp32 BM64 0.32 ms vs BM128 0.61 ms; fp16 BM256/stages3 0.103 ms
        return GemmConfig(256, 16, bk, 4, 3) if half else GemmConfig(64, 16, bk, 4, 3)
    if c_out <= 32:
        return GemmConfig(128, 32, bk, 4, 2) if half else GemmConfig(64, 32, bk, 4, 3)
    if half:
        return GemmConfig(64, _pow2(c_out, 16, 128), bk, 4, 2)
    if c_out <= 64:
        # fp32 (FMA-bound): measured C64 BM64/BN64/BK32/stages3 1.80 ms, best of 36 configs
        return GemmConfig(64, 64, bk, 4, 3)
    # fp32 C96: BM128/BN32/BK16/stages3 5.01 ms vs 5.41 ms for BM64/BN64 (51 configs swept)
    return GemmConfig(128, 32, 16, 4, 3)


def default_wgrad_config(c_in: int, c_out: int, dtype: torch.dtype) -> WgradConfig:
    key = (int(c_in), int(c_out), 2 if _half(dtype) else 4)
    if key in SHIPPED_WGRAD:
        return SHIPPED_WGRAD[key]
    if max(c_in, c_out) <= 16:
        return WgradConfig(128, 16, 16, 4, 2)  # measured best at C16 (fp32 0.55 ms, fp16 0.21 ms)
    if _half(dtype):
        return WgradConfig(64, _pow2(c_in, 16, 64), _pow2(c_out, 16, 64), 4, 2)
    return WgradConfig(32, _pow2(c_in, 16, 32), _pow2(c_out, 16, 32), 4, 2)


def _gemm_candidates(c_in: int, c_out: int, dtype: torch.dtype) -> list[GemmConfig]:
    bk_max = 64 if _half(dtype) else 32
    out = []
    for bm in (32, 64, 128, 256):
        for bn in sorted({_pow2(c_out, 16, 32), _pow2(c_out, 16, 64), _pow2(c_out, 16, 128)}):
            for bk in sorted({_pow2(c_in, 16, 16), _pow2(c_in, 16, bk_max)}):
                for warps in (2, 4, 8):
                    if bm * bn >= 128 * 64 * 2 and warps == 2:
                        continue
                    for stages in (1, 2, 3):
                        out.append(GemmConfig(bm, bn, bk, warps, stages))
    return out


def _wgrad_candidates(c_in: int, c_out: int) -> list[WgradConfig]:
    out = []
    for bp in (32, 64, 128):
        for bci in sorted({_pow2(c_in, 16, 32), _pow2(c_in, 16, 64)}):
            for bco in sorted({_pow2(c_out, 16, 32), _pow2(c_out, 16, 64)}):
                for warps in (2, 4, 8):
                    for stages in (1, 2, 3):
                        out.append(WgradConfig(bp, bci, bco, warps, stages))
    return out


def _autotune_enabled() -> bool:
    return os.environ.get("FRUSTUM3D_TRITON_AUTOTUNE", "0") not in ("", "0") and torch.cuda.is_available()


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _aligned(t: Tensor) -> Tensor:
    """``t`` contiguous with a 16-byte aligned base (a copy only for misaligned row-slice views).

    Triton specialises pointer arguments on 16-byte alignment; a feature tensor that is sometimes a row slice
    (odd row offset x 2-byte elements) would compile and cache a second variant of every kernel mid-training.
    """
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


#: How the GEMM kernels walk a tile's tap list: ``"branch"`` over all K^3 entries, testing each for the -1
#: padding (the default), or ``"count"`` up to the tile's count of taps, a loop without a branch that Triton
#: software-pipelines (opt-in: ``FRUSTUM3D_TRITON_TAP_LOOP=count``; :func:`tap_loop` overrides both inside a
#: ``with`` block). Measured on an H100 (stop 43, docs/speed.md): per pass on 307k-voxel shells the counted loop
#: is faster in 56 of 64 (path, pass, shape) cells, up to 1.38x (k4 s2 fp32 C96 sorted forward), but the full
#: model's bf16 inference is slower with it (level 128: 25.6-25.8 ms against 15.5-16.8, same call, warm runs) and
#: the fp32 3D training step too (0.341 against 0.323 s; bf16 0.284 against 0.312 s), so it stays off until a
#: per-shape rule says where it pays. The Triton interpreter (``TRITON_INTERPRET=1``, the CPU tests) always
#: takes ``"branch"``: it cannot loop to a bound loaded inside the kernel.
TAP_LOOPS = ("count", "branch")
_tap_loop: list[str] = []


@contextlib.contextmanager
def tap_loop(mode: str) -> Iterator[None]:
    """Walk tap lists the ``mode`` way (:data:`TAP_LOOPS`) inside a ``with`` block (benchmarks and tests)."""
    if mode not in TAP_LOOPS:
        raise ValueError(f"tap loop must be one of {TAP_LOOPS}, got {mode!r}")
    _tap_loop.append(mode)
    try:
        yield
    finally:
        _tap_loop.pop()


def _count_loop() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    if _tap_loop:
        return _tap_loop[-1] == "count"
    mode = os.environ.get("FRUSTUM3D_TRITON_TAP_LOOP", "").strip().lower() or "branch"
    if mode not in TAP_LOOPS:
        raise ValueError(f"FRUSTUM3D_TRITON_TAP_LOOP={mode!r}: use one of {TAP_LOOPS}")
    return mode == "count"


def _launch_gemm(x: Tensor, w: Tensor, strides: tuple[int, int, int], nbr: Tensor, out: Tensor, cfg: GemmConfig,
                 perm: Tensor | None = None, taps: Tensor | None = None, counts: Tensor | None = None):
    """One implicit-GEMM launch; ``counts`` (taps per tile, with ``taps``) bounds the tap loop."""
    n_out, kv = nbr.shape
    c_in, c_out = x.shape[1], out.shape[1]
    if n_out == 0:
        return
    grid = (triton.cdiv(n_out, cfg.block_m), triton.cdiv(c_out, cfg.block_n))
    conv_gather_gemm_kernel[grid](
        x, w, nbr, out, nbr if perm is None else perm, nbr if taps is None else taps,
        nbr if counts is None else counts, n_out, c_out, nbr.stride(0), nbr.stride(1), *strides,
        KV=kv, C_IN=c_in, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SKIP_EMPTY=cfg.skip_empty or perm is not None, HAS_PERM=perm is not None, HAS_TAPS=taps is not None,
        TAP_COUNT=taps is not None and counts is not None, PRECISION=_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _gather_gemm(x: Tensor, w: Tensor, strides: tuple[int, int, int], c_out: int, kmap: KernelMap, reverse: bool,
                 tag: str, path: str) -> Tensor:
    """``out[q] = sum_k x[table[q, k]] @ Wk`` with Wk addressed through ``strides``; ``path`` from triton_policy."""
    nbr = kmap.offset_major(reverse)
    n_out = nbr.shape[0]
    out = torch.empty((n_out, c_out), dtype=x.dtype, device=x.device)
    if n_out == 0:
        return out
    if x.shape[0] == 0 or x.shape[1] == 0:
        return out.zero_()
    key = (tag, path, nbr.shape[1], x.shape[1], c_out, x.dtype)
    cfg = _tuned.get(key)

    count_loop = _count_loop()

    def operands(c: GemmConfig) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if path == "plain":
            return None, None, None
        sorted_rows = path == "sorted"
        perm = kmap.row_order(reverse) if sorted_rows else None
        counts = kmap.tile_tap_counts(reverse, c.block_m, sorted_rows) if count_loop else None
        return perm, kmap.tile_taps(reverse, c.block_m, sorted_rows), counts

    if cfg is None:
        if _autotune_enabled():
            cfg = _autotune(lambda c: _launch_gemm(x, w, strides, nbr, out, c, *operands(c)),
                            _gemm_candidates(x.shape[1], c_out, x.dtype))
            _tuned[key] = cfg
        else:
            cfg = default_gemm_config(x.shape[1], c_out, x.dtype)
    count_loop = count_loop and (key, cfg) not in _branch_only
    try:
        _launch_gemm(x, w, strides, nbr, out, cfg, *operands(cfg))  # type: ignore[arg-type]
    except OutOfResources:
        # The counted loop's pipelined loads buffer every C_in chunk of every stage in shared memory; a wide input
        # (C_in in the hundreds) can exceed the GPU's. Raised before the launch, so the branching loop (nothing
        # pipelined) takes over, for this shape from now on.
        if not count_loop:
            raise
        _branch_only.add((key, cfg))
        count_loop = False
        _launch_gemm(x, w, strides, nbr, out, cfg, *operands(cfg))  # type: ignore[arg-type]
    return out


def _autotune(launch, candidates):
    from triton.testing import do_bench

    best, best_ms = None, float("inf")
    for cfg in candidates:
        try:
            ms = do_bench(lambda cfg=cfg: launch(cfg), warmup=5, rep=20, return_mode="median")
        except Exception:  # a config can exceed shared memory / registers: skip it
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError("no Triton config compiled for this sparse conv shape")
    return best


def tuned_configs() -> list[dict]:
    """The configs chosen by autotuning so far (to refresh the shipped table)."""
    rows = []
    for key, cfg in _tuned.items():
        rows.append({"key": [str(k) for k in key], "config": asdict(cfg)})  # type: ignore[call-overload]
    return rows


def conv_forward(feats: Tensor, weight: Tensor, kmap: KernelMap) -> Tensor:
    if feats.dtype not in _SUPPORTED:
        return torch_backend.conv_forward(feats, weight, kmap)
    feats = _aligned(feats)
    w = _aligned(weight if weight.dtype == feats.dtype else weight.to(feats.dtype))
    path = path_for("fwd", feats.dtype, w.shape[1], w.shape[2], lambda: kmap.fill(False))
    return _gather_gemm(feats, w, (w.stride(0), w.stride(1), w.stride(2)), w.shape[2], kmap, False, "fwd", path)


def conv_dgrad(grad_out: Tensor, weight: Tensor, kmap: KernelMap) -> Tensor:
    if grad_out.dtype not in _SUPPORTED:
        return torch_backend.conv_dgrad(grad_out, weight, kmap)
    grad_out = _aligned(grad_out)
    # W[k]^T as a contiguous (KV, C_out, C_in) copy (K^3 C^2 elements, microseconds): reading the transposed
    # view through strides made the fp32 input gradient 2.4-2.9x slower than the forward on an H200 (subm k3,
    # C 16-96), while the same GEMM on contiguous weights runs at forward speed. Rows are the reverse table's.
    wt = weight.to(grad_out.dtype).transpose(1, 2).contiguous()
    path = path_for("dgrad", grad_out.dtype, wt.shape[1], wt.shape[2], lambda: kmap.fill(True))
    return _gather_gemm(grad_out, wt, (wt.stride(0), wt.stride(1), wt.stride(2)), wt.shape[2], kmap, True, "dgrad",
                        path)


def _launch_wgrad(feats: Tensor, grad_out: Tensor, nbr: Tensor, cfg: WgradConfig) -> Tensor:
    n_out, kv = nbr.shape
    c_in, c_out = feats.shape[1], grad_out.shape[1]
    tiles = triton.cdiv(c_in, cfg.block_ci) * triton.cdiv(c_out, cfg.block_co)
    sms = torch.cuda.get_device_properties(feats.device).multi_processor_count if feats.is_cuda else 4
    # Aim at ~16 programs per SM (the row gathers are latency-bound); ITERS (row blocks per program) is a
    # power of two so few variants compile.
    want_split = max(1, triton.cdiv(16 * sms, kv * tiles))
    iters = _next_pow2(triton.cdiv(n_out, cfg.block_p * want_split))
    split = triton.cdiv(n_out, cfg.block_p * iters)
    part = torch.empty((split, kv, c_in, c_out), dtype=torch.float32, device=feats.device)
    conv_wgrad_kernel[(kv, split, tiles)](
        feats, grad_out, nbr, part, n_out, kv, c_in, c_out, nbr.stride(0), nbr.stride(1), ITERS=iters,
        BLOCK_P=cfg.block_p, BLOCK_CI=cfg.block_ci, BLOCK_CO=cfg.block_co, PRECISION=_precision(feats.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return part.sum(dim=0) if split > 1 else part[0]


def _launch_wgrad_pairs(feats: Tensor, grad_out: Tensor, kmap: KernelMap, cfg: WgradConfig) -> Tensor:
    in_idx, out_idx, starts, max_count = kmap.pair_starts()
    kv = kmap.kernel_volume
    c_in, c_out = feats.shape[1], grad_out.shape[1]
    if max_count == 0:
        return torch.zeros((kv, c_in, c_out), dtype=torch.float32, device=feats.device)
    tiles = triton.cdiv(c_in, cfg.block_ci) * triton.cdiv(c_out, cfg.block_co)
    sms = torch.cuda.get_device_properties(feats.device).multi_processor_count if feats.is_cuda else 4
    want_split = max(1, triton.cdiv(16 * sms, kv * tiles))
    iters = _next_pow2(triton.cdiv(max_count, cfg.block_p * want_split))
    split = triton.cdiv(max_count, cfg.block_p * iters)
    # every program writes its slice (zeros when its range is empty), so no zero-init is needed
    part = torch.empty((split, kv, c_in, c_out), dtype=torch.float32, device=feats.device)
    conv_wgrad_pairs_kernel[(kv, split, tiles)](
        feats, grad_out, in_idx, out_idx, starts, part, kv, c_in, c_out, ITERS=iters,
        BLOCK_P=cfg.block_p, BLOCK_CI=cfg.block_ci, BLOCK_CO=cfg.block_co, PRECISION=_precision(feats.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return part.sum(dim=0) if split > 1 else part[0]


def conv_wgrad(feats: Tensor, grad_out: Tensor, kmap: KernelMap) -> Tensor:
    if feats.dtype not in _SUPPORTED:
        return torch_backend.conv_wgrad(feats, grad_out, kmap)
    kv = kmap.kernel_volume
    c_in, c_out = feats.shape[1], grad_out.shape[1]
    if kmap.num_out == 0 or feats.shape[0] == 0:
        return torch.zeros((kv, c_in, c_out), dtype=feats.dtype, device=feats.device)
    feats, grad_out = _aligned(feats), _aligned(grad_out.to(feats.dtype))
    path = path_for("wgrad", feats.dtype, c_in, c_out, lambda: kmap.fill(kmap.num_in < kmap.num_out))
    if path == "pairs":
        cfg = default_wgrad_config(c_in, c_out, feats.dtype)
        return _launch_wgrad_pairs(feats, grad_out, kmap, cfg).to(feats.dtype)
    if kmap.num_in < kmap.num_out:
        # Fewer input than output rows (generative / upsampling transposed convs, e.g. 64 taps over 1.6M fine
        # voxels of which at most 8 are filled): walk the reverse table instead, which has one row per input
        # voxel and few empty taps. dW[k]^T = sum_p grad_out[rev[p, k]]^T feats[p]; the sum is the same.
        grad_w_t = _wgrad_rows(grad_out, feats, kmap.offset_major(reverse=True), "wgrad_rev")
        return grad_w_t.transpose(1, 2).contiguous()
    return _wgrad_rows(feats, grad_out, kmap.offset_major(), "wgrad")


def _wgrad_rows(gathered: Tensor, direct: Tensor, table: Tensor, tag: str) -> Tensor:
    """``dW[k] = sum_r gathered[table[r, k]]^T direct[r]`` as (KV, C_gathered, C_direct) in the input dtype."""
    kv, c_a, c_b = table.shape[1], gathered.shape[1], direct.shape[1]
    key = (tag, kv, c_a, c_b, gathered.dtype)
    cfg = _tuned.get(key)
    if cfg is None:
        if _autotune_enabled():
            cfg = _autotune(lambda c: _launch_wgrad(gathered, direct, table, c), _wgrad_candidates(c_a, c_b))
            _tuned[key] = cfg
        else:
            cfg = default_wgrad_config(c_a, c_b, gathered.dtype)
    return _launch_wgrad(gathered, direct, table, cfg).to(gathered.dtype)  # type: ignore[arg-type]


def load_config_table(rows: list[dict]) -> None:
    """Install measured configs (rows like the benchmark sweep's ``best`` list) into the shipped tables."""
    for r in rows:
        size = 4 if r["dtype"] == "fp32" else 2
        key = (int(r["c"]), int(r["c"]), size)
        cfg = r["config"]
        if r["pass"] == "fwd":
            SHIPPED_GEMM[key] = GemmConfig(**cfg)
        else:
            SHIPPED_WGRAD[key] = WgradConfig(**cfg)
