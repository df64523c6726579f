"""``nvp3d inference``: images in a folder -> 2D overlays, depth, 3D panoptic volumes and coloured meshes.

The action entry point is :func:`run` (registered lazily by :mod:`nvp3d.actions` as ``nvp3d.inference.run``);
:func:`nvp3d.inference.run.run_inference` does the work. File writers live in
:mod:`nvp3d.inference.writers`, mesh extraction in :mod:`nvp3d.inference.mesh`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run(spec: Any, results_dir: Path, status: Any) -> dict[str, Any]:
    """Action-registry entry point (``nvp3d inference``)."""
    from nvp3d.inference.runner import run_inference

    return run_inference(spec, results_dir, status)
