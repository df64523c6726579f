"""nvp3d: NVPanoptix3D composed from backbone_vggt, maskformer_head, frustum3d and datasets3d.

Command line: ``nvp3d <action> -e spec.yaml [dotted.key=value ...]`` (see ``nvp3d --help``).
From Python: ``nvp3d.predict(image, intrinsic=None, checkpoint=...) -> Reconstruction`` (``.to_mesh()``,
``.save(dir)``; :mod:`nvp3d.inference`); the spec models live in :mod:`nvp3d.config`, the networks in
:mod:`nvp3d.model`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.3.37"

__all__ = ["predict"]


def __getattr__(name: str) -> Any:
    """``nvp3d.predict`` loads torch and the network code on first use only (the CLI starts without them)."""
    if name == "predict":
        from nvp3d.inference.predictor import predict  # noqa: PLC0415

        return predict
    raise AttributeError(f"module 'nvp3d' has no attribute {name!r}")
