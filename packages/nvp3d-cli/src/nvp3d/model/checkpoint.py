"""Loading weights into the networks of :mod:`nvp3d.model`, with a report of what was loaded.

* :func:`load_backbone_weights` (``model.backbone.pretrained_model_path``): official VGGT weights, strict
  on the aggregator and the DPT depth head (the camera/point/track heads are not built and are skipped).
* :func:`load_stage_weights` (``train.checkpoint_2d`` / ``train.checkpoint_3d``): our checkpoints (a Lightning
  ``.pth`` with ``state_dict`` or a bare state dict). Prefixes ``model.`` and ``module.`` are stripped;
  stage ``2d`` ignores the keys of 3D modules, stage ``3d`` loads only those.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from backbone_vggt import load_pretrained
from torch import nn

from nvp3d.model.safe_load import load_checkpoint_file

#: top-level submodules that belong to the 3D stage (dropped when loading a 2D checkpoint)
THREE_D_MODULES = ("frustum3d", "lifting", "completion", "projector", "reprojection", "ol")

STRIP_PREFIXES = ("model.", "module.", "_orig_mod.")

#: What to do about a missing file, per key: only optional weights can honestly be skipped with ''.
MISSING_HINTS = {
    "model.backbone.pretrained_model_path": "fix the path, or set it to '' to start from random backbone weights",
    "train.checkpoint_3d": "fix the path, or set it to '' to start the 3D modules from random weights",
}
MISSING_HINT = ("fix the path: point it at a .pth written by nvp3d train (e.g. <train results_dir>/"
                "panoptic_recon_3d_model_latest.pth, or nvpanoptix3d_model_latest.pth for the 3D stage)")


class CheckpointFileError(FileNotFoundError):
    """A checkpoint path from the spec does not exist (message names the key)."""


class NoStageWeightsError(ValueError):
    """A checkpoint holds none of the asked stage's weights (e.g. a 2D-stage checkpoint loaded for the 3D stage;
    message names the key)."""


@dataclass
class WeightsReport:
    """Outcome of one weight load (printed by the train/evaluate actions)."""

    source: str
    key: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: int = 0
    mismatched: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{self.key}: loaded {self.loaded} tensors from {self.source}"]
        if self.ignored:
            parts.append(f"ignored {self.ignored} keys of the other stage")
        if self.missing:
            parts.append(f"{len(self.missing)} model keys not in the file (first: {self.missing[:3]})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} file keys not in the model (first: {self.unexpected[:3]})")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} shape mismatches (first: {self.mismatched[:3]})")
        return "; ".join(parts)


def _require(path: str, key: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise CheckpointFileError(f"{key}={path} does not exist: {MISSING_HINTS.get(key, MISSING_HINT)}")
    return p


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove leading ``model.`` / ``module.`` (repeatedly, in any order) from every key."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in STRIP_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        out[key] = value
    return out


def read_checkpoint_state(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """Model tensors of a Lightning checkpoint or a plain state dict, prefixes stripped (weights-only load;
    ``key``, the spec key of ``path``, is named in errors)."""
    data: Any = load_checkpoint_file(path, key)
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    elif isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
        data = data["model"]
    if not isinstance(data, Mapping):
        raise ValueError(f"checkpoint {path} holds no state dict (got {type(data).__name__})")
    state = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    # criterion buffers (e.g. the no-object weight) are not model weights
    state = {k: v for k, v in state.items() if not k.startswith("criterion.")}
    return strip_prefixes(state)


def is_3d_key(key: str) -> bool:
    """Whether a (prefix-stripped) key belongs to the 3D stage."""
    return key.split(".", 1)[0] in THREE_D_MODULES


def load_stage_weights(model: nn.Module, path: str, stage: str, key: str) -> WeightsReport:
    """Load the ``stage`` (``"2d"`` or ``"3d"``) part of a checkpoint into ``model`` (shape-checked)."""
    if stage not in ("2d", "3d"):
        raise ValueError(f"stage must be '2d' or '3d', got {stage!r}")
    state = read_checkpoint_state(_require(path, key), key)
    keep = {k: v for k, v in state.items() if is_3d_key(k) == (stage == "3d")}
    report = WeightsReport(source=str(path), key=key, ignored=len(state) - len(keep))
    own = model.state_dict()
    own_stage = {k for k in own if is_3d_key(k) == (stage == "3d")}
    report.missing = sorted(own_stage - set(keep))
    report.unexpected = sorted(set(keep) - set(own))
    report.mismatched = sorted(k for k in keep if k in own and own[k].shape != keep[k].shape)
    if report.mismatched:
        k = report.mismatched[0]
        raise ValueError(f"{key}={path}: tensor {k!r} has shape {tuple(keep[k].shape)} but the model needs "
                         f"{tuple(own[k].shape)}; was it trained with another model.preset?")
    if not keep:
        raise NoStageWeightsError(f"{key}={path} holds no {stage.upper()} weights")
    loadable = {k: v for k, v in keep.items() if k in own}
    model.load_state_dict(loadable, strict=False)
    report.loaded = len(loadable)
    return report


def load_backbone_weights(model: nn.Module, path: str, key: str = "model.backbone.pretrained_model_path"
                          ) -> WeightsReport:
    """Official VGGT weights into ``model.backbone`` (strict on aggregator and depth head)."""
    p = _require(path, key)
    vggt_report = load_pretrained(model.backbone, str(p), strict=True)
    report = WeightsReport(source=str(p), key=key, loaded=vggt_report.loaded,
                           ignored=sum(vggt_report.skipped.values()))
    return report
