"""maskformer_head."""

__version__ = "0.1.0"
