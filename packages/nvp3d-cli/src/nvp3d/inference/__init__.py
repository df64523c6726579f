"""Inference: images -> 2D overlays, depth, 3D panoptic volumes and coloured meshes.

* :mod:`~nvp3d.inference.predictor` -- :class:`Predictor` (a loaded network) and :func:`predict` (one image).
* :mod:`~nvp3d.inference.reconstruction` -- :class:`Reconstruction`, the arrays of one prediction (no I/O).
* :mod:`~nvp3d.inference.inputs` -- images, intrinsics, the images of a folder.
* :mod:`~nvp3d.inference.mesh`, :mod:`~nvp3d.inference.writers` -- marching cubes; PLY/NPZ/PNG files.
* :mod:`~nvp3d.inference.run` -- the ``nvp3d inference`` action (a folder of images -> files + index.json).
"""

from nvp3d.inference.predictor import Predictor, predict
from nvp3d.inference.reconstruction import Reconstruction

__all__ = ["Predictor", "Reconstruction", "predict"]
