"""backbone_vggt."""

__version__ = "0.1.0"
