"""State-dict key mapping between the reference checkpoints and this package.

Inside every module the parameter names are the reference names (Mask2Former for the pixel
decoder and decoder, the NVPanoptix3D toolkit for the depth-aware decoder, depth projector,
occupancy head and the token adapter), so the mapping is only about *prefixes*:

=====================================  ==========================
reference key prefix                   `MaskFormerHead` prefix
=====================================  ==========================
``backbone.dpt2pixeldecoder.``         ``adapter.``
``sem_seg_head.pixel_decoder.``        ``pixel_decoder.``
``sem_seg_head.predictor.``            ``predictor.``
``sem_seg_head.depth_projector.``      ``depth_projector.``
``sem_seg_head.occupancy_module.``     ``occupancy_module.``
=====================================  ==========================

Module-level state dicts (as stored in the goldens) load unchanged. Do not copy the reference
``_version`` hooks (they rename keys of plain dicts; pitfall C4.11): keys are mapped here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

HEAD_PREFIXES: dict[str, str] = {
    "backbone.dpt2pixeldecoder.": "adapter.",
    "sem_seg_head.pixel_decoder.": "pixel_decoder.",
    "sem_seg_head.predictor.": "predictor.",
    "sem_seg_head.depth_projector.": "depth_projector.",
    "sem_seg_head.occupancy_module.": "occupancy_module.",
}

PART_PREFIXES: dict[str, str] = {ours.rstrip("."): ref for ref, ours in HEAD_PREFIXES.items()}


def reference_key_to_ours(key: str) -> str | None:
    """Map one full-checkpoint key to its `MaskFormerHead` key, or None if not part of the head."""
    for ref, ours in HEAD_PREFIXES.items():
        if key.startswith(ref):
            return ours + key[len(ref):]
    return None


def from_reference(state_dict: Mapping[str, torch.Tensor], part: str | None = None) -> dict[str, torch.Tensor]:
    """Convert reference keys to ours.

    ``part=None``: a whole-model checkpoint -> `MaskFormerHead` keys (other keys such as the
    VGGT aggregator or ``criterion.empty_weight`` are dropped). ``part`` in
    ``{"adapter", "pixel_decoder", "predictor", "depth_projector", "occupancy_module"}``: a
    state dict of that module, with or without its checkpoint prefix.
    """
    if part is None:
        out = {}
        for k, v in state_dict.items():
            mapped = reference_key_to_ours(k)
            if mapped is not None:
                out[mapped] = v
        if not out:
            raise ValueError("from_reference: no key of the checkpoint belongs to the 2D head "
                             f"(expected prefixes {list(HEAD_PREFIXES)})")
        return out
    if part not in PART_PREFIXES:
        raise ValueError(f"unknown part {part!r}; use one of {sorted(PART_PREFIXES)}")
    prefix = PART_PREFIXES[part]
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def to_reference(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`MaskFormerHead` keys -> full-checkpoint reference keys (inverse of ``from_reference``)."""
    inverse = {ours: ref for ref, ours in HEAD_PREFIXES.items()}
    out = {}
    for k, v in state_dict.items():
        for ours, ref in inverse.items():
            if k.startswith(ours):
                out[ref + k[len(ours):]] = v
                break
        else:
            raise ValueError(f"to_reference: key {k!r} has no reference prefix")
    return out
