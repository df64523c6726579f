"""Which stage a checkpoint belongs to, told by its keys, and the matching one-line errors.

* a **2D** checkpoint (``dataset.enable_3d: false``) holds ``backbone.*`` and ``sem_seg_head.*`` tensors;
* a **3D** checkpoint additionally (or, for a bare decoder file, only) holds tensors of the 3D modules
  (:data:`nvp3d.model.checkpoint.THREE_D_MODULES`, e.g. ``completion.*``);
* an official **VGGT** file holds ``aggregator.*`` / ``depth_head.*`` without our ``backbone.`` prefix.

Prefixes ``model.`` / ``module.`` are stripped first (Lightning and DDP wrappers).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from nvp3d.errors import ExportFileNotFoundError, ExportInputError, WrongStageCheckpointError
from nvp3d.model.checkpoint import is_3d_key, read_checkpoint_state
from nvp3d.model.safe_load import CheckpointReadError

TWO_D_PREFIXES = ("backbone.", "sem_seg_head.")
VGGT_PREFIXES = ("aggregator.", "depth_head.", "camera_head.", "point_head.", "track_head.")


@dataclass
class CheckpointContents:
    """The tensors of a checkpoint split by stage."""

    path: Path
    state: dict[str, torch.Tensor]
    keys_2d: list[str]
    keys_3d: list[str]
    keys_vggt: list[str]

    @property
    def stage(self) -> str:
        """``"3d"`` when any 3D-module key is present, ``"2d"`` for 2D keys only, else ``"unknown"``."""
        if self.keys_3d:
            return "3d"
        return "2d" if self.keys_2d else "unknown"

    def top_level(self, keys: list[str], n: int = 3) -> str:
        """The first ``n`` distinct top-level module names of ``keys`` (for messages)."""
        names = sorted({k.split(".", 1)[0] for k in keys})
        return ", ".join(f"{name}.*" for name in names[:n])


def read_checkpoint(path: str, key: str = "export.checkpoint") -> CheckpointContents:
    """Load ``path`` on the CPU and classify its keys; one-line errors for an empty, missing or foreign file."""
    if not path:
        raise ExportInputError(f"{key} is empty; set {key}=path/to/model_epoch_XXX_step_XXXXX.pth (a trained nvp3d "
                               "checkpoint)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ExportFileNotFoundError(f"{key}={path} does not exist; fix the path (checkpoints are written "
                                            "to the train results_dir as model_epoch_XXX_step_XXXXX.pth)")
    try:
        state = read_checkpoint_state(p, key)
    except CheckpointReadError as exc:  # already one line naming the file
        raise ExportInputError(str(exc)) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise ExportInputError(f"{key}={path} is not a readable PyTorch checkpoint ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); point it at a .pth "
                               "file written by nvp3d train") from None
    except ValueError as exc:
        raise ExportInputError(f"{key}: {exc}; point it at a .pth file written by nvp3d train") from None
    keys_3d = [k for k in state if is_3d_key(k)]
    keys_2d = [k for k in state if k.startswith(TWO_D_PREFIXES)]
    keys_vggt = [k for k in state if k.startswith(VGGT_PREFIXES)]
    return CheckpointContents(p, state, keys_2d, keys_3d, keys_vggt)


def require_2d(ckpt: CheckpointContents, key: str = "export.checkpoint") -> None:
    """The 2D export needs ``backbone.*`` and ``sem_seg_head.*`` weights (a 2D or a full 3D checkpoint)."""
    heads = [k for k in ckpt.keys_2d if k.startswith("sem_seg_head.")]
    backbone = [k for k in ckpt.keys_2d if k.startswith("backbone.")]
    if heads and backbone:
        return
    if not ckpt.keys_2d and ckpt.keys_vggt:
        raise WrongStageCheckpointError(
            f"{key}={ckpt.path} holds official VGGT backbone weights ({ckpt.top_level(ckpt.keys_vggt)}), not a "
            "trained NVPanoptix3D model; pass it as model.backbone.pretrained_model_path to nvp3d train and export "
            "the resulting checkpoint")
    if ckpt.keys_3d and not ckpt.keys_2d:
        raise WrongStageCheckpointError(
            f"{key}={ckpt.path} holds only 3D-stage weights ({ckpt.top_level(ckpt.keys_3d)}) and no 2D model; "
            "the 2D export needs a 2D-stage checkpoint or a full 3D-stage checkpoint that includes the 2D model")
    missing = "sem_seg_head.*" if not heads else "backbone.*"
    raise WrongStageCheckpointError(
        f"{key}={ckpt.path} has no {missing} weights (found: {ckpt.top_level(list(ckpt.state)) or 'nothing'}); "
        "the 2D export needs a checkpoint written by nvp3d train with dataset.enable_3d: false")


def require_3d(ckpt: CheckpointContents, key: str = "export.checkpoint", why: str = "export.onnx_file_3d is set"
               ) -> None:
    """The 3D export needs 3D-stage weights; a 2D-stage checkpoint gets a message saying how to fix it."""
    if ckpt.keys_3d:
        return
    what = "a 2D-stage checkpoint" if ckpt.keys_2d else "not an NVPanoptix3D checkpoint"
    raise WrongStageCheckpointError(
        f"{key}={ckpt.path} is {what} (no 3D-stage keys such as completion.*) but {why}; give a 3D-stage "
        "checkpoint (nvp3d train with dataset.enable_3d: true) or leave export.onnx_file_3d empty and "
        "dataset.enable_3d false for a 2D-only export")
