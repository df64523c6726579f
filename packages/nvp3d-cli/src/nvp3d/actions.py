"""The actions a spec can run: action name -> ``"module:function"`` of its implementation.

Each implementation has the signature ``fn(spec, results_dir, status) -> kpi | None``: the runner resolves the
spec, creates ``results_dir``, writes ``experiment.yaml`` and a STARTED record, then calls it; a returned
mapping becomes the KPI of the final SUCCESS record. The implementations are imported on first use only, so
``nvp3d --help`` and spec errors answer without loading torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nvp3d.config import ExperimentSpec
from nvp3d.status import StatusLogger

__all__ = ["ACTIONS", "ActionFn", "get_action"]

#: Signature of an action implementation.
ActionFn = Callable[[ExperimentSpec, Path, StatusLogger], Mapping[str, Any] | None]

ACTIONS: dict[str, str | ActionFn] = {
    "train": "nvp3d.training.fit:run",
    "evaluate": "nvp3d.evaluation.evaluate:run",
    "inference": "nvp3d.inference.run:run",
    "export": "nvp3d.export.run:run_export",
    "gen_trt_engine": "nvp3d.export.run:run_gen_trt_engine",
}


def get_action(name: str) -> ActionFn:
    """The implementation of action ``name``; ValueError naming the valid actions otherwise.

    An entry may also be a function itself (a program embedding nvp3d, or a test, can put one in its place).
    """
    try:
        target = ACTIONS[name]
    except KeyError:
        raise ValueError(f"unknown action {name!r}; valid actions: {', '.join(ACTIONS)}") from None
    if callable(target):
        return target
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)
