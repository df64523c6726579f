"""The 3D stage of NVPanoptix3D: frustum lifting + completion on top of the frozen 2D network.

* :mod:`nvp3d.stage3d.model` -- :class:`Panoptic3DModel` (2D inference to the lifting plane, lifting, decoder).
* :mod:`nvp3d.stage3d.builder` -- build it from a spec, load ``checkpoint_2d`` / ``checkpoint_3d``.
* :mod:`nvp3d.stage3d.loss` -- 3D losses with the 2D Hungarian assignment.
* :mod:`nvp3d.stage3d.fusion` -- 3D panoptic fusion per frame.
* :mod:`nvp3d.stage3d.evaluation` -- PRQ / RSQ / RRQ statistics against the dataset's evaluation segments.
* :mod:`nvp3d.stage3d.data`, :mod:`nvp3d.stage3d.module` -- data module and LightningModule.
* :mod:`nvp3d.stage3d.run` -- ``train_3d`` / ``evaluate_3d`` (the actions with ``dataset.enable_3d: true``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def train_3d(spec: Any, results_dir: str | Path, status: Any, **kwargs: Any) -> dict[str, Any]:
    """``nvp3d train`` with ``dataset.enable_3d: true`` (see :func:`nvp3d.stage3d.run.train_3d`)."""
    from nvp3d.stage3d.run import train_3d as _train

    return _train(spec, results_dir, status, **kwargs)


def evaluate_3d(spec: Any, results_dir: str | Path, status: Any, **kwargs: Any) -> dict[str, Any]:
    """``nvp3d evaluate`` with ``dataset.enable_3d: true`` (see :func:`nvp3d.stage3d.run.evaluate_3d`)."""
    from nvp3d.stage3d.run import evaluate_3d as _evaluate

    return _evaluate(spec, results_dir, status, **kwargs)


__all__ = ["evaluate_3d", "train_3d"]
