"""The one table of size presets (``model.preset``): what each preset changes and the facts without a key.

``full`` is the toolkit architecture (VGGT-1B, 2048-d tokens, res 256/512/1024/2048, 100 queries, 9 decoder
layers, backbone input width 448). ``small`` is a one-GPU network that trains from scratch in minutes: a
ViT-S-sized aggregator (``vggt_small``: 12 alternating layers of width 384) at 224 px backbone width
(16 patches across) and a half-width head. ``tiny`` keeps every part and the data flow but shrinks widths and
depths so that CPU tests and the demo train in minutes.

A preset changes *defaults* only: :class:`~nvp3d.config.model_spec.ModelSpec` fills a preset's
``spec_defaults`` into every key the spec does not set (pydantic's ``model_fields_set``), so the validated
spec, and the ``experiment.yaml`` written from it, holds the effective sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["FULL_DEPTH_FEATURE_DIM", "FULL_DPT_WIDTH", "PRESETS", "ArchPreset", "dpt_width", "get_preset",
           "preset_keys", "projected_feature_dim"]

#: The toolkit's width of the projected depth features (``model.projection.depth_feature_dim``).
FULL_DEPTH_FEATURE_DIM = 256

#: Width of the full VGGT's DPT depth head, which ``model.sem_seg_head.depth_dim`` must match.
FULL_DPT_WIDTH = 256


@dataclass(frozen=True)
class ArchPreset:
    """One preset: architecture facts that have no spec key, and the spec defaults it changes.

    ``spec_defaults`` maps a ``model`` sub-section (``sem_seg_head``, ``mask_former``) to key -> value.
    """

    backbone_preset: str
    backbone_width: int  # the image is resized to this width (height: multiple of the patch size)
    res_channels: tuple[int, int, int, int]
    transformer_nheads: int  # heads of the pixel-decoder encoder
    occupancy_fusion_channels: int
    occupancy_bins: int = 100
    spec_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)


PRESETS: dict[str, ArchPreset] = {
    "full": ArchPreset("vggt_1b", 448, (256, 512, 1024, 2048), 8, 64),
    "small": ArchPreset(
        "vggt_small", 224, (64, 128, 256, 384), 8, 32,
        spec_defaults={
            "sem_seg_head": {"convs_dim": 128, "mask_dim": 128, "depth_dim": 64, "transformer_enc_layers": 3},
            "mask_former": {
                "num_object_queries": 50, "dec_layers": 7, "hidden_dim": 128, "nheads": 8, "dim_feedforward": 512,
                "transformer_dim_feedforward": 512, "train_num_points": 4096,
            },
        },
    ),
    "tiny": ArchPreset(
        "vggt_tiny", 112, (32, 32, 48, 64), 4, 16,
        spec_defaults={
            "sem_seg_head": {"convs_dim": 32, "mask_dim": 32, "depth_dim": 32, "transformer_enc_layers": 1},
            "mask_former": {
                "num_object_queries": 16, "dec_layers": 4, "hidden_dim": 32, "nheads": 4, "dim_feedforward": 64,
                "transformer_dim_feedforward": 64, "train_num_points": 1024,
            },
        },
    ),
}


def get_preset(name: str) -> ArchPreset:
    """The preset called ``name`` (``full``, ``small`` or ``tiny``)."""
    if name not in PRESETS:
        raise ValueError(f"model.preset={name!r} is unknown; use one of {sorted(PRESETS)}")
    return PRESETS[name]


def dpt_width(name: str) -> int:
    """Width of preset ``name``'s DPT depth head: the only valid ``model.sem_seg_head.depth_dim``."""
    return int(get_preset(name).spec_defaults.get("sem_seg_head", {}).get("depth_dim", FULL_DPT_WIDTH))


def preset_keys() -> dict[str, dict[str, Any]]:
    """``"section.key"`` -> {preset name: value} for every key some preset changes (``None`` = the field's
    own default). The templates write these keys commented out so that ``model.preset`` can apply."""
    keys: dict[str, dict[str, Any]] = {}
    for preset in PRESETS.values():
        for section, defaults in preset.spec_defaults.items():
            for key in defaults:
                keys.setdefault(f"{section}.{key}", {})
    for dotted in keys:
        section, key = dotted.split(".")
        for name, preset in PRESETS.items():
            keys[dotted][name] = preset.spec_defaults.get(section, {}).get(key)
    return keys


def projected_feature_dim(model_spec: Any) -> int:
    """Channels of the 3D stage's projected depth features.

    ``model.projection.depth_feature_dim`` (toolkit 256), except that with the ``tiny`` and ``small`` presets a
    value left at that full-size default means the head's narrower ``mask_dim``: a rule that survives the experiment.yaml round
    trip, where every key is explicit, so tiny runs written before stay loadable.
    """
    dim = int(model_spec.projection.depth_feature_dim)
    if model_spec.preset in ("tiny", "small") and dim == FULL_DEPTH_FEATURE_DIM:
        return int(model_spec.sem_seg_head.mask_dim)
    return dim
