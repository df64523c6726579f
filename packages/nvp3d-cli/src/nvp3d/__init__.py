"""nvp3d: NVPanoptix3D composed from backbone_vggt, maskformer_head, frustum3d and datasets3d.

Command line: ``nvp3d <action> -e spec.yaml [dotted.key=value ...]`` (see ``nvp3d --help``).
From Python: ``nvp3d.predict(image, intrinsic=None, checkpoint=...) -> Reconstruction`` (``.to_mesh()``,
``.save(dir)``); the spec models live in :mod:`nvp3d.config`.
"""

__version__ = "0.1.0"


def predict(image, intrinsic=None, **kwargs):  # noqa: ANN001, ANN201 - documented in nvp3d.predict.predict
    """Reconstruct one image in 3D; see :func:`nvp3d.predict.predict` (imported lazily: no torch at import)."""
    from nvp3d.predict import predict as _predict

    return _predict(image, intrinsic, **kwargs)
