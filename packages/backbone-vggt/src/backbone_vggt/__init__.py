"""backbone_vggt: VGGT aggregator, DPT and camera heads that load the official checkpoint key-for-key.

Quick start::

    import torch
    from backbone_vggt import build_vggt, load_pretrained

    model = build_vggt("vggt_1b").eval()
    print(load_pretrained(model, "model.pt"))        # official VGGT-1B weights; track_head keys are skipped
    with torch.no_grad():
        out = model(torch.rand(1, 1, 3, 364, 448))   # depth [1,1,364,448,1], pose_enc [1,1,9], ...
"""

from .aggregator import Aggregator
from .camera_head import CameraHead, activate_pose
from .checkpoint import CheckpointNotFoundError, LoadReport, load_pretrained, read_state_dict
from .dinov2 import DinoVisionTransformer, PatchEmbed, build_dinov2
from .dpt_head import DPTHead, FeatureFusionBlock, ResidualConvUnit, activate_head
from .errors import BackboneInputError, CheckpointError, ConfigError
from .graphs import GraphedAggregator, StaticGraph
from .layers import (
    Attention,
    Block,
    LayerScale,
    Linear,
    Mlp,
    cache_low_precision_weights,
    set_attention_backend,
    xformers_available,
)
from .presets import PRESETS, build_aggregator, build_vggt
from .rope import RotaryPositionEmbedding2D, patch_positions
from .vggt import VGGT

__version__ = "0.2.3"

__all__ = [
    "activate_head", "activate_pose", "Aggregator", "Attention", "BackboneInputError", "Block",
    "build_aggregator", "build_dinov2", "build_vggt", "cache_low_precision_weights", "CameraHead",
    "CheckpointError", "CheckpointNotFoundError", "ConfigError", "DinoVisionTransformer", "DPTHead",
    "FeatureFusionBlock", "GraphedAggregator", "StaticGraph", "LayerScale", "Linear", "load_pretrained", "LoadReport",
    "Mlp", "patch_positions", "PatchEmbed", "PRESETS", "read_state_dict", "ResidualConvUnit",
    "RotaryPositionEmbedding2D", "set_attention_backend", "VGGT", "xformers_available",
]
