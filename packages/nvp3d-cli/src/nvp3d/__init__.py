"""nvp3d: NVPanoptix3D composed from backbone_vggt, maskformer_head, frustum3d and datasets3d.

Command line: ``nvp3d <action> -e spec.yaml [dotted.key=value ...]`` (see ``nvp3d --help``).
From Python: ``nvp3d.predict(image, intrinsic=None, checkpoint=...) -> Reconstruction`` (``.to_mesh()``,
``.save(dir)``); the spec models live in :mod:`nvp3d.config`.
"""

__version__ = "0.1.0"

# Bound after the submodule import on purpose: ``nvp3d.predict`` is the function (the module stays importable as
# ``nvp3d.predict`` through sys.modules for ``from nvp3d.predict import Predictor``). torch loads only when called.
from nvp3d.predict import predict  # noqa: E402

__all__ = ["predict"]
