"""Checks on the checkpoint a training run resumes from, before Lightning (or anything else) uses it.

:func:`verify_resume_checkpoint` reads the file with the weights-only loader (so Lightning's own
``trainer.fit(ckpt_path=...)`` never meets a file that needs more than tensors and plain data; it is also
told ``weights_only=True``), turns empty, truncated or foreign files into one-line errors, and refuses a
checkpoint of the other stage (a 3D-stage file given to the 2D stage printed kilobytes of key names).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from nvp3d.model.safe_load import CheckpointReadError, checkpoint_stage, load_checkpoint_file

STAGE_HINT = {
    "2d": "the 2D stage (dataset.enable_3d: false) resumes only 2D checkpoints: set dataset.enable_3d=true to "
          "resume the 3D stage, or use it as train.checkpoint_2d of a 3D run",
    "3d": "the 3D stage (dataset.enable_3d: true) resumes only 3D checkpoints: give the 2D checkpoint as "
          "train.checkpoint_2d instead",
}


def verify_resume_checkpoint(path: Path, key: str, stage: str) -> Path:
    """Return ``path`` once it is a readable, safe checkpoint of ``stage`` (``"2d"``/``"3d"``) with a state dict."""
    data: Any = load_checkpoint_file(path, key)
    if not isinstance(data, dict) or not isinstance(data.get("state_dict"), dict):
        raise CheckpointReadError(f"{key}={path} is not a training checkpoint (no state_dict): point it at a "
                                  "model_epoch_*.pth written by nvp3d train")
    found = checkpoint_stage(data)
    if found is not None and found != stage:
        raise CheckpointReadError(f"{key}={path} is a {found.upper()}-stage checkpoint; {STAGE_HINT[stage]}")
    bad = first_nonfinite(data["state_dict"])
    if bad is not None:  # e.g. written by an older nvp3d after training diverged: every rerun resumed into it
        raise CheckpointReadError(f"{key}={path} holds non-finite weights (first: {bad}): resume from an earlier "
                                  "model_epoch_*.pth with train.resume_training_checkpoint_path, or train into a new "
                                  "results_dir with a lower train.optim.lr")
    return path


def first_nonfinite(state: dict[str, Any]) -> str | None:
    """Name of the first floating-point tensor of ``state`` holding NaN or inf, else None."""
    for name, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                       r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")


def explain_load_error(exc: BaseException, ckpt: Path | None) -> CheckpointReadError | None:
    """One line for Lightning's strict-load failure on resume (shape mismatches: other model sizes), else None."""
    text = str(exc)
    if ckpt is None or "Error(s) in loading state_dict" not in text:
        return None
    found = _MISMATCH.findall(text)
    if found:
        name, theirs, ours = found[0]
        more = f" ({len(found)} tensors differ)" if len(found) > 1 else ""
        return CheckpointReadError(f"cannot resume from {ckpt}: tensor {name!r} has shape {theirs} there but {ours} in "
                                   f"the model of this spec{more}: use a new results_dir or the original sizes")
    first = next((line.strip() for line in text.splitlines()[1:] if line.strip()), "keys differ")
    return CheckpointReadError(f"cannot resume from {ckpt}: it does not fit the model of this spec ({first[:200]}): "
                               "use a new results_dir or the original model settings")
