"""Driver of the exported 3D completion: coordinate work in PyTorch, features through the graphs.

:func:`run_exported_3d` reproduces :meth:`frustum3d.decoder.FrustumDecoder.forward` (eval mode) from five
graph calls per batch item: ``encoder`` -> ``dense64`` -> ``level128`` -> ``level256`` -> ``heads256`` (see
:mod:`frustum3d.decoder_graphs`). Between the calls it does what depends on coordinates, with frustum3d's own
functions so that every voxel set is the decoder's set, row for row: strided downsampling
(``CoordinateSet.downsample``), kernel maps (``get_kernel_map``), unions (sorted unique packed keys, as
``sparse_union``), generative output sets (``transposed_output_set``), dropping voxels outside the grid and
pruning (``keep_mask``: sigmoid > threshold, top-``min_keep`` fallback). These become the graphs' int64
tables, padded to ``max_voxels`` rows.

A runner is any callable ``{input name: tensor} -> {output name: tensor}``: :func:`torch_runners` (the graph
modules in PyTorch) or :func:`onnxruntime_runners` (the exported files).

Batch items are independent in FrustumDecoder (per-item instance norm, kernel maps never cross items,
per-item prune fallback), so the graphs are batch 1 and the driver loops over the items.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from frustum3d.decoder import FrustumDecoder, frustum_mask_at, in_grid, keep_mask
from frustum3d.decoder_graphs import build_sparse_graphs
from frustum3d.sparse import CoordinateSet, SparseVoxels, get_kernel_map
from frustum3d.sparse.functional import transposed_output_set
from torch import Tensor

from nvp3d.errors import ExportInputError
from nvp3d.export.model3d import INPUT_NAMES_3D, OUTPUT_NAMES_3D, DenseCompletion64

__all__ = [
    "DRIVER_PARTS",
    "DecoderSettings",
    "Runner",
    "VoxelBudgetError",
    "capped_keep",
    "decoder_keep",
    "onnxruntime_runners",
    "run_exported_3d",
    "torch_runners",
]

#: the five graph calls of one batch item, in order
DRIVER_PARTS = ("encoder", "dense64", "level128", "level256", "heads256")
Runner = Callable[[dict[str, Tensor]], dict[str, Tensor]]
#: prune rule: (logits [N], candidate coordinates [N, 4] in finest-grid units, their stride 4/2/1, settings)
#: -> keep mask [N]
KeepFn = Callable[[Tensor, Tensor, int, "DecoderSettings"], Tensor]


class VoxelBudgetError(ExportInputError):
    """A sparse level holds more voxels than the graphs' fixed row count (``export.max_voxels``)."""


@dataclass(frozen=True)
class DecoderSettings:
    """What the driver needs to know about the decoder (no weights): grid, prune rule, input width."""

    grid_dims: tuple[int, int, int]
    threshold: float
    min_keep: int
    input_channels: int
    use_multi_scale: bool = False

    @classmethod
    def of(cls, decoder: FrustumDecoder) -> DecoderSettings:
        return cls(tuple(decoder.grid_dims), decoder.threshold, decoder.min_keep, sum(decoder.input_groups),
                   decoder.use_multi_scale)


def decoder_keep(logits: Tensor, coords: Tensor, stride: int, settings: DecoderSettings) -> Tensor:
    """FrustumDecoder's eval-mode prune of one batch item (``frustum3d.decoder.keep_mask``): sigmoid >
    threshold, else the ``min_keep`` best candidates."""
    batch = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
    return keep_mask(logits, batch, 1, settings.threshold, settings.min_keep, None)


def capped_keep(cap: int, rule: KeepFn = decoder_keep) -> KeepFn:
    """``rule`` (default the decoder's), then at most ``cap`` voxels (the best scores): bounds the example sets
    that ``nvp3d export`` traces with, whatever the checkpoint predicts on synthetic input."""

    def keep(logits: Tensor, coords: Tensor, stride: int, settings: DecoderSettings) -> Tensor:
        mask = rule(logits, coords, stride, settings)
        if int(mask.sum()) > cap:
            scores = logits.masked_fill(~mask, float("-inf"))
            mask = torch.zeros_like(mask)
            mask[torch.topk(scores, cap).indices] = True
        return mask

    return keep


