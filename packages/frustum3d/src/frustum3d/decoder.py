"""``FrustumDecoder``: the coarse-to-fine sparse/dense completion U-Net of Dahnert / Uni-3D / NVPanoptix3D.

Layout with the default ``unet_features f = 16`` on a 256^3 grid (strides relative to the finest grid):

=========  ======  =======================================================================  ==========
level      kind    operation                                                                channels
=========  ======  =======================================================================  ==========
input 256  sparse  one SparseBasicBlock3D per feature group (k1 projection), concatenated   groups->G*f
L0 128     sparse  BasicBlock(stride 2, k4 projection) + BasicBlock  [+ adapter(ms[0])]      G*f -> f
L1 64      sparse  same                                              [+ adapter(ms[1])]      f -> 2f
           dense   densified to [B, 2f, 64^3]
L2 32      dense   BasicBlock3D(stride 2, k4 conv projection) + BasicBlock3D [+ ms[2]]      2f -> 4f
L3 16      dense   same                                                                     4f -> 8f
L4 8       dense   same                                                                     8f -> 8f
up 16/32   dense   ConvTranspose3d(k4 s2 p1) + IN + ReLU, skip concat                      8f->8f, 16f->4f
up 64      dense   ConvTranspose3d, concat with L1 dense -> 4f; occupancy Linear(4f->1)      8f -> 2f (+2f)
                   masked to -inf outside the frustum; panoptic = einsum(Linear(q->4f)(queries),
                   2 BasicBlock3D(4f)); voxels with sigmoid > 0.5 (inside the frustum) -> sparse
up 128     sparse  union-cat(L1, kept 64) -> generative SparseConvTranspose3d(k4 s2) + IN +    6f -> 2f
                   ReLU + SparseBasicBlock; occupancy Linear(2f->1); prune at 0.5;
                   union-cat with L0 -> 3f; panoptic = SparseBasicBlock(3f) . Linear(q->3f)
up 256     sparse  generative transposed conv + IN + ReLU; occupancy head (IN, ReLU, block,     3f -> out
                   conv k3 -> 1); prune at 0.5; geometry head (same shape, clamped to
                   [0, truncation]); panoptic = (IN, ReLU, block) . Linear(q->out)
           sparse  with ``fine_skip`` (not in the reference): before the occupancy head, + Linear(G*f->out)
                   of the input encoders' features at each 256 voxel (zero where nothing was lifted)
=========  ======  =======================================================================  ==========

The reference's finest level sees the lifted 2D features only through the 128^3 level (no skip connection at
full resolution), so instance borders there are blurred by one upsampling. ``fine_skip`` adds the input encoders'
stride-1 features (where the lifting put any) to the upsampled ones; its projection starts at zero, so a new
decoder begins as the reference does.

With ``query_refine_layers`` (not in the reference) the queries that make the level-128 and level-256 masks first
read the kept level-64 voxels of their own level-64 masks (:mod:`frustum3d.query_refine`); it starts as the identity.

All sparse levels drop voxels outside the grid (the generative transposed conv creates some at the border).

Prune collapse fallback (a level keeping nothing would starve every finer level and the losses): in
training, when ``gt_occupancy`` is passed, the kept set is the union of the predicted (> threshold) voxels and
the GT-occupied candidates (teacher forcing, so the finer levels always see the true surface); otherwise,
for every batch item whose prediction keeps nothing, the ``min_keep`` highest-scoring candidates are kept
(the reference falls back to keeping every candidate, which can explode the voxel count). Set
``train_gt_union=False`` to use the top-k rule in training as well.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import batch_row_ranges, sparse_lookup
from .query_refine import QueryRefiner
from .sparse import (
    SparseBasicBlock3D,
    SparseConvTranspose3d,
    SparseInstanceNorm,
    SparseLinear,
    SparseReLU,
    SparseVoxels,
    sparse_cat,
    sparse_features_at,
    sparse_union,
)
from .sparse import SparseConv3d as _SparseConv3d
from .sparse.transfer import host_to_device

__all__ = [
    "BasicBlock3D", "FrustumDecoder", "InstanceNorm3d", "SparseEncoderStage", "SparseHead", "SparseUpsampleStage",
    "decoder_input_groups", "frustum_mask_at", "in_grid", "keep_mask",
]


def decoder_input_groups(feature_channels: int, num_classes: int, occupancy_lifting: bool = True) -> tuple:
    """Feature groups of the fused lifted input: ([sign,|df|], 2D features, semantics[, BUOL K+3])."""
    groups = (2, feature_channels, num_classes)
    return groups + ((num_classes + 3,) if occupancy_lifting else ())


def frustum_mask_at(frustum: Tensor, stride: int) -> Tensor:
    """Frustum mask [B, X, Y, Z] (finest grid) -> [B, X/s, Y/s, Z/s]: a coarse cell is inside when any of its
    s^3 fine voxels is (max-pool k=s, stride=s; the reference uses k=2, stride=4, which skips voxels)."""
    if frustum.dim() == 3:
        frustum = frustum[None]
    if stride == 1:
        return frustum.bool()
    return F.max_pool3d(frustum[:, None].float(), stride, stride)[:, 0].bool()


class InstanceNorm3d(nn.Module):
    """Affine instance norm of dense [B, C, X, Y, Z] maps (biased variance, eps 1e-5), the maths of
    ``nn.InstanceNorm3d(affine=True)``, written out so it is also defined on a 1^3 map (the bottleneck of a
    32^3 test grid), where torch's version refuses to run in training mode."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and x.shape[2] * x.shape[3] * x.shape[4] > 1:
            # torch's fused kernels, statistics accumulated in float32 (the explicit form below reduces a bf16 map
            # in bf16 and makes about seven passes over it: 0.54 ms per norm of the 64^3 embedding on an H100).
            # CUDA only, so the CPU tests' and the demo's trajectories stay as they were.
            return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps).to(x.dtype)
        mean = x.mean(dim=(2, 3, 4), keepdim=True)
        var = x.var(dim=(2, 3, 4), unbiased=False, keepdim=True)
        shape = (1, -1, 1, 1, 1)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


