"""Error types raised for bad user input (all are ``ValueError`` subclasses)."""

from __future__ import annotations


class BackboneInputError(ValueError):
    """Images of the wrong rank, channel count or size (H, W must be multiples of the patch size)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model's state_dict layout."""


class ConfigError(ValueError):
    """An unknown preset, patch-embed name, activation or attention backend."""
