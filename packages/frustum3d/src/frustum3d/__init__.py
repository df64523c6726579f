"""frustum3d."""

__version__ = "0.4.4"