def _instance_norm(channels: int) -> nn.Module:
    return InstanceNorm3d(channels)


class BasicBlock3D(nn.Module):
    """Dense residual block: conv3 (stride) -> IN -> ReLU -> conv3 -> IN, + residual (or projection), ReLU.

    The strided projection is ``Conv3d(k4, s2, p1)`` as in the reference dense encoder.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = _instance_norm(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = _instance_norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1:
            self.downsample: nn.Module | None = nn.Conv3d(in_channels, out_channels, 4, stride, 1, bias=False)
        elif in_channels != out_channels:
            self.downsample = nn.Conv3d(in_channels, out_channels, 1, bias=False)
        else:
            self.downsample = None

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        res = x if self.downsample is None else self.downsample(x)
        return self.relu(out + res)


@dataclass(frozen=True)
class SparseEncoderStage:
    """The layers of one sparse encoder level (L0 / L1): a strided residual block (k4 projection), then a
    plain residual block."""

    strided: SparseBasicBlock3D
    block: SparseBasicBlock3D


@dataclass(frozen=True)
class SparseUpsampleStage:
    """The layers of one sparse upsampling level (to 128 / 256): generative transposed conv (k4, s2),
    instance norm, ReLU, then (level 128 only) a residual block."""

    transposed: SparseConvTranspose3d
    norm: SparseInstanceNorm
    block: SparseBasicBlock3D | None


@dataclass(frozen=True)
class SparseHead:
    """The layers of a 256-level head: instance norm, ReLU, residual block, then (occupancy / geometry) a
    k3 convolution to the output channels; ``conv`` is None for the panoptic embedding."""

    norm: SparseInstanceNorm
    block: SparseBasicBlock3D
    conv: _SparseConv3d | None


class _SparseSeq(nn.Sequential):
    """nn.Sequential over SparseVoxels (for readability in the module tree)."""


def _sparse_encoder(cin: int, cout: int) -> nn.Module:
    return _SparseSeq(
        SparseBasicBlock3D(cin, cout, stride=2, downsample_kernel_size=4, downsample_bias=True),
        SparseBasicBlock3D(cout, cout),
    )


def _dense_encoder(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(BasicBlock3D(cin, cout, stride=2), BasicBlock3D(cout, cout))


def _dense_decoder(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose3d(cin, cout, 4, 2, 1, bias=False), _instance_norm(cout), nn.ReLU(True)
    )


def _sparse_decoder(cin: int, cout: int, extra: bool) -> nn.Module:
    layers: list[nn.Module] = [
        SparseConvTranspose3d(cin, cout, 4, stride=2, generative=True),
        SparseInstanceNorm(cout),
        SparseReLU(),
    ]
    if extra:
        layers.append(SparseBasicBlock3D(cout, cout))
    return _SparseSeq(*layers)


def _sparse_head(c: int, out: int) -> nn.Module:
    return _SparseSeq(SparseInstanceNorm(c), SparseReLU(), SparseBasicBlock3D(c, c), _SparseConv3d(c, out, 3, bias=True))


def in_grid(coords: Tensor, spatial_shape: Sequence[int]) -> Tensor:
    """Bool [N]: which (b, x, y, z) rows lie inside the grid (generative convolutions create some outside)."""
    c = coords[:, 1:]
    dims = host_to_device(tuple(spatial_shape), c.device)
    return ((c >= 0) & (c < dims)).all(1)


def _drop_outside(x: SparseVoxels) -> SparseVoxels:
    """``x`` without its rows outside the grid. Decided from the set's cached bounds (``CoordinateSet.bounds``):
    a generated set knows them without a device read, any other set reads them once and its kernel maps reuse
    them, so the common case (nothing outside) costs no host sync of its own."""
    lo, hi = x.coordinate_set.bounds()
    if x.num_voxels == 0 or (min(lo) >= 0 and all(h < d for h, d in zip(hi, x.spatial_shape, strict=True))):
        return x
    return x.select(x.coordinate_set.inside(x.spatial_shape))


def keep_mask(
    logits: Tensor, batch: Tensor, batch_size: int, threshold: float, min_keep: int, gt: Tensor | None
) -> Tensor:
    """Pruning decision over candidate voxels: sigmoid(logit) > threshold, OR gt (if given); a batch item that
    keeps nothing (and has no GT) keeps its ``min_keep`` best candidates."""
    keep = torch.sigmoid(logits.detach()) > threshold
    if gt is not None:
        keep = keep | gt.bool()
    # kept candidates per batch item without a boolean selection; one host read decides whether any item needs the
    # fallback (it almost never does), instead of a selection, a nonzero and a list read every call. A reduction of
    # the (N, B) one-hot product, not an index_add_ into B slots, whose atomics serialise on a GPU (1 ms per
    # 256^3 call on an H100, stop 41's inference profile)
    items = torch.arange(batch_size, device=keep.device)
    counts = ((batch[:, None] == items[None, :]) & keep[:, None]).sum(dim=0)
    empty = counts == 0
    if not bool(empty.any()):
        return keep
    for b in empty.nonzero().flatten().tolist():
        rows = (batch == b).nonzero().flatten()
        if rows.numel() == 0:
            continue
        top = torch.topk(logits.detach()[rows], min(min_keep, rows.numel())).indices
        keep[rows[top]] = True
    return keep


class FrustumDecoder(nn.Module):
    """Sparse/dense completion U-Net producing occupancy, geometry and per-query 3D panoptic mask logits.

    Args:
        input_groups: channel counts of the fused lifted input's feature groups (see
            :func:`decoder_input_groups`); each gets its own input block.
        query_dim: dimension of the 2D decoder's query embeddings (256).
        unet_features: f (16).
        unet_output_channels: channels at the 256^3 level (16).
        truncation: TDF clamp of the geometry head (3).
        use_multi_scale: add multi-scale lifted features at L0/L1/L2 through adapters.
        multi_scale_channels: channels of those lifted features (e.g. 256, or 272 with BUOL pyramids).
        grid_dims: finest grid; every dim must be divisible by 32 (the 8^3 bottleneck is grid/32).
        threshold: occupancy pruning threshold on sigmoid (0.5).
        min_keep: top-k fallback size per batch item when a level prunes everything.
        train_gt_union: in training, keep GT-occupied candidates too (module docstring).
        fine_skip: add the input encoders' features at the finest level (module docstring; not in the reference).
        semantic_classes: a per-voxel semantic head at the finest level with this many classes (0 = none; not in
            the reference): ``semantic_256`` logits at the ``panoptic_256`` voxels, trained on every labelled voxel,
            also those of objects no query stands for.
        query_refine_layers: before the sparse levels, refine the queries by this many steps of masked
            cross-attention onto the kept level-64 voxels (:mod:`frustum3d.query_refine`; 0 = off, the reference).
            The level-64 mask logits are the 2D queries'; levels 128 and 256 use the refined queries.

    ``forward(lifted, segm_queries, frustum_mask, ms_features=None, gt_occupancy=None)`` returns a dict:
        ``occupancy_64`` [B, X/4, Y/4, Z/4] logits, -inf outside the frustum;
        ``occupancy_128`` / ``occupancy_256`` SparseVoxels [N, 1] logits at every in-grid candidate (pre-prune);
        ``panoptic_64`` [B, Q, X/4, Y/4, Z/4] (-inf outside the frustum);
        ``panoptic_128`` / ``panoptic_256`` SparseVoxels [N, Q] at the kept voxels;
        ``geometry`` SparseVoxels [N, 1] TDF in [0, truncation] at the kept 256 voxels;
        ``coords_64`` / ``coords_128`` / ``coords_256`` the kept coordinates [N, 4] (finest-grid units; at 128 the
        union with the L0 encoder voxels); ``frustum_mask_64`` [B, X/4, Y/4, Z/4].
    """

    def __init__(
        self,
        input_groups: Sequence[int] = (2, 512, 13, 16),
        query_dim: int = 256,
        unet_features: int = 16,
        unet_output_channels: int = 16,
        truncation: float = 3.0,
        use_multi_scale: bool = False,
        multi_scale_channels: int = 256,
        grid_dims: Sequence[int] = (256, 256, 256),
        threshold: float = 0.5,
        min_keep: int = 64,
        train_gt_union: bool = True,
        fine_skip: bool = False,
        query_refine_layers: int = 0,
        semantic_classes: int = 0,
    ) -> None:
        super().__init__()
        self.input_groups = tuple(int(g) for g in input_groups)
        if any(g < 1 for g in self.input_groups):
            raise ValueError(f"input_groups must be positive channel counts, got {self.input_groups}")
        self.grid_dims = tuple(int(d) for d in grid_dims)
        if any(d % 32 for d in self.grid_dims):
            raise ValueError(f"grid_dims must be divisible by 32 (8^3 bottleneck at 256^3), got {self.grid_dims}")
        f, fo = int(unet_features), int(unet_output_channels)
        self.truncation = float(truncation)
        self.threshold = float(threshold)
        self.min_keep = int(min_keep)
        self.train_gt_union = bool(train_gt_union)
        self.use_multi_scale = bool(use_multi_scale)

        self.input_encoders = nn.ModuleList(
            SparseBasicBlock3D(g, f, downsample_bias=True) for g in self.input_groups
        )
        g_f = len(self.input_groups) * f
        self.enc0 = _sparse_encoder(g_f, f)  # 128^3
        self.enc1 = _sparse_encoder(f, 2 * f)  # 64^3 (densified)
        self.enc2 = _dense_encoder(2 * f, 4 * f)  # 32^3
        self.enc3 = _dense_encoder(4 * f, 8 * f)  # 16^3
        self.enc4 = _dense_encoder(8 * f, 8 * f)  # 8^3
        if self.use_multi_scale:
            self.adapters = nn.ModuleList(
                SparseBasicBlock3D(multi_scale_channels, c, downsample_bias=True) for c in (f, 2 * f, 4 * f)
            )
        else:
            self.adapters = None
        self.dec4 = _dense_decoder(8 * f, 8 * f)  # 8 -> 16
        self.dec3 = _dense_decoder(16 * f, 4 * f)  # 16 -> 32
        self.dec2 = _dense_decoder(8 * f, 2 * f)  # 32 -> 64
        self.dec1 = _sparse_decoder(6 * f, 2 * f, extra=True)  # 64 -> 128
        self.dec0 = _sparse_decoder(3 * f, fo, extra=False)  # 128 -> 256

        self.occupancy_64 = nn.Linear(4 * f, 1)
        self.occupancy_128 = SparseLinear(2 * f, 1)
        self.occupancy_256 = _sparse_head(fo, 1)
        self.geometry_head = _sparse_head(fo, 1)
        self.segm_embed_64 = nn.Sequential(BasicBlock3D(4 * f, 4 * f), BasicBlock3D(4 * f, 4 * f))
        self.segm_embed_128 = SparseBasicBlock3D(3 * f, 3 * f)
        self.segm_embed_256 = _SparseSeq(SparseInstanceNorm(fo), SparseReLU(), SparseBasicBlock3D(fo, fo))
        self.query_proj_64 = nn.Linear(query_dim, 4 * f)
        self.query_proj_128 = nn.Linear(query_dim, 3 * f)
        self.query_proj_256 = nn.Linear(query_dim, fo)
        #: ``fine_skip``: the input encoders' features projected onto the finest level's channels (zero at first)
        self.skip_256: SparseLinear | None = None
        if fine_skip:
            self.skip_256 = SparseLinear(g_f, fo, bias=False)
            nn.init.zeros_(self.skip_256.linear.weight)
        #: ``query_refine_layers``: the queries read the level-64 voxels in their masks (identity at first)
        self.query_refiner: QueryRefiner | None = None
        if query_refine_layers > 0:
            self.query_refiner = QueryRefiner(query_dim, 4 * f, layers=int(query_refine_layers))
        #: ``semantic_classes``: per-voxel class logits at the finest level
        self.semantic_256: nn.Module | None = _sparse_head(fo, int(semantic_classes)) if semantic_classes > 0 else None
        #: optional stand-in for :meth:`dense_levels` in evaluation-mode, no-grad forwards (same arguments and
        #: results), e.g. a CUDA-graph replay of it (``nvp3d``'s ``inference.cuda_graphs``); None: run it eagerly
        self.dense_runner: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None

    # ------------------------------------------------------------------------------------------------ accessors
    # The named layers of each sparse level, for code that replays a level outside ``forward`` (the padded
    # graphs of :mod:`frustum3d.decoder_graphs`) without depending on how the levels are stored.
    def sparse_encoder_stage(self, level: int) -> SparseEncoderStage:
        """Layers of sparse encoder level ``level``: 0 = L0 (to 128^3, stride 2), 1 = L1 (to 64^3, stride 4)."""
        stages = {0: self.enc0, 1: self.enc1}
        if level not in stages:
            raise ValueError(f"sparse encoder level must be 0 (L0, 128^3) or 1 (L1, 64^3), got {level!r}")
        seq = stages[level]
        return SparseEncoderStage(strided=seq[0], block=seq[1])

    def sparse_upsample_stage(self, level: int) -> SparseUpsampleStage:
        """Layers of the sparse upsampling to ``level`` = 128 (``dec1``, with a residual block) or 256 (``dec0``)."""
        stages = {128: self.dec1, 256: self.dec0}
        if level not in stages:
            raise ValueError(f"sparse upsampling level must be 128 or 256, got {level!r}")
        seq = stages[level]
        return SparseUpsampleStage(transposed=seq[0], norm=seq[1], block=seq[3] if len(seq) > 3 else None)

    def sparse_head(self, name: str) -> SparseHead:
        """Layers of a 256-level head: ``"occupancy_256"``, ``"geometry"`` or ``"panoptic_256"`` (the
        per-voxel embedding that is dotted with ``query_proj_256`` of the queries)."""
        heads = {"occupancy_256": self.occupancy_256, "geometry": self.geometry_head,
                 "panoptic_256": self.segm_embed_256}
        if name not in heads:
            raise ValueError(f"sparse head must be one of {sorted(heads)}, got {name!r}")
        seq = heads[name]
        return SparseHead(norm=seq[0], block=seq[2], conv=seq[3] if len(seq) > 3 else None)

    def query_projection(self, level: int) -> nn.Linear:
        """The Linear(query_dim -> C) that turns 2D queries into level ``level`` (64, 128, 256) mask weights."""
        projections = {64: self.query_proj_64, 128: self.query_proj_128, 256: self.query_proj_256}
        if level not in projections:
            raise ValueError(f"query projection level must be 64, 128 or 256, got {level!r}")
        return projections[level]

    # ------------------------------------------------------------------------------------------------ helpers
    def _encode_inputs(self, lifted: SparseVoxels) -> SparseVoxels:
        total = sum(self.input_groups)
        if lifted.num_channels != total:
            raise ValueError(f"lifted input has {lifted.num_channels} channels but input_groups "
                             f"{self.input_groups} sum to {total}")
        parts, start = [], 0
        for width, block in zip(self.input_groups, self.input_encoders, strict=True):
            parts.append(block(lifted.replace_feats(lifted.feats[:, start:start + width])))
            start += width
        return sparse_cat(*parts)

    @staticmethod
    def _query_logits(x: SparseVoxels, queries: Tensor) -> SparseVoxels:
        """Per-voxel dot products with its batch item's queries: [N, C] x [B, Q, C] -> [N, Q]."""
        # Rows are sorted by batch item: one matmul per contiguous block, no masked scatter / gather.
        parts = []
        for b, (start, end) in enumerate(batch_row_ranges(x)):
            if b < queries.shape[0]:
                parts.append((x.feats[start:end] @ queries[b].T).to(x.feats.dtype))
            else:
                parts.append(x.feats.new_zeros(end - start, queries.shape[1]))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return x.replace_feats(out)

    def _gt_at(self, gt_occupancy: Mapping[str, Tensor] | None, key: str, x: SparseVoxels) -> Tensor | None:
        if not (self.training and self.train_gt_union and gt_occupancy is not None and key in gt_occupancy):
            return None
        return sparse_lookup(x, gt_occupancy[key].float(), fill=0.0) > 0.5

    def dense_levels(self, e1_dense: Tensor, segm_queries: Tensor, frustum_mask_64: Tensor,
                     d2_extra: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The decoder's dense part, whose shapes depend only on the batch size: the L2..L4 encoders (32^3 ..
        8^3), the dense up-path back to 64^3 and the level-64 heads. A fixed-shape step between two sparse ones,
        so it can be replayed from a CUDA graph (:attr:`dense_runner`).

        Args: the densified L1 features ``[B, 2f, X/4, Y/4, Z/4]``, the 2D queries ``[B, Q, query_dim]``, the
        level-64 frustum mask (bool, same grid) and the multi-scale adapter's level-2 features (dense, added after
        L2) when ``use_multi_scale``. Returns ``u64`` ``[B, 4f, ...]`` (the level-64 features the sparse levels
        continue from), ``occupancy_64`` and ``panoptic_64`` (-inf outside the frustum)."""
        d2 = self.enc2(e1_dense)  # 32^3
        if d2_extra is not None:
            d2 = d2 + d2_extra
        d3 = self.enc3(d2)
        d4 = self.enc4(d3)
        u16 = torch.cat([d3, self.dec4(d4)], 1)
        u32 = torch.cat([d2, self.dec3(u16)], 1)
        u64 = torch.cat([e1_dense, self.dec2(u32)], 1)  # [B, 4f, 64^3]

        occ64 = self.occupancy_64(u64.permute(0, 2, 3, 4, 1))[..., 0]
        occ64 = occ64.masked_fill(~frustum_mask_64, float("-inf"))
        q64 = self.query_proj_64(segm_queries)
        pan64 = torch.einsum("bqc,bcxyz->bqxyz", q64, self.segm_embed_64(u64))
        pan64 = pan64.masked_fill(~frustum_mask_64[:, None], float("-inf"))
        return u64, occ64, pan64

    # ------------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        lifted: SparseVoxels,
        segm_queries: Tensor,
        frustum_mask: Tensor,
        ms_features: Sequence[SparseVoxels] | None = None,
        gt_occupancy: Mapping[str, Tensor] | None = None,
    ) -> dict[str, object]:
        """Args:
            lifted: fused lifted input (stride 1, ``sum(input_groups)`` channels).
            segm_queries: [B, Q, query_dim] 2D query embeddings.
            frustum_mask: bool [B, X, Y, Z] (finest) or [B, X/4, Y/4, Z/4] (already at level 64) or unbatched.
            ms_features: three SparseVoxels at strides 2, 4, 8 (``multi_scale_channels``) if use_multi_scale.
            gt_occupancy: optional dense GT occupancy {"64": [B,X/4..], "128": [B,X/2..], "256": [B,X..]} used
                for the training-time prune fallback.
        """
        if tuple(lifted.spatial_shape) != self.grid_dims:
            raise ValueError(f"lifted spatial_shape {lifted.spatial_shape} != decoder grid_dims {self.grid_dims}")
        bsz = lifted.batch_size
        if segm_queries.dim() != 3 or segm_queries.shape[0] != bsz:
            raise ValueError(f"segm_queries must be [B={bsz}, Q, C], got {tuple(segm_queries.shape)}")
        g64 = tuple(d // 4 for d in self.grid_dims)
        fm = frustum_mask if frustum_mask.dim() == 4 else frustum_mask[None]
        if tuple(fm.shape[1:]) == self.grid_dims:
            fm64 = frustum_mask_at(fm, 4)
        elif tuple(fm.shape[1:]) == g64:
            fm64 = fm.bool()
        else:
            raise ValueError(f"frustum_mask spatial shape {tuple(fm.shape[1:])} is neither {self.grid_dims} "
                             f"nor {g64}")
        fm64 = fm64.to(lifted.device).expand(bsz, *g64)
        if self.use_multi_scale and (ms_features is None or len(ms_features) != 3):
            raise ValueError("use_multi_scale=True needs ms_features: three SparseVoxels at strides 2, 4, 8")

        # ---------------- encoder
        x_in = self._encode_inputs(lifted)
        e0 = _drop_outside(self.enc0(x_in))  # stride 2
        if self.adapters is not None:
            e0 = e0 + self.adapters[0](ms_features[0])
        e1 = _drop_outside(self.enc1(e0))  # stride 4
        if self.adapters is not None:
            e1 = e1 + self.adapters[1](ms_features[1])
        e1_dense = e1.to_dense()  # [B, 2f, 64^3]
        dense_inputs = [e1_dense, segm_queries, fm64]
        if self.adapters is not None:
            dense_inputs.append(self.adapters[2](ms_features[2]).to_dense())
        runner = self.dense_runner if not self.training and not torch.is_grad_enabled() else None
        u64, occ64, pan64 = (runner or self.dense_levels)(*dense_inputs)

        cand = fm64.nonzero()  # frustum voxels are the level-64 candidates
        gt64 = None
        if self.training and self.train_gt_union and gt_occupancy is not None and "64" in gt_occupancy:
            g = gt_occupancy["64"].to(cand.device)
            gt64 = g[cand[:, 0], cand[:, 1], cand[:, 2], cand[:, 3]] > 0.5
        keep = keep_mask(occ64[cand[:, 0], cand[:, 1], cand[:, 2], cand[:, 3]], cand[:, 0], bsz,
                          self.threshold, self.min_keep, gt64)
        kept = cand[keep]
        kept_feats = u64.permute(0, 2, 3, 4, 1)[kept[:, 0], kept[:, 1], kept[:, 2], kept[:, 3]]
        coords64 = kept.clone()
        coords64[:, 1:] *= 4
        s64 = SparseVoxels(coords64, kept_feats, stride=4, spatial_shape=self.grid_dims, batch_size=bsz)
        if self.query_refiner is not None:  # each query reads the kept voxels of its own level-64 mask
            mask_at_kept = pan64[kept[:, 0], :, kept[:, 1], kept[:, 2], kept[:, 3]]  # [N, Q]
            segm_queries = self.query_refiner(segm_queries, kept_feats, batch_row_ranges(s64), mask_at_kept)

        # ---------------- level 128 (sparse)
        x128 = _drop_outside(self.dec1(sparse_union(e1, s64, mode="cat")))
        occ128 = self.occupancy_128(x128)
        keep128 = keep_mask(occ128.feats[:, 0], x128.coordinate_set.batch_index(), bsz, self.threshold,
                             self.min_keep, self._gt_at(gt_occupancy, "128", x128))
        x128 = sparse_union(e0, x128.select(keep128), mode="cat")  # 3f
        pan128 = self._query_logits(self.segm_embed_128(x128), self.query_proj_128(segm_queries))

        # ---------------- level 256 (sparse)
        x256 = _drop_outside(self.dec0(x128))
        if self.skip_256 is not None:
            x256 = x256 + self.skip_256(sparse_features_at(x_in, x256))
        occ256 = self.occupancy_256(x256)
        keep256 = keep_mask(occ256.feats[:, 0], x256.coordinate_set.batch_index(), bsz, self.threshold,
                             self.min_keep, self._gt_at(gt_occupancy, "256", x256))
        x256 = x256.select(keep256)
        geo = self.geometry_head(x256)
        geo = geo.replace_feats(geo.feats.clamp(0.0, self.truncation))
        pan256 = self._query_logits(self.segm_embed_256(x256), self.query_proj_256(segm_queries))
        extra = {} if self.semantic_256 is None else {"semantic_256": self.semantic_256(x256)}

        return {**extra,
            "occupancy_64": occ64,
            "occupancy_128": occ128,
            "occupancy_256": occ256,
            "panoptic_64": pan64,
            "panoptic_128": pan128,
            "panoptic_256": pan256,
            "geometry": geo,
            "coords_64": s64.coords,
            "coords_128": x128.coords,
            "coords_256": x256.coords,
            "frustum_mask_64": fm64,
        }
