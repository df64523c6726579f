"""Synthetic scene generator writing the processed 3D-FRONT format (see :mod:`datasets3d.synth.generate`).

CLI: ``python -m datasets3d.synth --out DIR --scenes N --frames-per-scene K [--grid 256 --image 320x240
--seed S]`` (the same flags as ``nvp3d dataset synth``).
"""

from .cli import build_parser, main
from .generate import CameraSetup, generate, make_camera_setup

__all__ = ["CameraSetup", "build_parser", "generate", "main", "make_camera_setup"]
