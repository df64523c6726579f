"""Registry of action implementations: ``ACTIONS[name](spec, results_dir, status) -> kpi | None``.

The CLI resolves the spec, creates ``results_dir``, writes ``experiment.yaml`` and a STARTED record, then
calls the registered function. The function may write RUNNING records (progress, KPIs) through
``status``; if it returns a mapping, that mapping becomes the KPI of the final SUCCESS record.

How an implementation plugs in (either way works):

1. create the module named in :data:`PLUGIN_MODULES` (e.g. ``nvp3d/train.py``) with a function
   ``run(spec, results_dir, status)``; the default entry imports it lazily on first use, or
2. call ``register_action("train")(my_function)`` (or use it as a decorator) to replace the entry.

Until the module exists the default entry raises :class:`~nvp3d.errors.NotBuiltYetError`, which the CLI
turns into a FAILURE record "not built yet: ..." and exit code 3.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nvp3d.config import ExperimentSpec
from nvp3d.errors import NotBuiltYetError
from nvp3d.status import StatusLogger

#: Signature of an action implementation.
ActionFn = Callable[[ExperimentSpec, Path, StatusLogger], Mapping[str, Any] | None]

#: Packages of this project: a missing module inside one of them means "not built yet", not a bug.
PROJECT_PACKAGES = ("nvp3d", "backbone_vggt", "maskformer_head", "frustum3d", "datasets3d")

#: action -> (module that implements it, function name, what the user is told is missing).
PLUGIN_MODULES: dict[str, tuple[str, str, str]] = {
    "train": ("nvp3d.run_train", "run", "training (model and Lightning module; module nvp3d.run_train)"),
    "evaluate": ("nvp3d.run_evaluate", "run", "evaluation (PQ/PRQ metrics; module nvp3d.run_evaluate)"),
    "inference": ("nvp3d.inference", "run", "inference (module nvp3d.inference)"),
    "export": ("nvp3d.export", "run", "ONNX export (module nvp3d.export)"),
    "gen_trt_engine": (
        "nvp3d.gen_trt_engine",
        "run",
        "TensorRT engine builder (module nvp3d.gen_trt_engine; needs the 'tensorrt' extra and a CUDA GPU)",
    ),
}


def _is_project_module(name: str | None) -> bool:
    return bool(name) and name.split(".")[0] in PROJECT_PACKAGES


def import_or_not_built(module: str, what: str) -> Any:
    """Import ``module``; a missing project module (it or one it needs) becomes NotBuiltYetError(what).

    Missing third-party modules and other import errors propagate unchanged: those are real bugs or
    broken installs, not unbuilt parts.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if _is_project_module(exc.name):
            detail = "" if exc.name == module else f" (missing module {exc.name})"
            raise NotBuiltYetError(what + detail) from exc
        raise


def lazy_action(action: str, module_name: str | None = None, attr: str = "run", what: str | None = None) -> ActionFn:
    """Registry entry for ``action`` that imports ``module_name`` on first call and runs its ``attr``.

    Defaults come from :data:`PLUGIN_MODULES`.
    """
    if module_name is None:
        module_name, attr, default_what = PLUGIN_MODULES[action]
        what = what or default_what
    what = what or f"{action} (module {module_name})"

    def _run(spec: ExperimentSpec, results_dir: Path, status: StatusLogger) -> Mapping[str, Any] | None:
        module = import_or_not_built(module_name, what)
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise NotBuiltYetError(f"{what}: {module_name} has no function {attr}(spec, results_dir, status)")
        return fn(spec, results_dir, status)

    _run.__name__ = f"lazy_{action}"
    _run.__doc__ = f"Run {module_name}.{attr}(spec, results_dir, status) (imported on first use)."
    return _run


ACTIONS: dict[str, ActionFn] = {name: lazy_action(name) for name in PLUGIN_MODULES}


def register_action(name: str) -> Callable[[ActionFn], ActionFn]:
    """Decorator registering ``fn`` as the implementation of action ``name`` (replaces the lazy entry)."""

    def _register(fn: ActionFn) -> ActionFn:
        ACTIONS[name] = fn
        return fn

    return _register


def get_action(name: str) -> ActionFn:
    """The registered implementation of ``name``; ValueError naming the valid actions otherwise."""
    try:
        return ACTIONS[name]
    except KeyError:
        raise ValueError(f"unknown action {name!r}; valid actions: {', '.join(ACTIONS)}") from None
