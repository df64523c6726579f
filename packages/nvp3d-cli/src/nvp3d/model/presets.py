"""Size presets of the composed model (``model.preset`` in the spec).

``full`` is the toolkit architecture (VGGT-1B, 2048-d tokens, res 256/512/1024/2048, 100 queries, 9 decoder
layers, backbone input width 448). ``tiny`` keeps every part and the data flow but shrinks widths and depths
so that CPU tests and the demo train in minutes. A preset only changes *defaults*: any key set explicitly in
the spec (pydantic's ``model_fields_set``) wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

#: keys of the spec's ``model.sem_seg_head`` / ``model.mask_former`` sections that presets may change
TINY_SPEC_DEFAULTS: dict[str, dict[str, Any]] = {
    "sem_seg_head": {"convs_dim": 32, "mask_dim": 32, "depth_dim": 32, "transformer_enc_layers": 1},
    "mask_former": {
        "num_object_queries": 16, "dec_layers": 4, "hidden_dim": 32, "nheads": 4, "dim_feedforward": 64,
        "transformer_dim_feedforward": 64, "train_num_points": 1024,
    },
}


@dataclass(frozen=True)
class ArchPreset:
    """Architecture facts that have no spec key (backbone preset, widths of the feature pyramid)."""

    backbone_preset: str
    backbone_width: int  # the image is resized to this width (height: multiple of the patch size)
    res_channels: tuple[int, int, int, int]
    transformer_nheads: int  # heads of the pixel-decoder encoder
    occupancy_fusion_channels: int
    occupancy_bins: int = 100
    spec_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)


PRESETS: dict[str, ArchPreset] = {
    "full": ArchPreset("vggt_1b", 448, (256, 512, 1024, 2048), 8, 64),
    "tiny": ArchPreset("vggt_tiny", 112, (32, 32, 48, 64), 4, 16, spec_defaults=TINY_SPEC_DEFAULTS),
}


def get_preset(name: str) -> ArchPreset:
    """The preset called ``name`` (``full`` or ``tiny``)."""
    if name not in PRESETS:
        raise ValueError(f"model.preset={name!r} is unknown; use one of {sorted(PRESETS)}")
    return PRESETS[name]


def effective(section: BaseModel, section_name: str, preset: ArchPreset) -> dict[str, Any]:
    """Values of a spec section with the preset's defaults applied to keys the user did not set."""
    values = section.model_dump()
    for key, value in preset.spec_defaults.get(section_name, {}).items():
        if key not in section.model_fields_set:
            values[key] = value
    return values
