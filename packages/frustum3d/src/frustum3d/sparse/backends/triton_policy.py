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

The automatic choice (:func:`choose`) depends on the table fill (fraction of non-empty entries), the dtype and
the channel width. ``FRUSTUM3D_TRITON_ROW_SORT`` overrides it for every call:

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
from collections.abc import Iterator

import torch

__all__ = ["GEMM_PATHS", "OPS", "WGRAD_PATHS", "choose", "force_paths", "path_for"]

OPS = ("fwd", "dgrad", "wgrad")
GEMM_PATHS = ("plain", "taps", "sorted")
WGRAD_PATHS = ("rows", "pairs")

# Tables filled below this fraction get row sorting (GEMMs) and pair lists (weight gradient).
SORT_FILL = 0.3
PAIRS_FILL = 0.5

_forced: list[dict[str, str]] = []


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def choose(op: str, dtype: torch.dtype, c_in: int, c_out: int, fill: float) -> str:
    """Automatic path for pass ``op`` on a table with non-empty fraction ``fill``."""
    if op == "wgrad":
        return "pairs" if fill < PAIRS_FILL else "rows"
    if fill < SORT_FILL:
        return "sorted"
    return "taps"


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
    for the automatic choice, since it may synchronise the device once per kernel map)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    for forced in reversed(_forced):
        if op in forced:
            return forced[op]
    env = _env_override(op)
    if env is not None:
        return env
    return choose(op, dtype, c_in, c_out, float(fill_fn()))


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