# ---------------------------------------------------------------------------------------------- tables
class _Budget:
    """The fixed row count ``M`` of the graphs and the over-budget error."""

    def __init__(self, max_voxels: int) -> None:
        if max_voxels < 1:
            raise ExportInputError(f"export.max_voxels={max_voxels} must be >= 1")
        self.m = int(max_voxels)

    def check(self, count: int, what: str) -> int:
        if count > self.m:
            raise VoxelBudgetError(f"{what} has {count} voxels, more than export.max_voxels={self.m}; raise "
                                   "export.max_voxels and export again (the sparse graphs have a fixed row count)")
        return count

    def nbr(self, in_set: CoordinateSet, out_set: CoordinateSet, kernel: int, transposed: bool = False) -> Tensor:
        """frustum3d's kernel map as an ``(M, K^3)`` int64 table, -1 and padding rows -> sentinel ``M``."""
        table = get_kernel_map(in_set, out_set, kernel, 1, transposed=transposed).nbr.to(torch.int64)
        table = torch.where(table < 0, torch.full_like(table, self.m), table)
        out = torch.full((self.m, table.shape[1]), self.m, dtype=torch.int64, device=table.device)
        out[: table.shape[0]] = table
        return out

    def rows(self, positions: Tensor, sources: Tensor, sentinel: int) -> Tensor:
        """``(M,)`` int64 table: ``table[positions[i]] = sources[i]``, every other entry ``sentinel``."""
        out = torch.full((self.m,), sentinel, dtype=torch.int64, device=positions.device)
        out[positions] = sources.to(torch.int64)
        return out

    def num(self, count: int, device: torch.device) -> Tensor:
        return torch.tensor([count], dtype=torch.int64, device=device)

    def pad(self, feats: Tensor) -> Tensor:
        out = feats.new_zeros((self.m, feats.shape[1]))
        out[: feats.shape[0]] = feats
        return out


def _union(a: CoordinateSet, b: CoordinateSet) -> tuple[CoordinateSet, Tensor, Tensor]:
    """``sparse_union``'s coordinate set of ``a`` and ``b`` and the union row of every row of a and of b."""
    keys, inverse = torch.unique(torch.cat([a.keys, b.keys]), sorted=True, return_inverse=True)
    out = CoordinateSet.from_sorted_keys(keys, a.stride, a.spatial_shape, 1)
    return out, inverse[: a.num_voxels], inverse[a.num_voxels:]


