"""What a resumed training run really does, said in one line each and recorded in status.json.

* The optimizer and scheduler states come back from the checkpoint, so a changed ``train.optim.lr`` (or any
  other ``train.optim`` key but ``max_steps``) had no effect while ``experiment.yaml`` showed the new value.
  :class:`ResumeNotes` stores the ``train.optim`` section in every checkpoint (``nvp3d_optim``); on resume it
  warns about each changed key and rewrites ``train.optim`` of ``experiment.yaml`` with the values in use.
* A resume with nothing left to train (the checkpoint is already at ``train.num_epochs`` or
  ``train.optim.max_steps``) ended SUCCESS with no train_loss and no new checkpoint, silently:
  :func:`report_nothing_trained` says so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from pytorch_lightning.callbacks import Callback

from nvp3d.fileio import atomic_write_text

#: train.optim keys that the spec still decides on resume (everything else comes from the checkpoint).
SPEC_DECIDES = ("max_steps",)
EXPERIMENT_FILENAME = "experiment.yaml"


class ResumeNotes(Callback):
    """Stores ``train.optim`` in checkpoints; on resume reports the keys whose spec value is not used."""

    def __init__(self, optim: dict[str, Any], results_dir: Path, say: Callable[[str], None] = print,
                 status: Any = None) -> None:
        self.optim = dict(optim)
        self.results_dir = Path(results_dir)
        self.say = say
        self.status = status
        self.start_step: int | None = None
        self.ignored: dict[str, tuple[Any, Any]] = {}

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint["nvp3d_optim"] = dict(self.optim)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get("nvp3d_optim")
        if not isinstance(stored, dict):
            return
        self.ignored = {k: (self.optim[k], stored[k]) for k in self.optim
                        if k in stored and k not in SPEC_DECIDES and stored[k] != self.optim[k]}
        if not self.ignored or not trainer.is_global_zero:
            return
        keys = ", ".join(f"train.optim.{k}={new!r} (using {old!r})" for k, (new, old) in self.ignored.items())
        message = (f"resuming keeps the optimizer and scheduler state of the checkpoint: {keys}; "
                   "to change them, train into a new results_dir from train.checkpoint_2d (2D weights) instead")
        self.say(message)
        if self.status is not None:
            self.status.running(message + ".")
        self._record_used_values()

    def _record_used_values(self) -> None:
        path = self.results_dir / EXPERIMENT_FILENAME
        if not path.is_file():
            return
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        optim = data.setdefault("train", {}).setdefault("optim", {})
        for key, (_, used) in self.ignored.items():
            optim[key] = used
        atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_step = trainer.global_step


def report_nothing_trained(trainer: pl.Trainer, ckpt: Path | None, status: Any, say: Callable[[str], None]
                           ) -> bool:
    """After ``fit``: when a resume trained no step, say why (one line, also in status.json); True if so."""
    notes = next((cb for cb in trainer.callbacks if isinstance(cb, ResumeNotes)), None)
    start = notes.start_step if notes is not None else None
    if ckpt is None or (start is not None and trainer.global_step > start):
        return False
    from nvp3d.training.step_limit import StepLimit

    limits = [cb.max_steps for cb in trainer.callbacks if isinstance(cb, StepLimit)]
    max_steps = limits[0] if limits else (trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None)
    limit = f"train.num_epochs={trainer.max_epochs}" + (f", train.optim.max_steps={max_steps}" if max_steps else "")
    message = (f"nothing to train: {ckpt} is already at epoch {trainer.current_epoch}, step {trainer.global_step} "
               f"({limit}); no new checkpoint was written; raise train.num_epochs (or train.optim.max_steps) to "
               "train further")
    say(message)
    if status is not None and trainer.is_global_zero:
        status.running(message + ".", nothing_to_train=True)
    return True


def attach_resume_notes(trainer: pl.Trainer, module: pl.LightningModule, status: Any,
                        say: Callable[[str], None]) -> ResumeNotes | None:
    """Add a :class:`ResumeNotes` for ``module.spec`` to ``trainer`` (before ``fit``); None without a spec."""
    spec = getattr(module, "spec", None)
    if spec is None:
        return None
    notes = ResumeNotes(spec.train.optim.model_dump(mode="json"), Path(trainer.default_root_dir), say, status)
    trainer.callbacks.append(notes)
    return notes
