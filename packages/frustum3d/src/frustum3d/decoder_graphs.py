"""The sparse 3D completion levels of :class:`frustum3d.decoder.FrustumDecoder` as fixed-size graphs.

These modules replay each sparse level of the decoder with standard tensor ops only (no coordinate
hashing, no data-dependent shapes), so that a level can be traced to a static graph (e.g. ONNX by
``nvp3d.export``; this package itself imports no exporter). They share the decoder's parameters and reach
its layers through its public accessors (:meth:`FrustumDecoder.sparse_encoder_stage`,
:meth:`~FrustumDecoder.sparse_upsample_stage`, :meth:`~FrustumDecoder.sparse_head`,
:meth:`~FrustumDecoder.query_projection`).

A sparse tensor inside these graphs is a padded feature matrix ``(M, C)`` with ``M = export.max_voxels``:
rows ``0 .. n-1`` are the voxels of one coordinate set (in the set's sorted order), rows ``n .. M-1`` are
padding. ``n`` enters every graph as a 1-element int64 input ``num_<set>``. Everything that depends on
coordinates (kernel maps, unions, pruning, generative output sets) is computed outside (by a driver such as
``nvp3d.export.sparse_driver``, with frustum3d's own coordinate functions) and enters as int64 index tables:

* a neighbour table ``nbr_*`` ``(M, K^3)``: row q, column k = the input row read by output q through kernel
  offset k (frustum3d's ``KernelMap.nbr`` with its -1 replaced by the *sentinel* ``M``), padding rows all
  sentinel;
* a row-selection table ``*_from_*`` ``(M,)``: the input row each output row copies, or the sentinel (zero).

Every op maps to a standard ONNX operator (Gather, MatMul/Gemm, Add, Sub, Mul, Div, ReduceSum, Concat,
Reshape, Transpose, Slice, Relu, Sqrt, Clip, Less, Cast):

* sparse convolution: ``out[q] = sum_k [x; 0][nbr[q, k]] @ W[k] (+ bias)`` with a zero row appended at the
  sentinel index; the same form covers submanifold, strided (k3/k4, s2) and generative transposed (k4, s2)
  convolutions, only the tables differ. Blocks of offsets become one GEMM each (:func:`padded_conv`);
* instance norm: statistics over the valid rows only (``mean = sum(x * valid) / n``, blocked sums, see
  :func:`row_sum`), so padding content never reaches a valid row; padding rows come out as finite junk that
  no table points at.

Graphs (all batch 1; the driver runs one batch item at a time): :class:`SparseEncoderGraph` (input encoders,
L0 and L1 encoders, densified L1), :class:`Level128Graph` (union with the kept 64^3 voxels, generative
transposed conv to 128^3, occupancy_128), :class:`Level256Graph` (union with L0 after the 128 prune,
panoptic_128, generative transposed conv to 256^3, drop outside the grid, occupancy_256) and
:class:`Heads256Graph` (after the 256 prune: geometry and panoptic_256).
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .decoder import FrustumDecoder, SparseEncoderStage, SparseHead
from .sparse import SparseBasicBlock3D, SparseConv3d, SparseConvTranspose3d, SparseInstanceNorm

__all__ = [
    "CONV_COLUMNS",
    "GRAPH_PARTS",
    "Heads256Graph",
    "Level128Graph",
    "Level256Graph",
    "SparseEncoderGraph",
    "SparseGraph",
    "basic_block",
    "build_sparse_graphs",
    "gather_rows",
    "padded_conv",
    "RowSet",
    "padded_instance_norm",
    "query_logits",
    "row_sum",
]

#: the sparse graphs in the order the driver runs them (the dense 64^3 graph runs between encoder and level128)
GRAPH_PARTS = ("encoder", "level128", "level256", "heads256")


# ---------------------------------------------------------------------------------------------- padded ops
def gather_rows(x: Tensor, rows: Tensor) -> Tensor:
    """``[x; 0][rows]``: copy rows of ``x`` (M_in, C); index ``M_in`` (the sentinel) reads a zero row."""
    xz = torch.cat([x, x.new_zeros(1, x.shape[1])], 0)
    return torch.index_select(xz, 0, rows)


#: widest intermediate of one padded-convolution step, in columns (M x 256 floats: 716 MB at 700000 rows)
CONV_COLUMNS = 256


def padded_conv(x: Tensor, nbr: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Sparse convolution on padded rows: ``out[q] = sum_k [x; 0][nbr[q, k]] @ weight[k] (+ bias)``.

    ``x`` (M_in, C_in); ``nbr`` (M_out, K^3) int64 with sentinel ``M_in``; ``weight`` (K^3, C_in, C_out) in
    frustum3d's offset order (the table's column order). Offsets are taken in blocks whose intermediate has at
    most :data:`CONV_COLUMNS` columns. ``C_in > C_out``: multiply first, ``[x; 0] @ [W_k ...]`` in one GEMM,
    then gather each offset's column block; else gather first, ``[x; 0][nbr[:, block]]`` reshaped to
    (M_out, n * C_in), then one GEMM with the stacked ``W_k`` (im2col over the block).
    """
    xz = torch.cat([x, x.new_zeros(1, x.shape[1])], 0)
    kv, cin, cout = (int(d) for d in weight.shape)
    out = None
    if cin > cout:
        step = max(1, CONV_COLUMNS // cout)
        for k0 in range(0, kv, step):
            n = min(step, kv - k0)
            y = xz @ weight[k0:k0 + n].permute(1, 0, 2).reshape(cin, n * cout)
            for j in range(n):
                term = torch.index_select(y[:, j * cout:(j + 1) * cout], 0, nbr[:, k0 + j])
                out = term if out is None else out + term
    else:
        step = max(1, CONV_COLUMNS // cin)
        for k0 in range(0, kv, step):
            n = min(step, kv - k0)
            cols = xz[nbr[:, k0:k0 + n]].reshape(nbr.shape[0], n * cin)
            term = cols @ weight[k0:k0 + n].reshape(n * cin, cout)
            out = term if out is None else out + term
    return out if bias is None else out + bias


class RowSet:
    """The valid rows of one padded coordinate set: ``valid`` (M, 1) 0/1 floats and ``count`` (1,) >= 1."""

    def __init__(self, rows: Tensor, num: Tensor, dtype: torch.dtype) -> None:
        self.valid = (rows < num).to(dtype)[:, None]
        self.count = torch.clamp(num.to(dtype), min=1.0)


def row_sum(x: Tensor) -> Tensor:
    """``x.sum(0, keepdim=True)`` as two nested sums over about sqrt(M) rows each.

    onnxruntime reduces a long axis sequentially in fp32 (error up to ~ M * 6e-8, 4e-2 at 700000 rows; the
    instance norm's ``x - mean`` amplifies it); summing blocks of ~sqrt(M) rows, then the block sums, keeps
    it near sqrt(M) * 6e-8, like PyTorch's cascade sum.
    """
    m, c = int(x.shape[0]), int(x.shape[1])  # static sizes: the graphs have a fixed row count
    block = max(1, math.isqrt(m))
    blocks = -(-m // block)
    if blocks * block != m:
        x = torch.cat([x, x.new_zeros(blocks * block - m, c)], 0)
    return x.reshape(blocks, block, c).sum(1).sum(0, keepdim=True)


def padded_instance_norm(x: Tensor, rows: RowSet, norm: SparseInstanceNorm) -> Tensor:
    """frustum3d's per-item instance norm (biased variance) over the valid rows only.

    The statistics are taken of ``x - x[0]`` (row 0 is valid whenever any row is): the same result in exact
    arithmetic, but the fp32 sums then carry errors relative to the spread of the features instead of their
    mean, which ``x - mean`` would amplify by ``|mean| / std``.
    """
    x = x - x[0:1]
    mean = row_sum(x * rows.valid) / rows.count
    d = (x - mean) * rows.valid
    var = row_sum(d * d) / rows.count
    y = d * torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        y = y * norm.weight + norm.bias
    return y


def _conv(conv: SparseConv3d | SparseConvTranspose3d, x: Tensor, nbr: Tensor | None) -> Tensor:
    """A frustum3d conv on padded rows; ``nbr`` None only for a k1 conv on the same set (a plain matmul)."""
    if nbr is None:
        if conv.kernel_size != 1:
            raise ValueError(f"{type(conv).__name__} with kernel {conv.kernel_size} needs a neighbour table")
        out = x @ conv.weight[0]
        return out if conv.bias is None else out + conv.bias
    return padded_conv(x, nbr, conv.weight, conv.bias)


def basic_block(block: SparseBasicBlock3D, x: Tensor, *, nbr1: Tensor, num_out: RowSet, nbr2: Tensor,
                nbr_down: Tensor | None = None) -> Tensor:
    """``SparseBasicBlock3D.forward`` on padded rows.

    ``nbr1``: conv1's table (input set -> output set); ``nbr2``: the output set's k3 submanifold table;
    ``nbr_down``: the strided projection's table (None for the k1 projection or the identity residual).
    """
    if not isinstance(block.norm1, SparseInstanceNorm):
        raise ValueError("only instance-norm sparse blocks have a padded graph (FrustumDecoder uses instance norm)")
    out = torch.relu(padded_instance_norm(_conv(block.conv1, x, nbr1), num_out, block.norm1))
    out = padded_instance_norm(_conv(block.conv2, out, nbr2), num_out, block.norm2)
    if block.downsample is None:
        residual = x
    else:
        proj, norm = _projection(block)
        residual = padded_instance_norm(_conv(proj, x, nbr_down), num_out, norm)
    return torch.relu(out + residual)


def _projection(block: SparseBasicBlock3D) -> tuple[SparseConv3d, SparseInstanceNorm]:
    """The residual projection of a block: SparseBasicBlock3D's default ``(SparseConv3d, norm)`` pair."""
    layers = list(block.downsample.children()) if block.downsample is not None else []
    if len(layers) != 2 or not isinstance(layers[0], SparseConv3d) or not isinstance(layers[1], SparseInstanceNorm):
        raise ValueError("a residual projection other than SparseBasicBlock3D's (SparseConv3d, SparseInstanceNorm) "
                         "pair has no padded graph")
    return layers[0], layers[1]


def query_logits(feats: Tensor, proj: nn.Linear, segm_queries: Tensor) -> Tensor:
    """(M, C) voxel features x (1, Q, query_dim) queries -> (M, Q) logits (the decoder's per-voxel dot products
    with its batch item's projected queries)."""
    return feats @ proj(segm_queries[0]).transpose(0, 1)


# ---------------------------------------------------------------------------------------------- graphs
class SparseGraph(nn.Module, metaclass=ABCMeta):
    """A graph over named inputs: ``forward(*inputs)`` in :attr:`input_names` order, outputs in
    :attr:`output_names` order. :attr:`output_rows` names, per padded output, the ``num_*`` input that counts
    its valid rows (outputs not listed are fully valid)."""

    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    output_rows: dict[str, str] = {}

    def __init__(self, decoder: FrustumDecoder) -> None:
        super().__init__()
        if decoder.use_multi_scale:
            raise ValueError("the sparse 3D levels of a decoder with use_multi_scale (adapters) have no padded graph; "
                             "export the dense level only")
        if decoder.skip_256 is not None:
            raise ValueError("the sparse 3D levels of a decoder with fine_skip have no padded graph yet (the level-256 "
                             "graphs do not carry the input encoders' features); export the dense level only")
        if decoder.query_refiner is not None:
            raise ValueError("the sparse 3D levels of a decoder with query_refine_layers have no padded graph yet (the "
                             "graphs take the 2D queries as they are); export the dense level only")
        if decoder.semantic_256 is not None:
            raise ValueError("the sparse 3D levels of a decoder with a semantic head (semantic_classes) have no padded "
                             "graph yet; export the dense level only")
        self.decoder = decoder

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"{type(self).__name__} takes {len(self.input_names)} inputs {self.input_names}, "
                             f"got {len(inputs)}")
        t: dict = dict(zip(self.input_names, inputs, strict=True))
        first = inputs[0]
        # one row index for the whole graph (a traced arange becomes an M-long constant: share it)
        rows = torch.arange(first.shape[0], device=first.device)
        for name in self.input_names:
            if name.startswith("num_"):
                t[name] = RowSet(rows, t[name], first.dtype)
        out = self.compute(t)
        return tuple(out[n] for n in self.output_names)

    def run(self, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        """Named call (the driver's runner interface)."""
        return dict(zip(self.output_names, self(*(feeds[n] for n in self.input_names)), strict=True))

    @abstractmethod
    def compute(self, t: dict) -> dict[str, Tensor]:
        """The graph body; ``t`` maps input names to tensors, except ``num_*`` which map to :class:`RowSet`."""


def _encoder_stage(stage: SparseEncoderStage, x: Tensor, t: dict, src: str, dst: str) -> Tensor:
    """One sparse encoder level (strided block + block) from set ``src`` to set ``dst`` (stride x2)."""
    x = basic_block(stage.strided, x, nbr1=t[f"nbr_{src}{dst}_k3"], num_out=t[f"num_{dst}"],
                    nbr2=t[f"nbr_{dst}_k3"], nbr_down=t[f"nbr_{src}{dst}_k4"])
    return basic_block(stage.block, x, nbr1=t[f"nbr_{dst}_k3"], num_out=t[f"num_{dst}"], nbr2=t[f"nbr_{dst}_k3"])


class SparseEncoderGraph(SparseGraph):
    """Input encoders (one block per feature group, concatenated) + L0 (s0 -> s1, 128^3) + L1 (s1 -> s2, 64^3).

    Outputs the L0 and L1 features on their padded sets and the L1 features densified through the gather
    table ``dense_from_s2`` (cell -> s2 row or sentinel), i.e. the dense graph's ``encoder_features_64``.
    """

    input_names = ("lifted_feats", "num_s0", "num_s1", "num_s2", "nbr_s0_k3", "nbr_s0s1_k3", "nbr_s0s1_k4",
                   "nbr_s1_k3", "nbr_s1s2_k3", "nbr_s1s2_k4", "nbr_s2_k3", "dense_from_s2")
    output_names = ("encoder_features_128", "encoder_features_64_sparse", "encoder_features_64")
    output_rows = {"encoder_features_128": "num_s1", "encoder_features_64_sparse": "num_s2"}

    def compute(self, t: dict) -> dict[str, Tensor]:
        d = self.decoder
        x = t["lifted_feats"]
        parts, start = [], 0
        for width, block in zip(d.input_groups, d.input_encoders, strict=True):
            parts.append(basic_block(block, x[:, start:start + width], nbr1=t["nbr_s0_k3"], num_out=t["num_s0"],
                                     nbr2=t["nbr_s0_k3"]))
            start += width
        x = torch.cat(parts, 1)
        e0 = _encoder_stage(d.sparse_encoder_stage(0), x, t, "s0", "s1")
        e1 = _encoder_stage(d.sparse_encoder_stage(1), e0, t, "s1", "s2")
        g = tuple(s // 4 for s in d.grid_dims)
        dense = gather_rows(e1, t["dense_from_s2"])  # (X*Y*Z, 2f)
        dense = dense.transpose(0, 1).reshape(1, e1.shape[1], *g)
        return {"encoder_features_128": e0, "encoder_features_64_sparse": e1, "encoder_features_64": dense}


class Level128Graph(SparseGraph):
    """union(L1, kept 64^3 voxels) -> upsampling to 128 (generative transposed conv k4 s2 + IN + ReLU + block) on the
    generated set g128 (outside-grid voxels included, as in FrustumDecoder) -> ``occupancy_128`` logits."""

    input_names = ("encoder_features_64_sparse", "decoder_features_64", "u64_from_s2", "u64_from_dense",
                   "nbr_u64g128_k4t", "num_g128", "nbr_g128_k3")
    output_names = ("features_128", "occupancy_128")
    output_rows = {"features_128": "num_g128", "occupancy_128": "num_g128"}

    def compute(self, t: dict) -> dict[str, Tensor]:
        d = self.decoder
        u64 = t["decoder_features_64"]
        cells = u64.reshape(u64.shape[1], -1).transpose(0, 1)  # (X*Y*Z, 4f), row = flat cell index
        x = torch.cat([gather_rows(t["encoder_features_64_sparse"], t["u64_from_s2"]),
                       gather_rows(cells, t["u64_from_dense"])], 1)  # 6f on u64
        up = d.sparse_upsample_stage(128)
        x = torch.relu(padded_instance_norm(_conv(up.transposed, x, t["nbr_u64g128_k4t"]), t["num_g128"], up.norm))
        x = basic_block(up.block, x, nbr1=t["nbr_g128_k3"], num_out=t["num_g128"], nbr2=t["nbr_g128_k3"])
        return {"features_128": x, "occupancy_128": d.occupancy_128.linear(x)}


def _sparse_head(head: SparseHead, x: Tensor, num: RowSet, nbr: Tensor) -> Tensor:
    """A 256-level head: IN, ReLU, block (and its k3 conv to the output channels, when it has one)."""
    x = torch.relu(padded_instance_norm(x, num, head.norm))
    x = basic_block(head.block, x, nbr1=nbr, num_out=num, nbr2=nbr)
    return x if head.conv is None else _conv(head.conv, x, nbr)


class Level256Graph(SparseGraph):
    """After the 128 prune: union(L0, kept 128) -> ``segm_embed_128`` -> ``panoptic_128``; upsampling to 256
    (generative transposed conv + IN + ReLU) on g256, the in-grid rows x256 selected by ``x256_from_g256``,
    ``occupancy_256`` head on x256."""

    input_names = ("encoder_features_128", "features_128", "u128_from_s1", "u128_from_g128", "num_u128",
                   "nbr_u128_k3", "segm_queries", "nbr_u128g256_k4t", "num_g256", "x256_from_g256", "num_x256",
                   "nbr_x256_k3")
    output_names = ("panoptic_128", "features_256", "occupancy_256")
    output_rows = {"panoptic_128": "num_u128", "features_256": "num_x256", "occupancy_256": "num_x256"}

    def compute(self, t: dict) -> dict[str, Tensor]:
        d = self.decoder
        x = torch.cat([gather_rows(t["encoder_features_128"], t["u128_from_s1"]),
                       gather_rows(t["features_128"], t["u128_from_g128"])], 1)  # 3f on u128
        emb = basic_block(d.segm_embed_128, x, nbr1=t["nbr_u128_k3"], num_out=t["num_u128"], nbr2=t["nbr_u128_k3"])
        pan128 = query_logits(emb, d.query_projection(128), t["segm_queries"])
        up = d.sparse_upsample_stage(256)
        g = torch.relu(padded_instance_norm(_conv(up.transposed, x, t["nbr_u128g256_k4t"]), t["num_g256"], up.norm))
        x256 = gather_rows(g, t["x256_from_g256"])
        occ = _sparse_head(d.sparse_head("occupancy_256"), x256, t["num_x256"], t["nbr_x256_k3"])
        return {"panoptic_128": pan128, "features_256": x256, "occupancy_256": occ}


class Heads256Graph(SparseGraph):
    """After the 256 prune: the kept rows k256 (``k256_from_x256``) -> geometry head (clamped to
    [0, truncation]) and ``segm_embed_256`` -> ``panoptic_256``."""

    input_names = ("features_256", "k256_from_x256", "num_k256", "nbr_k256_k3", "segm_queries")
    output_names = ("geometry", "panoptic_256")
    output_rows = {"geometry": "num_k256", "panoptic_256": "num_k256"}

    def compute(self, t: dict) -> dict[str, Tensor]:
        d = self.decoder
        x = gather_rows(t["features_256"], t["k256_from_x256"])
        num, nbr = t["num_k256"], t["nbr_k256_k3"]
        geo = torch.clamp(_sparse_head(d.sparse_head("geometry"), x, num, nbr), 0.0, d.truncation)
        emb = _sparse_head(d.sparse_head("panoptic_256"), x, num, nbr)
        return {"geometry": geo, "panoptic_256": query_logits(emb, d.query_projection(256), t["segm_queries"])}


_GRAPH_CLASSES: dict[str, type[SparseGraph]] = {
    "encoder": SparseEncoderGraph, "level128": Level128Graph, "level256": Level256Graph, "heads256": Heads256Graph,
}


def build_sparse_graphs(decoder: FrustumDecoder, parts: Sequence[str] = GRAPH_PARTS) -> dict[str, SparseGraph]:
    """The four graph modules of ``decoder`` (sharing its parameters), in eval mode."""
    return {p: _GRAPH_CLASSES[p](decoder).eval() for p in parts}
