"""Named model sizes: ``vggt_1b`` (the released architecture) and small ones for tests and CPU demos."""

from __future__ import annotations

from typing import Any

from .aggregator import Aggregator
from .errors import ConfigError
from .vggt import VGGT

PRESETS: dict[str, dict[str, Any]] = {
    # exactly the reference VGGT() / Aggregator() defaults (VGGT-1B and VGGT-1B-Commercial checkpoints)
    "vggt_1b": dict(img_size=518, patch_size=14, embed_dim=1024, aggregator_kwargs={}, dpt_kwargs={},
                    camera_kwargs={}),
    # DINOv2 ViT-S/14-reg patch embed, 12 alternating layers of width 384; ~100M parameters
    "vggt_small": dict(
        img_size=518, patch_size=14, embed_dim=384,
        aggregator_kwargs=dict(depth=12, num_heads=6, patch_embed="dinov2_vits14_reg",
                               cached_layer_indices=(2, 5, 8, 11)),
        dpt_kwargs=dict(features=64, out_channels=(48, 96, 192, 384), intermediate_layer_idx=(2, 5, 8, 11)),
        camera_kwargs=dict(trunk_depth=2, num_heads=6),
    ),
    # conv patch embed, width 128, 4 layers, 4 heads (head dim 32); a few MB, runs on CPU in milliseconds
    "vggt_tiny": dict(
        img_size=518, patch_size=14, embed_dim=128,
        aggregator_kwargs=dict(depth=4, num_heads=4, patch_embed="conv", cached_layer_indices=(0, 1, 2, 3)),
        dpt_kwargs=dict(features=32, out_channels=(16, 32, 64, 64), intermediate_layer_idx=(0, 1, 2, 3)),
        camera_kwargs=dict(trunk_depth=1, num_heads=4),
    ),
}


def _preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[name]
    return dict(p, aggregator_kwargs=dict(p["aggregator_kwargs"]), dpt_kwargs=dict(p["dpt_kwargs"]),
                camera_kwargs=dict(p["camera_kwargs"]))


def build_vggt(preset: str = "vggt_1b", **overrides: Any) -> VGGT:
    """Build a ``VGGT`` from a preset; ``overrides`` are ``VGGT`` arguments (nested dicts are merged)."""
    cfg = _preset(preset)
    for key in ("aggregator_kwargs", "dpt_kwargs", "camera_kwargs"):
        cfg[key].update(overrides.pop(key, None) or {})
    cfg.update(overrides)
    return VGGT(**cfg)


def build_aggregator(preset: str = "vggt_1b", **overrides: Any) -> Aggregator:
    """Build the ``Aggregator`` of a preset; ``overrides`` are ``Aggregator`` arguments."""
    cfg = _preset(preset)
    kwargs = dict(img_size=cfg["img_size"], patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"])
    kwargs.update(cfg["aggregator_kwargs"])
    kwargs.update(overrides)
    return Aggregator(**kwargs)
