"""The composed NVPanoptix3D network.

    from nvp3d.model import build_model, load_stage_weights
    model = build_model(spec)                    # spec.model.preset: "full" (toolkit) or "tiny" (CPU)
    out = model(images)                          # [B,3,H,W] or [B,S,3,H,W], RGB 0..255 at target_size
    print(load_stage_weights(model, "model_epoch_009_step_01000.pth", "2d", "train.checkpoint_2d"))
"""

from nvp3d.model.builder import build_model, head_settings
from nvp3d.model.checkpoint import (
    CheckpointFileError,
    WeightsReport,
    load_backbone_weights,
    load_stage_weights,
    read_checkpoint_state,
    strip_prefixes,
)
from nvp3d.model.image import backbone_size, padded_size, to_backbone_input
from nvp3d.model.nvpanoptix3d import NVPanoptix3D, VGGTBackbone
from nvp3d.model.presets import PRESETS, ArchPreset, get_preset

__all__ = [
    "PRESETS", "ArchPreset", "CheckpointFileError", "NVPanoptix3D", "VGGTBackbone", "WeightsReport",
    "backbone_size", "build_model", "get_preset", "head_settings", "load_backbone_weights", "load_stage_weights",
    "padded_size", "read_checkpoint_state", "strip_prefixes", "to_backbone_input",
]