def _cell_index(coords: Tensor, stride: int, grid: tuple[int, int, int]) -> Tensor:
    """Flat index ``(x * Y + y) * Z + z`` of each voxel in the dense grid at ``stride``."""
    g = [d // stride for d in grid]
    c = coords[:, 1:] // stride
    return (c[:, 0] * g[1] + c[:, 1]) * g[2] + c[:, 2]


def _set_of(coords: Tensor, stride: int, grid: tuple[int, int, int]) -> CoordinateSet:
    cset, _ = CoordinateSet.from_coords(coords, stride, grid, 1)
    return cset


# ---------------------------------------------------------------------------------------------- one item
class _ItemRun:
    """One batch item through the five graph calls (records feeds and timings when asked)."""

    def __init__(self, settings: DecoderSettings, runners: Mapping[str, Runner], budget: _Budget,
                 keep_fn: KeepFn, record: dict[str, list] | None, timings: dict[str, float] | None) -> None:
        self.s, self.runners, self.b, self.keep_fn = settings, runners, budget, keep_fn
        self.record, self.timings = record, timings

    def _call(self, part: str, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.record is not None:
            self.record.setdefault(part, []).append(feeds)
        start = time.perf_counter()
        out = self.runners[part](feeds)
        self._tick(part, start)
        return out

    def _tick(self, part: str, start: float) -> None:
        if self.timings is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.timings[part] = self.timings.get(part, 0.0) + time.perf_counter() - start

    def _keep(self, logits: Tensor, coords: Tensor, stride: int) -> Tensor:
        return self.keep_fn(logits, coords, stride, self.s)

    def __call__(self, coords: Tensor, feats: Tensor, queries: Tensor, fm64: Tensor) -> dict[str, Any]:
        b, grid = self.b, self.s.grid_dims
        dev = feats.device
        t0 = time.perf_counter()
        # ---- encoder: s0 (lifted, stride 1) -> s1 (stride 2) -> s2 (stride 4)
        s0, order = CoordinateSet.from_coords(coords, 1, grid, 1)
        feats = feats[order]
        b.check(s0.num_voxels, "the lifted input (level 256 input)")
        s1 = s0.downsample(2)
        s2 = s1.downsample(2)
        g64 = tuple(d // 4 for d in grid)
        cells = g64[0] * g64[1] * g64[2]
        dense_from_s2 = torch.full((cells,), b.m, dtype=torch.int64, device=dev)
        dense_from_s2[_cell_index(s2.coords, 4, grid)] = torch.arange(s2.num_voxels, device=dev)
        feeds = {"lifted_feats": b.pad(feats), "num_s0": b.num(s0.num_voxels, dev),
                 "num_s1": b.num(s1.num_voxels, dev), "num_s2": b.num(s2.num_voxels, dev),
                 "nbr_s0_k3": b.nbr(s0, s0, 3), "nbr_s0s1_k3": b.nbr(s0, s1, 3), "nbr_s0s1_k4": b.nbr(s0, s1, 4),
                 "nbr_s1_k3": b.nbr(s1, s1, 3), "nbr_s1s2_k3": b.nbr(s1, s2, 3), "nbr_s1s2_k4": b.nbr(s1, s2, 4),
                 "nbr_s2_k3": b.nbr(s2, s2, 3), "dense_from_s2": dense_from_s2}
        self._tick("plan", t0)
        enc = self._call("encoder", feeds)
        # ---- dense 64^3 graph
        dense = self._call("dense64", {"encoder_features_64": enc["encoder_features_64"], "segm_queries": queries,
                                       "frustum_mask_64": fm64})
        occ64 = dense["occupancy_64"]
        # ---- prune 64, union with L1, generative set g128
        t0 = time.perf_counter()
        cand = fm64.nonzero()
        cand4 = cand.clone()
        cand4[:, 1:] *= 4
        keep = self._keep(occ64[cand[:, 0], cand[:, 1], cand[:, 2], cand[:, 3]], cand4, 4)
        coords64 = cand4[keep]
        s64 = _set_of(coords64, 4, grid)
        u64, from_s2, from_kept = _union(s2, s64)
        b.check(u64.num_voxels, "level 64 (L1 encoder voxels united with the kept 64^3 voxels)")
        g128 = transposed_output_set(u64, 4, 2, True)
        b.check(g128.num_voxels, "level 128 (generated by the transposed convolution)")
        feeds = {"encoder_features_64_sparse": enc["encoder_features_64_sparse"],
                 "decoder_features_64": dense["decoder_features_64"],
                 "u64_from_s2": b.rows(from_s2, torch.arange(s2.num_voxels, device=dev), b.m),
                 "u64_from_dense": b.rows(from_kept, _cell_index(s64.coords, 4, grid), cells),
                 "nbr_u64g128_k4t": b.nbr(u64, g128, 4, transposed=True),
                 "num_g128": b.num(g128.num_voxels, dev), "nbr_g128_k3": b.nbr(g128, g128, 3)}
        self._tick("plan", t0)
        lvl128 = self._call("level128", feeds)
        # ---- drop outside, prune 128, union with L0, generative set g256, drop outside -> x256
        t0 = time.perf_counter()
        inside = in_grid(g128.coords, grid)
        rows_x128 = inside.nonzero().flatten()
        occ128 = lvl128["occupancy_128"][: g128.num_voxels][rows_x128]
        keep128 = self._keep(occ128[:, 0], g128.coords[rows_x128], 2)
        rows_k128 = rows_x128[keep128]
        k128 = CoordinateSet(g128.coords[rows_k128], g128.keys[rows_k128], 2, grid, 1)
        u128, from_s1, from_k128 = _union(s1, k128)
        b.check(u128.num_voxels, "level 128 (L0 encoder voxels united with the kept 128^3 voxels)")
        g256 = transposed_output_set(u128, 4, 2, True)
        b.check(g256.num_voxels, "level 256 (generated by the transposed convolution)")
        rows_x256 = in_grid(g256.coords, grid).nonzero().flatten()
        x256 = CoordinateSet(g256.coords[rows_x256], g256.keys[rows_x256], 1, grid, 1)
        feeds = {"encoder_features_128": enc["encoder_features_128"], "features_128": lvl128["features_128"],
                 "u128_from_s1": b.rows(from_s1, torch.arange(s1.num_voxels, device=dev), b.m),
                 "u128_from_g128": b.rows(from_k128, rows_k128, b.m), "num_u128": b.num(u128.num_voxels, dev),
                 "nbr_u128_k3": b.nbr(u128, u128, 3), "segm_queries": queries,
                 "nbr_u128g256_k4t": b.nbr(u128, g256, 4, transposed=True), "num_g256": b.num(g256.num_voxels, dev),
                 "x256_from_g256": b.rows(torch.arange(x256.num_voxels, device=dev), rows_x256, b.m),
                 "num_x256": b.num(x256.num_voxels, dev), "nbr_x256_k3": b.nbr(x256, x256, 3)}
        self._tick("plan", t0)
        lvl256 = self._call("level256", feeds)
        # ---- prune 256 -> k256, heads
        t0 = time.perf_counter()
        occ256 = lvl256["occupancy_256"][: x256.num_voxels]
        rows_k256 = self._keep(occ256[:, 0], x256.coords, 1).nonzero().flatten()
        k256 = CoordinateSet(x256.coords[rows_k256], x256.keys[rows_k256], 1, grid, 1)
        feeds = {"features_256": lvl256["features_256"],
                 "k256_from_x256": b.rows(torch.arange(k256.num_voxels, device=dev), rows_k256, b.m),
                 "num_k256": b.num(k256.num_voxels, dev), "nbr_k256_k3": b.nbr(k256, k256, 3),
                 "segm_queries": queries}
        self._tick("plan", t0)
        heads = self._call("heads256", feeds)
        return {
            "occupancy_64": occ64, "panoptic_64": dense["panoptic_64"],
            "occupancy_128": (g128.coords[rows_x128], occ128, 2),
            "occupancy_256": (x256.coords, occ256, 1),
            "panoptic_128": (u128.coords, lvl256["panoptic_128"][: u128.num_voxels], 2),
            "panoptic_256": (k256.coords, heads["panoptic_256"][: k256.num_voxels], 1),
            "geometry": (k256.coords, heads["geometry"][: k256.num_voxels], 1),
            "coords_64": s64.coords, "coords_128": u128.coords, "coords_256": k256.coords,
        }


def _frustum_64(frustum_mask: Tensor, grid: tuple[int, int, int], bsz: int, device: torch.device) -> Tensor:
    """FrustumDecoder's level-64 frustum mask [B, X/4, Y/4, Z/4] (finest or level-64 input, batched or not)."""
    g64 = tuple(d // 4 for d in grid)
    fm = frustum_mask if frustum_mask.dim() == 4 else frustum_mask[None]
    if tuple(fm.shape[1:]) == grid:
        fm64 = frustum_mask_at(fm, 4)
    elif tuple(fm.shape[1:]) == g64:
        fm64 = fm.bool()
    else:
        raise ExportInputError(f"frustum_mask spatial shape {tuple(fm.shape[1:])} is neither {grid} nor {g64}")
    return fm64.to(device).expand(bsz, *g64)


def _stack_sparse(parts: list[tuple[Tensor, Tensor, int]], grid: tuple[int, int, int], bsz: int) -> SparseVoxels:
    coords, feats = [], []
    for item, (c, f, _stride) in enumerate(parts):
        c = c.clone()
        c[:, 0] = item
        coords.append(c)
        feats.append(f)
    return SparseVoxels(torch.cat(coords), torch.cat(feats), stride=parts[0][2], spatial_shape=grid, batch_size=bsz)


def _stack_coords(parts: list[Tensor]) -> Tensor:
    out = []
    for item, c in enumerate(parts):
        c = c.clone()
        c[:, 0] = item
        out.append(c)
    return torch.cat(out)


def run_exported_3d(
    settings: DecoderSettings | FrustumDecoder,
    runners: Mapping[str, Runner],
    lifted: SparseVoxels,
    segm_queries: Tensor,
    frustum_mask: Tensor,
    *,
    max_voxels: int,
    keep_fn: KeepFn | None = None,
    record: dict[str, list] | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """``FrustumDecoder.forward`` (eval mode, no multi-scale input) through the exported graphs.

    Args:
        settings: the decoder (or its :class:`DecoderSettings`): grid, prune threshold and ``min_keep``.
        runners: one callable per part of :data:`DRIVER_PARTS` (see :func:`torch_runners`,
            :func:`onnxruntime_runners`).
        lifted, segm_queries, frustum_mask: as for ``FrustumDecoder.forward``.
        max_voxels: the graphs' fixed row count; a level with more voxels raises :class:`VoxelBudgetError`.
        keep_fn: replaces the prune rule (:data:`KeepFn`); default :func:`decoder_keep`, the decoder's.
        record: if given, ``record[part]`` collects every graph call's feeds (used to trace and verify).
        timings: if given, accumulates seconds per part plus ``"plan"`` (the coordinate work).

    Returns the keys of ``FrustumDecoder.forward``: ``occupancy_64``, ``panoptic_64``, ``frustum_mask_64``
    (dense), ``occupancy_128/256``, ``panoptic_128/256``, ``geometry`` (SparseVoxels) and ``coords_64/128/256``.
    """
    s = DecoderSettings.of(settings) if isinstance(settings, FrustumDecoder) else settings
    if s.use_multi_scale:
        raise ExportInputError("the sparse levels of a decoder with use_multi_scale (adapters) are not exported; "
                               "run the decoder in PyTorch")
    missing = [p for p in DRIVER_PARTS if p not in runners]
    if missing:
        raise ExportInputError(f"run_exported_3d needs a runner for every part {DRIVER_PARTS}; missing {missing}")
    if tuple(lifted.spatial_shape) != s.grid_dims:
        raise ExportInputError(f"lifted spatial_shape {lifted.spatial_shape} != decoder grid_dims {s.grid_dims}")
    if lifted.stride != 1 or lifted.num_channels != s.input_channels:
        raise ExportInputError(f"lifted input must be stride 1 with {s.input_channels} channels, got stride "
                               f"{lifted.stride} and {lifted.num_channels} channels")
    if not bool(in_grid(lifted.coords, s.grid_dims).all()):
        raise ExportInputError("lifted input has voxels outside the grid; the exported encoder assumes every "
                               "lifted voxel lies in [0, grid_dims)")
    bsz = lifted.batch_size
    if segm_queries.dim() != 3 or segm_queries.shape[0] != bsz:
        raise ExportInputError(f"segm_queries must be [B={bsz}, Q, C], got {tuple(segm_queries.shape)}")
    fm64 = _frustum_64(frustum_mask, s.grid_dims, bsz, lifted.device)
    run = _ItemRun(s, runners, _Budget(max_voxels), keep_fn or decoder_keep, record, timings)
    items = []
    batch = lifted.coords[:, 0]
    for item in range(bsz):
        rows = (batch == item).nonzero().flatten()
        coords = lifted.coords[rows].clone()
        coords[:, 0] = 0
        items.append(run(coords, lifted.feats[rows], segm_queries[item:item + 1], fm64[item:item + 1].contiguous()))
    grid = s.grid_dims
    out: dict[str, Any] = {
        "occupancy_64": torch.cat([r["occupancy_64"] for r in items]),
        "panoptic_64": torch.cat([r["panoptic_64"] for r in items]),
        "frustum_mask_64": fm64,
    }
    for key in ("occupancy_128", "occupancy_256", "panoptic_128", "panoptic_256", "geometry"):
        out[key] = _stack_sparse([r[key] for r in items], grid, bsz)
    for key in ("coords_64", "coords_128", "coords_256"):
        out[key] = _stack_coords([r[key] for r in items])
    return out


# ---------------------------------------------------------------------------------------------- runners
def torch_runners(decoder: FrustumDecoder) -> dict[str, Runner]:
    """The five parts as PyTorch modules (the graphs before export; the reference of the ONNX check)."""
    graphs = build_sparse_graphs(decoder)
    dense = DenseCompletion64(decoder).eval()

    def run_dense(feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        return dict(zip(OUTPUT_NAMES_3D, dense(*(feeds[n] for n in INPUT_NAMES_3D)), strict=True))

    runners: dict[str, Runner] = {p: g.run for p, g in graphs.items()}
    runners["dense64"] = run_dense
    return runners


def onnxruntime_runners(paths: Mapping[str, Path | str], providers: list[str] | None = None,
                        fallback: Mapping[str, Runner] | None = None, threads: int | None = None
                        ) -> dict[str, Runner]:
    """One onnxruntime session per exported graph (``paths[part]``); parts absent from ``paths`` come from
    ``fallback`` (e.g. a dense graph of another batch size run in PyTorch). ``threads`` caps onnxruntime's
    intra-op threads (default: its own choice). Outputs return as tensors on the feeds' device."""
    import onnxruntime as ort

    def make(path: Path | str) -> Runner:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        # idle onnxruntime threads would otherwise spin between graph calls and slow the driver's PyTorch work
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), sess_options=options,
                                       providers=providers or ["CPUExecutionProvider"])
        in_names = [i.name for i in session.get_inputs()]
        out_names = [o.name for o in session.get_outputs()]

        def run(feeds: dict[str, Tensor]) -> dict[str, Tensor]:
            device = next(iter(feeds.values())).device
            arrays = session.run(out_names, {n: feeds[n].detach().cpu().numpy() for n in in_names})
            return {n: torch.from_numpy(a).to(device) for n, a in zip(out_names, arrays, strict=True)}

        return run

    runners = dict(fallback or {})
    runners.update({part: make(path) for part, path in paths.items()})
    return runners
