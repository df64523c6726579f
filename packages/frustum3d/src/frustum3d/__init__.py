"""frustum3d."""

__version__ = "0.3.19"
