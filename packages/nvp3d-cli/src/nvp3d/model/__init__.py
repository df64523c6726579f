"""The networks of NVPanoptix3D and how they are built and loaded.

    from nvp3d.model import build_net2d, build_net3d, load_stage_weights
    net = build_net3d(spec, thing_ids, stuff_ids)  # spec.model.preset: "full" (toolkit) or "tiny" (CPU)
    print(load_stage_weights(net, "nvpanoptix3d_model_latest.pth", "3d", "inference.checkpoint"))

* :mod:`~nvp3d.model.net2d` -- :class:`Panoptic2DNet`: VGGT backbone + Mask2Former-style head (2D stage).
* :mod:`~nvp3d.model.net3d` -- :class:`NVPanoptix3D`: the frozen 2D network + lifting + completion decoder.
* :mod:`~nvp3d.model.plane` -- the 2D outputs resampled to the lifting plane.
* :mod:`~nvp3d.model.fusion` -- per-frame 3D panoptic fusion of the decoder's outputs.
* :mod:`~nvp3d.model.build` -- the only spec -> network path; :mod:`~nvp3d.model.checkpoint` -- weights.
"""

from nvp3d.model.build import build_net2d, build_net3d, head_settings, load_weights_3d
from nvp3d.model.checkpoint import (
    CheckpointFileError,
    WeightsReport,
    load_backbone_weights,
    load_stage_weights,
    read_checkpoint_state,
    strip_prefixes,
)
from nvp3d.model.image import backbone_size, padded_size, to_backbone_input
from nvp3d.model.net2d import Panoptic2DNet, VGGTBackbone
from nvp3d.model.net3d import NVPanoptix3D

__all__ = [
    "CheckpointFileError", "NVPanoptix3D", "Panoptic2DNet", "VGGTBackbone", "WeightsReport", "backbone_size",
    "build_net2d", "build_net3d", "head_settings", "load_backbone_weights", "load_stage_weights",
    "load_weights_3d", "padded_size", "read_checkpoint_state", "strip_prefixes", "to_backbone_input",
]
