"""Inference: images -> 2D overlays, depth, 3D panoptic volumes and coloured meshes.

* :mod:`~nvp3d.inference.predictor` -- :class:`Predictor` (a loaded network) and :func:`predict` (one image).
* :mod:`~nvp3d.inference.reconstruction` -- :class:`Reconstruction`, the arrays of one prediction (no I/O).
* :mod:`~nvp3d.inference.inputs` -- images, intrinsics, the images of a folder.
* :mod:`~nvp3d.inference.mesh`, :mod:`~nvp3d.inference.writers` -- marching cubes; PLY/NPZ/PNG files.
* :mod:`~nvp3d.inference.run` -- the ``nvp3d inference`` action (a folder of images -> files + index.json).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nvp3d.inference.predictor import Predictor, predict
    from nvp3d.inference.reconstruction import Reconstruction

__all__ = ["Predictor", "Reconstruction", "predict"]

_HOMES = {"Predictor": "nvp3d.inference.predictor", "predict": "nvp3d.inference.predictor",
          "Reconstruction": "nvp3d.inference.reconstruction"}


def __getattr__(name: str) -> Any:
    """The package's names, imported on first use: a writer process imports the writers (numpy) without the
    Predictor's torch and network modules, which would cost it seconds of start-up per process."""
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
