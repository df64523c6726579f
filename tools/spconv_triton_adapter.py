"""spconv-triton (the Triton port of spconv 2.x, ``import spconv_triton.pytorch``) on frustum3d's data.

Used by ``tools/bench_sparse_conv.py`` to time spconv-triton on the same coordinates and weights as
frustum3d and to report their relative error. It is not a frustum3d dependency (benchmark only).

Conventions mapped here:

* coordinates: frustum3d rows are ``(b, x, y, z)`` in finest-grid units; spconv-triton takes the same
  ``(b, d0, d1, d2)`` int32 indices at stride 1, and returns strided outputs in output-grid units (times the
  stride gives frustum3d's coordinates);
* weights: frustum3d ``(K^3, C_in, C_out)`` with offset ``k = ix + K*iy + K^2*iz``; spconv-triton KRSC
  ``(C_out, K0, K1, K2, C_in)`` with ``K0`` along ``d0`` (= x);
* offsets: a submanifold conv with ``padding = K // 2`` reads ``p + i - K // 2`` and a stride-2 conv with
  ``padding = 0`` reads ``2 o + i``: the MinkowskiEngine rules frustum3d uses. spconv-triton's strided output set
  is every cell reached by an input (a superset of frustum3d's floor-downsampled set; cells 127 along an axis of
  256 are out of its range), so outputs are compared on the common cells.

The pairs / masks are built once (a cached map, as in frustum3d's rows); each call runs only the convolution
through spconv-triton's autograd functions, with the algorithm its modules pick (MaskImplicitGemm up to 32
taps, Native gather-GEMM-scatter above, so k4 uses Native).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["SpconvTritonConv", "common_rows", "restrict_autotune", "spconv_triton_available"]


def spconv_triton_available() -> str | None:
    """The installed spconv-triton version, or None."""
    try:
        import spconv_triton
    except Exception:
        return None
    return str(getattr(spconv_triton, "__version__", "?"))


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def restrict_autotune(max_configs: int) -> int:
    """Cap every spconv-triton autotuner at ``max_configs`` candidates per key (the shape-fitted ones first).

    spconv-triton autotunes every (taps, channels, dtype) key over up to ~40 configs on first use; on a cold
    machine that is tens of seconds per key, far more than a benchmark run can spend on 48 layer shapes. The
    cap keeps configs whose channel tiles fit the channel counts (closest first). Returns the number of
    autotuners patched.
    """
    import spconv_triton.pytorch._impl as impl
    from triton.runtime.autotuner import Autotuner

    patched = 0
    for modname in ("gemm", "pool", "pair_kernels"):
        try:
            mod = __import__(f"{impl.__name__}.{modname}", fromlist=["x"])
        except Exception:
            continue
        for obj in vars(mod).values():
            if isinstance(obj, Autotuner):
                obj.early_config_prune = _pruner(max_configs)
                patched += 1
    return patched


def _pruner(max_configs: int) -> Callable:
    def prune(configs, nargs, **kwargs):
        args = {**nargs, **kwargs}
        dims = [int(v) for k, v in args.items() if k.endswith("_dim") and isinstance(v, int)]
        if not dims:
            return list(configs)[:max_configs]
        target = _pow2(max(dims))

        def distance(cfg) -> float:
            tiles = [v for n, v in cfg.kwargs.items() if n.startswith("BLOCK_") and n not in ("BLOCK_M", "BLOCK_P")]
            return sum(abs(math.log2(v) - math.log2(min(target, 128))) for v in tiles)

        ranked = sorted(configs, key=distance)  # stable: the library's own order among equals
        return ranked[:max_configs]

    return prune


class SpconvTritonConv:
    """One spconv-triton convolution (submanifold, or strided regular) with its pairs built once.

    ``coords``: ``(N, 4)`` frustum3d coordinates at stride 1; ``weight``: frustum3d ``(K^3, C_in, C_out)``.
    ``forward(feats, weight)`` is differentiable in both; ``out_coords`` are in frustum3d units.
    """

    def __init__(self, coords: Tensor, kernel_size: int, stride: int, spatial: int = 256) -> None:
        import spconv_triton.pytorch as spt
        from spconv_triton.pytorch import functional as fsp
        from spconv_triton.pytorch import ops

        k, s = int(kernel_size), int(stride)
        self.k, self.stride = k, s
        self.subm = s == 1
        kv = k**3
        self.algo = spt.ConvAlgo.MaskImplicitGemm if kv <= 32 else spt.ConvAlgo.Native
        idx = coords.to(torch.int32).contiguous()
        shape = [spatial] * 3
        pad = [k // 2] * 3 if self.subm else [0] * 3
        ks, st, dil, outpad = [k] * 3, [s] * 3, [1] * 3, [0] * 3
        if self.algo == spt.ConvAlgo.Native:
            outids, pairs, pair_num = ops.get_indice_pairs(idx, 1, shape, self.algo, ks, st, pad, dil, outpad,
                                                           self.subm, False)
            fn = fsp.indice_subm_conv if self.subm else fsp.indice_conv
            n_out = int(outids.shape[0])
            self._run = lambda f, w: fn(f, w, pairs, pair_num, n_out, self.algo)
        else:
            res = ops.get_indice_pairs_implicit_gemm(idx, 1, shape, self.algo, ksize=ks, stride=st, padding=pad,
                                                     dilation=dil, out_padding=outpad, subm=self.subm,
                                                     transpose=False, is_train=True)
            outids = res[0]
            n_out = int(outids.shape[0])
            self._run = lambda f, w: fsp.implicit_gemm(f, w, res[2], res[3], res[4], res[5], res[6], res[7], n_out,
                                                       res[8], True, self.subm)
        out = outids.to(torch.int64)
        out[:, 1:] *= s
        self.out_coords = out
        self.num_out = n_out

    @staticmethod
    def krsc(weight: Tensor) -> Tensor:
        """frustum3d ``(K^3, C_in, C_out)`` -> spconv KRSC ``(C_out, Kx, Ky, Kz, C_in)``."""
        kv, ci, co = weight.shape
        k = round(kv ** (1 / 3))
        return weight.reshape(k, k, k, ci, co).permute(4, 2, 1, 0, 3).contiguous()

    def forward(self, feats: Tensor, weight_krsc: Tensor) -> Tensor:
        return self._run(feats.contiguous(), weight_krsc)


def _keys(coords: Tensor) -> Tensor:
    c = coords.to(torch.int64)
    return ((c[:, 0] * 4096 + c[:, 1]) * 4096 + c[:, 2]) * 4096 + c[:, 3]


def common_rows(ours: Tensor, theirs: Tensor) -> tuple[Tensor, Tensor]:
    """Row indices ``(i_ours, i_theirs)`` of the coordinates present in both ``(N, 4)`` sets."""
    ka, kb = _keys(ours), _keys(theirs)
    order = torch.argsort(kb)
    kb_sorted = kb[order]
    pos = torch.searchsorted(kb_sorted, ka).clamp_(max=max(0, kb.numel() - 1))
    hit = kb_sorted[pos] == ka if kb.numel() else torch.zeros_like(ka, dtype=torch.bool)
    ia = hit.nonzero().flatten()
    return ia, order[pos[ia]]
