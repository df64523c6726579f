"""Shared building blocks of the spec models: the strict base class and reusable field types.

Why a strict base: a typo in a YAML key (``num_epoch`` for ``num_epochs``) must be an error, not a
silently ignored key that leaves a default in force. ``extra="forbid"`` makes pydantic report it; the
loader (``nvp3d.config.loading``) turns that report into one line with the closest valid key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Base of every spec section: unknown keys are errors, an empty YAML section means defaults."""

    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),  # allow field names such as ``model_name``
        validate_assignment=True,
        use_attribute_docstrings=False,
    )

    @model_validator(mode="before")
    @classmethod
    def _empty_section_is_defaults(cls, data: Any) -> Any:
        """A YAML section written as ``train:`` with nothing under it parses to None: use defaults."""
        return {} if data is None else data


def case_insensitive(choices: Iterable[str]) -> Callable[[Any], Any]:
    """Return a before-validator mapping any capitalisation of ``choices`` onto the canonical spelling.

    The toolkit matches e.g. ``lr_scheduler`` case-insensitively; we accept the same inputs but store
    the canonical name so that ``experiment.yaml`` is normalised.
    """
    canonical = {c.lower(): c for c in choices}

    def _normalise(value: Any) -> Any:
        if isinstance(value, str):
            return canonical.get(value.strip().lower(), value)
        return value

    return _normalise


def ci_enum(*choices: str) -> Any:
    """A ``Literal`` of ``choices`` that also accepts other capitalisations (normalised)."""
    from typing import Literal

    return Annotated[Literal[choices], BeforeValidator(case_insensitive(choices))]  # type: ignore[valid-type]


# Reusable list shapes (lists, not tuples, so that YAML round-trips them unchanged).
PositiveIntPair = Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2, max_length=2)]
NonNegFloatPair = Annotated[list[Annotated[float, Field(ge=0.0)]], Field(min_length=2, max_length=2)]
GpuIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
