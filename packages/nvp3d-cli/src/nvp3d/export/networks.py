"""Build the exportable modules from a spec and a checkpoint, with strict, one-line-error weight loading."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nvp3d.errors import WrongStageCheckpointError
from nvp3d.export.checkpoint_stage import CheckpointContents
from nvp3d.export.model3d import DenseCompletion64, decoder_from_state
from nvp3d.model.build import build_net2d
from nvp3d.model.checkpoint import is_3d_key
from nvp3d.model.plane import ProjectionBlock


def load_2d_weights(model: nn.Module, ckpt: CheckpointContents, key: str = "export.checkpoint") -> int:
    """Copy every 2D tensor of the model from ``ckpt``; any missing or mis-shaped tensor is an error.

    (Exporting a model with some random weights would produce a graph that silently predicts garbage.)
    """
    own = model.state_dict()
    theirs = {k: v for k, v in ckpt.state.items() if not is_3d_key(k)}
    missing = sorted(k for k in own if k not in theirs)
    if missing:
        raise WrongStageCheckpointError(
            f"{key}={ckpt.path} lacks {len(missing)} tensors of the 2D model (first: {missing[0]}); was it written "
            f"by nvp3d train with model.preset={getattr(model, 'preset', '?')}?")
    for k in own:
        if tuple(own[k].shape) != tuple(theirs[k].shape):
            raise WrongStageCheckpointError(
                f"{key}={ckpt.path}: tensor {k} has shape {tuple(theirs[k].shape)} but model.preset="
                f"{getattr(model, 'preset', '?')} needs {tuple(own[k].shape)}; set model.preset (and the model "
                "section) to what the checkpoint was trained with")
    model.load_state_dict({k: theirs[k] for k in own}, strict=True)
    return len(own)


def build_2d_model(spec: Any, ckpt: CheckpointContents, key: str = "export.checkpoint") -> nn.Module:
    """The spec's 2D network with the checkpoint's weights, in eval mode on the CPU."""
    model = build_net2d(spec)
    load_2d_weights(model, ckpt, key)
    return model.eval()


def build_3d_dense(spec: Any, ckpt: CheckpointContents) -> DenseCompletion64:
    """The dense 64^3 part of the checkpoint's completion decoder (sizes from the weights, grid from the spec)."""
    f3 = spec.model.frustum3d
    decoder = decoder_from_state(ckpt.state, grid_side=f3.grid_dimensions, truncation=f3.truncation)
    return DenseCompletion64(decoder).eval()


def build_projector(ckpt: CheckpointContents) -> nn.Module | None:
    """The 3D stage's depth-feature ``projector`` of a 3D checkpoint (None when it has no ``projector.*``)."""
    state = {k[len("projector."):]: v for k, v in ckpt.state.items() if k.startswith("projector.")}
    if not state:
        return None
    out_channels, in_channels = (int(d) for d in state["conv.weight"].shape[:2])
    projector = ProjectionBlock(in_channels, out_channels)
    projector.load_state_dict(state, strict=True)
    return projector.eval()


def pick_device(on_cpu: bool, gpu_id: int) -> torch.device:
    """``cuda:<gpu_id>`` unless ``on_cpu`` or no CUDA device is visible."""
    if not on_cpu and torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")
