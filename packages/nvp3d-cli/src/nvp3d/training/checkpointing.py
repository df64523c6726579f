"""Checkpoint files: toolkit names, atomic writes, a ``<name>_latest.pth`` pointer and exact resume.

* ``model_epoch_XXX_step_XXXXX.pth`` every ``checkpoint_interval`` epochs or steps (and once at the end of
  training), written to a temporary file and renamed, so a crash never leaves a half-written checkpoint.
* ``<latest_name>_latest.pth`` is a relative symlink to the newest file (a copy where symlinks are not
  allowed); it is replaced atomically too. Each stage has its own name, so a 3D run in the 2D results
  folder does not resume the 2D run by accident (a toolkit pitfall).
* Exact resume of the data order: :class:`nvp3d.data.sampler.LoaderPosition` (a callback the trainer adds).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from nvp3d.training.nonfinite import check_weights_before_save
from nvp3d.training.retention import checkpoint_write_error, prune_checkpoints

#: The toolkit's names of each stage's pointer ``<name>_latest.pth`` (different, so that a 3D run in the 2D
#: results folder does not resume the 2D run by accident).
LATEST_NAME_2D = "panoptic_recon_3d_model"
LATEST_NAME_3D = "nvpanoptix3d_model"



def checkpoint_name(epoch: int, step: int) -> str:
    """Toolkit file name of a checkpoint: ``model_epoch_003_step_01200.pth``."""
    return f"model_epoch_{epoch:03d}_step_{step:05d}.pth"


def latest_pointer_name(latest_name: str) -> str:
    """File name of the pointer to the newest checkpoint of a stage."""
    return f"{latest_name}_latest.pth"


def update_latest_pointer(directory: Path, target_name: str, latest_name: str) -> Path:
    """Point ``<latest_name>_latest.pth`` at ``target_name`` (same folder), replacing it atomically."""
    pointer = directory / latest_pointer_name(latest_name)
    tmp = directory / f".{pointer.name}.tmp{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    try:
        os.symlink(target_name, tmp)
    except OSError:  # file systems without symlinks: fall back to a copy
        shutil.copyfile(directory / target_name, tmp)
    os.replace(tmp, pointer)
    return pointer


def latest_name(stage: str) -> str:
    """The pointer name of a stage (``"2d"`` or ``"3d"``)."""
    if stage not in ("2d", "3d"):
        raise ValueError(f"stage must be '2d' or '3d', got {stage!r}")
    return LATEST_NAME_3D if stage == "3d" else LATEST_NAME_2D


def latest_file(stage: str) -> str:
    """File name of a stage's latest pointer: ``panoptic_recon_3d_model_latest.pth`` (2D) or
    ``nvpanoptix3d_model_latest.pth`` (3D)."""
    return latest_pointer_name(latest_name(stage))


def find_latest_checkpoint(directory: str | Path, latest_name: str) -> Path | None:
    """The checkpoint the stage's latest pointer resolves to, or ``None`` when there is none."""
    pointer = Path(directory) / latest_pointer_name(latest_name)
    if not (pointer.is_symlink() or pointer.exists()):
        return None
    target = Path(os.path.realpath(pointer))
    if not target.is_file():
        raise FileNotFoundError(
            f"{pointer} points to missing file {target}: delete the pointer or set "
            "train.resume_training_checkpoint_path"
        )
    return target


class PeriodicCheckpoint(Callback):
    """Saves ``model_epoch_XXX_step_XXXXX.pth`` every ``interval`` epochs or steps, plus a final one."""

    def __init__(self, dirpath: str | Path, interval: int = 1, unit: str = "epoch", latest_name: str = "model",
                 keep: int = 0) -> None:
        if unit not in ("epoch", "step"):
            raise ValueError(f"train.checkpoint_interval_unit must be 'epoch' or 'step', got {unit!r}")
        if interval < 1:
            raise ValueError(f"train.checkpoint_interval must be >= 1, got {interval}")
        self.dirpath = Path(dirpath)
        self.interval = interval
        self.unit = unit
        self.latest_name = latest_name
        self.keep = keep  # newest step checkpoints kept (train.keep_checkpoints; 0 = all)
        self.saved: list[Path] = []
        self._last_saved_step: int | None = None

    def save(self, trainer: pl.Trainer) -> Path:
        """Write the checkpoint for the current (epoch, step) atomically and move the latest pointer."""
        check_weights_before_save(trainer)
        name = checkpoint_name(trainer.current_epoch, trainer.global_step)
        final = self.dirpath / name
        tmp = self.dirpath / f".{name}.tmp"
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier("nvp3d_checkpoint_mkdir")
        try:
            # collective: every rank builds the state, rank 0 writes; the full resumable state (optimizer, loops)
            trainer.save_checkpoint(tmp, weights_only=False)
        except OSError as exc:  # disk full: no .tmp left behind, one line with the free space
            raise checkpoint_write_error(tmp, final, exc) from exc
        if trainer.is_global_zero:
            os.replace(tmp, final)
            pointer = update_latest_pointer(self.dirpath, name, self.latest_name)
            prune_checkpoints(self.dirpath, self.keep, protected=pointer)
        trainer.strategy.barrier("nvp3d_checkpoint_saved")
        self.saved.append(final)
        self._last_saved_step = trainer.global_step
        return final

    def _is_final(self, trainer: pl.Trainer) -> bool:
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        reached_epochs = max_epochs > 0 and trainer.current_epoch + 1 >= max_epochs
        reached_steps = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        return reached_epochs or reached_steps or trainer.should_stop

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        step = trainer.global_step
        if self.unit == "step" and step > 0 and step % self.interval == 0 and step != self._last_saved_step:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        due = self.unit == "epoch" and (trainer.current_epoch + 1) % self.interval == 0
        if (due or self._is_final(trainer)) and trainer.global_step != self._last_saved_step:
            self.save(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"last_saved_step": self._last_saved_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_saved_step = state_dict.get("last_saved_step")
