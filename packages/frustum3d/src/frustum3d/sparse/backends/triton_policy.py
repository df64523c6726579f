"""Which Triton code path each sparse-conv pass takes (forward, input gradient, weight gradient).

Paths of the implicit-GEMM passes (``fwd``, ``dgrad``):

* ``plain``: rows in storage order; each tile reads every tap's table column and skips taps empty for all its
  rows (the original kernel);
* ``taps``: rows in storage order with a per-tile list of non-empty taps, so an empty tap costs one scalar load;
* ``sorted``: rows in tap-mask order (rows with the same non-empty taps share tiles) plus the tap list. It pays
  off when most taps are empty per row (strided input gradient: at most 8 of 64 taps per fine voxel) at the
  price of scattered row access.

Paths of the weight gradient (``wgrad``): ``rows`` (gather-gather over the table rows, empty entries multiply
zeros) and ``pairs`` (compact per-offset pair lists, no empty work).

The automatic choice (:func:`choose`) depends on the pass, the table fill (fraction of non-empty entries), the
dtype and the channel width; its rules come from per-pass H200 timings (see :func:`choose`). ``FRUSTUM3D_TRITON_ROW_SORT`` overrides it for every call:

* ``1`` / ``all``: ``sorted`` GEMMs and ``pairs`` weight gradient everywhere (the former opt-in path);
* ``0`` / ``none``: ``plain`` GEMMs and ``rows`` weight gradient everywhere (the former default);
* a comma list of passes, e.g. ``dgrad,wgrad``: those passes row-sorted / pair-based, the others ``plain`` /
  ``rows``;
* unset, empty or ``auto``: :func:`choose`.

:func:`force_paths` pins paths inside a ``with`` block (tests and benchmarks), above the env var.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

__all__ = ["GEMM_PATHS", "OPS", "WGRAD_PATHS", "choose", "force_paths", "path_for"]

OPS = ("fwd", "dgrad", "wgrad")
GEMM_PATHS = ("plain", "taps", "sorted")
WGRAD_PATHS = ("rows", "pairs")

# Tables at most this full (strided input gradient ~0.09, generative forward <= 0.125) always get row sorting.
SPARSE_FILL = 0.2
# The strided k4 s2 forward table is ~0.46 full, a submanifold k3 one ~0.7 (256^3 frustum shells).
PAIRS_FILL = 0.5

_forced: list[dict[str, str]] = []


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def choose(op: str, dtype: torch.dtype, c_in: int, c_out: int, fill: float | Callable[[], float]) -> str:
    """Automatic path for pass ``op`` (GEMM reduction width ``c_in``) on a table with non-empty fraction ``fill``.

    Rules from per-pass timings on an H200 (307k-voxel 256^3 frustum shells, subm k3 and k4 s2, C 16/64/96,
    fp32 and bf16; ``tools/bench_sparse_conv.py --per-op``, table in the repository's docs/frustum3d.md):

    * ``dgrad``: ``sorted`` won all 12 shapes (k4 s2 fp32 C64: 1.37 ms vs 6.15 ms plain, 4.5x);
    * ``fwd``: ``sorted`` won at C >= 32 (fp32 up to C64, half precision at every width); at C16 ``plain``
      (half precision; 0.66-0.77x for ``taps`` in the full-row k4 s2 fp16/bf16 runs) or ``taps`` (fp32 on dense
      tables), and ``taps`` for fp32 C96 on denser tables (2-7 % ahead there);
    * ``wgrad``: ``pairs`` won for fp32 at C >= 32 on the strided map (C96 2.89 vs 3.31 ms); ``rows`` everywhere
      else (the pair kernel has 1.2-1.5x the cost of the row walk on dense maps and in half precision).
    """
    def value() -> float:  # the fill costs a device sync per kernel map: only read when a rule needs it
        return float(fill()) if callable(fill) else float(fill)

    half = _half(dtype)
    if op == "wgrad":
        return "pairs" if not half and min(c_in, c_out) >= 32 and value() < PAIRS_FILL else "rows"
    if op == "dgrad":
        return "sorted"
    if c_in <= 16:
        f = value()
        if f <= SPARSE_FILL:
            return "sorted"
        if half:
            return "plain"  # k4 s2 bf16 C16: 0.109 ms plain vs 0.119 taps vs 0.151 sorted; subm k3 within 4 %
        return "taps" if f >= PAIRS_FILL else "sorted"
    if not half and c_in > 64 and value() > SPARSE_FILL:
        return "taps"
    return "sorted"


def _env_override(op: str) -> str | None:
    raw = os.environ.get("FRUSTUM3D_TRITON_ROW_SORT", "").strip().lower()
    if raw in ("", "auto"):
        return None
    if raw in ("1", "all", "true", "on"):
        on = True
    elif raw in ("0", "none", "false", "off"):
        on = False
    else:
        ops = {o.strip() for o in raw.split(",") if o.strip()}
        bad = ops - set(OPS)
        if bad:
            raise ValueError(f"FRUSTUM3D_TRITON_ROW_SORT: unknown passes {sorted(bad)}; use 0, 1, auto or a "
                             f"comma list of {OPS}")
        on = op in ops
    if op == "wgrad":
        return "pairs" if on else "rows"
    return "sorted" if on else "plain"


def path_for(op: str, dtype: torch.dtype, c_in: int, c_out: int, fill_fn) -> str:
    """The path of pass ``op``: :func:`force_paths` > env var > :func:`choose` (``fill_fn()`` is only called
    when an automatic rule needs it, since it synchronises the device once per kernel map)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    for forced in reversed(_forced):
        if op in forced:
            return forced[op]
    env = _env_override(op)
    if env is not None:
        return env
    return choose(op, dtype, c_in, c_out, fill_fn)


@contextlib.contextmanager
def force_paths(**paths: str) -> Iterator[None]:
    """Pin paths per pass inside a ``with`` block, e.g. ``force_paths(dgrad="sorted", wgrad="pairs")``."""
    for op, path in paths.items():
        allowed = WGRAD_PATHS if op == "wgrad" else GEMM_PATHS
        if op not in OPS or path not in allowed:
            raise ValueError(f"bad path {op}={path!r}; passes {OPS}, GEMM paths {GEMM_PATHS}, "
                             f"wgrad paths {WGRAD_PATHS}")
    _forced.append(dict(paths))
    try:
        yield
    finally:
        _forced.pop()
