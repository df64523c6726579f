"""The dense 64^3 part of the 3D completion decoder (:class:`frustum3d.decoder.FrustumDecoder`) as one graph.

What runs where (3D stage, default 256^3 grid, f = ``unet_features``):

=====================================================  ==========================  =============================
part                                                   runs in                     why
=====================================================  ==========================  =============================
2D model (image -> masks, depth, queries, features)    ONNX 2D graph               dense
back-projection, occupancy-aware lifting, sparse       PyTorch (frustum3d)         data-dependent voxel sets
projection (frustum voxels, kept sets)
input encoders + L0 (128^3) + L1 (64^3) sparse         PyTorch (frustum3d.sparse)  sparse conv (kernel maps from
encoders; adapters (multi-scale)                                                   coordinate hashing)
L2..L4 dense encoders, dense decoder 8->16->32->64,    **ONNX 3D graph** (this)    dense Conv3d/ConvTranspose3d
occupancy_64 head, panoptic_64 head (query einsum)
prune at 0.5 -> kept 64 voxels; level 128 and 256      PyTorch (frustum3d)         generative sparse conv,
(generative transposed conv, prune, geometry and                                   pruning: voxel count and
panoptic heads)                                                                    coordinates depend on data
=====================================================  ==========================  =============================

Graph inputs: ``encoder_features_64`` (B, 2f, X/4, Y/4, Z/4) float, the densified L1 encoder output;
``segm_queries`` (B, Q, query_dim) float, the 2D graph's ``segm_decoder_out``; ``frustum_mask_64``
(B, X/4, Y/4, Z/4) bool; with ``use_multi_scale`` also ``ms_features_32`` (B, 4f, X/8, Y/8, Z/8), the
densified level-2 adapter output. Outputs: ``occupancy_64`` (B, X/4, Y/4, Z/4) logits, -inf outside the
frustum; ``panoptic_64`` (B, Q, X/4, Y/4, Z/4) query logits, -inf outside; ``decoder_features_64`` (B, 4f, X/4,
Y/4, Z/4), the decoder features the sparse level 128 gathers at the kept voxels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from frustum3d.decoder import FrustumDecoder
from torch import nn

from nvp3d.errors import WrongStageCheckpointError

INPUT_NAMES_3D = ("encoder_features_64", "segm_queries", "frustum_mask_64")
INPUT_NAME_MS = "ms_features_32"
OUTPUT_NAMES_3D = ("occupancy_64", "panoptic_64", "decoder_features_64")

#: keys that identify the decoder inside a checkpoint (relative to its prefix)
_MARKER = "occupancy_64.weight"


class DenseCompletion64(nn.Module):
    """The dense levels of a :class:`FrustumDecoder`, exactly as its ``forward`` runs them (shared modules)."""

    def __init__(self, decoder: FrustumDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    @property
    def input_names(self) -> tuple[str, ...]:
        return INPUT_NAMES_3D + ((INPUT_NAME_MS,) if self.decoder.use_multi_scale else ())

    def forward(self, encoder_features_64: torch.Tensor, segm_queries: torch.Tensor, frustum_mask_64: torch.Tensor,
                ms_features_32: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.decoder
        d2 = d.enc2(encoder_features_64)
        if d.use_multi_scale:
            if ms_features_32 is None:
                raise ValueError("this decoder uses multi-scale features: pass ms_features_32")
            d2 = d2 + ms_features_32
        d3 = d.enc3(d2)
        d4 = d.enc4(d3)
        u16 = torch.cat([d3, d.dec4(d4)], 1)
        u32 = torch.cat([d2, d.dec3(u16)], 1)
        u64 = torch.cat([encoder_features_64, d.dec2(u32)], 1)
        outside = ~frustum_mask_64.bool()
        occ = d.occupancy_64(u64.permute(0, 2, 3, 4, 1))[..., 0]
        occ = occ.masked_fill(outside, float("-inf"))
        queries = d.query_proj_64(segm_queries)
        pan = torch.einsum("bqc,bcxyz->bqxyz", queries, d.segm_embed_64(u64))
        pan = pan.masked_fill(outside[:, None], float("-inf"))
        return occ, pan, u64


def find_decoder_prefix(state: Mapping[str, torch.Tensor]) -> str:
    """The key prefix of the :class:`FrustumDecoder` inside a checkpoint state (e.g. ``"completion."``)."""
    prefixes = sorted(k[: -len(_MARKER)] for k in state if k.endswith(_MARKER) and "query_proj" not in k)
    prefixes = [p for p in prefixes if f"{p}query_proj_64.weight" in state]
    if not prefixes:
        raise WrongStageCheckpointError("the checkpoint has no 3D completion decoder (no *.occupancy_64.weight / "
                                        "*.query_proj_64.weight keys); give a 3D-stage checkpoint")
    return min(prefixes, key=len)


def decoder_kwargs_from_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """FrustumDecoder sizes read off the weight shapes (no spec needed for them)."""
    q64 = state[f"{prefix}query_proj_64.weight"]
    groups = []
    i = 0
    while f"{prefix}input_encoders.{i}.conv1.weight" in state:
        groups.append(int(state[f"{prefix}input_encoders.{i}.conv1.weight"].shape[1]))
        i += 1
    kwargs: dict[str, Any] = dict(
        input_groups=tuple(groups), query_dim=int(q64.shape[1]), unet_features=int(q64.shape[0]) // 4,
        unet_output_channels=int(state[f"{prefix}query_proj_256.weight"].shape[0]),
    )
    kwargs["fine_skip"] = f"{prefix}skip_256.linear.weight" in state
    kwargs["query_refine_layers"] = sum(1 for k in state if k.startswith(f"{prefix}query_refiner.layers.")
                                        and k.endswith(".to_q.weight"))
    semantic = state.get(f"{prefix}semantic_256.3.bias")
    kwargs["semantic_classes"] = 0 if semantic is None else int(semantic.shape[0])
    adapter = state.get(f"{prefix}adapters.0.conv1.weight")
    kwargs["use_multi_scale"] = adapter is not None
    if adapter is not None:
        kwargs["multi_scale_channels"] = int(adapter.shape[1])
    return kwargs


def decoder_from_state(state: Mapping[str, torch.Tensor], grid_side: int, truncation: float = 3.0
                       ) -> FrustumDecoder:
    """Rebuild the checkpoint's FrustumDecoder (sizes from the weights, grid from the spec), strictly loaded."""
    prefix = find_decoder_prefix(state)
    decoder = FrustumDecoder(**decoder_kwargs_from_state(state, prefix), truncation=truncation,
                             grid_dims=(grid_side,) * 3)
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    decoder.load_state_dict(own, strict=True)
    return decoder.eval()


def example_inputs_3d(decoder: FrustumDecoder, batch: int, num_queries: int, device: torch.device | str = "cpu",
                      seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of the right shapes (features ~ N(0, 1); a frustum covering about half of the grid)."""
    gen = torch.Generator().manual_seed(seed)
    f = decoder.query_proj_64.out_features // 4
    g64 = tuple(d // 4 for d in decoder.grid_dims)
    feats = torch.relu(torch.randn(batch, 2 * f, *g64, generator=gen))
    queries = torch.randn(batch, num_queries, decoder.query_proj_64.in_features, generator=gen)
    mask = torch.rand(batch, *g64, generator=gen) > 0.5
    inputs = [feats, queries, mask]
    if decoder.use_multi_scale:
        inputs.append(torch.randn(batch, 4 * f, *(d // 8 for d in decoder.grid_dims), generator=gen))
    return tuple(t.to(device) for t in inputs)
