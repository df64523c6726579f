"""Checks that run before an action writes anything into its results folder (not even experiment.yaml).

Rerunning ``nvp3d train`` in a used folder with other model sizes resumed the old checkpoint into the new
model: exit 1 with ~150 lines of size mismatches, and experiment.yaml already overwritten with the new sizes.
:func:`preflight` compares the resume checkpoint's tensors with the model the spec builds (on the ``meta``
device: shapes only, no memory, no weights) and stops with one line and exit code 2 before anything is written.

Only spec errors (:class:`~nvp3d.errors.SpecError`) leave here; anything else the check trips over is left for
the action itself to report, with its status.json record.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from nvp3d.errors import SpecError

log = logging.getLogger("nvp3d")

FIX = "use a new results_dir or the original sizes"


def first_shape_mismatch(state: dict[str, Any], own: dict[str, torch.Tensor]) -> tuple[str, tuple, tuple, int] | None:
    """(name, checkpoint shape, model shape, number of mismatches) of the first differing model tensor."""
    found = []
    for key, value in state.items():
        if not key.startswith("model.") or not torch.is_tensor(value):
            continue
        name = key[len("model."):]
        if name in own and tuple(own[name].shape) != tuple(value.shape):
            found.append((name, tuple(value.shape), tuple(own[name].shape)))
    if not found:
        return None
    return (*found[0], len(found))


def check_resume_shapes(spec: Any, results_dir: Path) -> None:
    """SpecError when the 2D checkpoint a train run would resume from does not fit the spec's model."""
    from nvp3d.model.build import build_net2d
    from nvp3d.model.safe_load import CheckpointReadError, load_checkpoint_file
    from nvp3d.training.fit import resume_checkpoint

    if spec.dataset.enable_3d:
        return
    ckpt = resume_checkpoint(spec, results_dir, "2d")
    if ckpt is None:
        return
    state = load_checkpoint_file(ckpt).get("state_dict", {})
    with torch.device("meta"):
        own = build_net2d(spec).state_dict()
    bad = first_shape_mismatch(state, own)
    if bad is not None:
        name, theirs, ours, _ = bad
        more = f" ({bad[3]} tensors differ)" if bad[3] > 1 else ""
        raise CheckpointReadError(f"cannot resume from {ckpt}: tensor {name!r} has shape {theirs} there but "
                                  f"{ours} in the model of this spec{more}: {FIX}")


def preflight(action: str, spec: Any, results_dir: Path) -> None:
    """Run the checks of ``action``; raises only SpecError (exit 2)."""
    if action != "train":
        return
    try:
        check_resume_shapes(spec, results_dir)
    except SpecError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported by the action itself, with a status record
        log.debug("preflight of %s skipped: %s", action, exc)
