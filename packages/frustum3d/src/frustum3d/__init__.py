"""frustum3d."""

__version__ = "0.2.0"
