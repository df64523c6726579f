"""The sparse 3D completion levels as fixed-size graphs: defined in :mod:`frustum3d.decoder_graphs` (next to
the decoder they mirror, through its public accessors); re-exported here under the names nvp3d.export uses.
The ONNX export and onnxruntime checks of these graphs stay in :mod:`nvp3d.export.sparse_export`."""

from __future__ import annotations

from frustum3d.decoder_graphs import (
    CONV_COLUMNS,
    GRAPH_PARTS,
    Heads256Graph,
    Level128Graph,
    Level256Graph,
    RowSet,
    SparseEncoderGraph,
    SparseGraph,
    basic_block,
    build_sparse_graphs,
    gather_rows,
    padded_conv,
    padded_instance_norm,
    query_logits,
    row_sum,
)

__all__ = [
    "CONV_COLUMNS",
    "GRAPH_PARTS",
    "Heads256Graph",
    "Level128Graph",
    "Level256Graph",
    "RowSet",
    "SparseEncoderGraph",
    "SparseGraph",
    "basic_block",
    "build_sparse_graphs",
    "gather_rows",
    "padded_conv",
    "padded_instance_norm",
    "query_logits",
    "row_sum",
]
