"""Reading, overriding, validating and writing experiment specs.

``load_spec(path, overrides)`` is the one entry point the CLI uses: YAML file first, then
``dotted.key=value`` overrides (values parsed as YAML scalars or lists), then pydantic validation.
Every failure becomes a :class:`~nvp3d.errors.SpecError` whose message is one line naming the file
or override and the dotted key, with the closest valid key for typos.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from nvp3d.config.experiment import ExperimentSpec
from nvp3d.errors import OverrideError, SpecError, SpecFileNotFoundError
from nvp3d.fileio import atomic_write_text

_KEY_PART = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DEFAULT_RESULTS_ROOT = "results"


# ----------------------------------------------------------------------------------------------- YAML


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML loader that rejects duplicate keys (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key '{key}' (first at line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def read_spec_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a YAML spec file into a plain dict (empty file = all defaults).

    Raises SpecFileNotFoundError when the file is missing and SpecError for unreadable text,
    YAML syntax errors, duplicate keys, or a top level that is not a mapping.
    """
    spec_path = Path(path).expanduser()
    if not spec_path.exists():
        raise SpecFileNotFoundError(f"spec file not found: {spec_path} (pass an existing YAML file with -e/--spec)")
    if not spec_path.is_file():
        raise SpecFileNotFoundError(f"spec path is not a file: {spec_path} (pass a YAML file with -e/--spec)")
    try:
        text = spec_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{spec_path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise SpecError(f"{spec_path}: cannot read spec file ({exc.strerror or exc})") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{spec_path}:{mark.line + 1}:{mark.column + 1}" if mark else str(spec_path)
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        raise SpecError(f"{where}: YAML syntax error: {problem}") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"{spec_path}: YAML syntax error: {' '.join(str(exc).split())}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(
            f"{spec_path}: the top level must be a mapping of keys and sections (results_dir, dataset, "
            f"model, train, ...), got a {type(data).__name__}"
        )
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise SpecError(f"{spec_path}: top-level key {bad[0]!r} is not a name")
    return data


# ------------------------------------------------------------------------------------------ overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``dotted.key=value`` into key parts and a YAML-parsed value.

    ``train.optim.milestones=[10,20]`` gives (["train", "optim", "milestones"], [10, 20]);
    an empty value (``key=``) is the empty string; ``key=null`` is None.
    """
    if "=" not in text:
        raise OverrideError(f"malformed override '{text}': expected dotted.key=value, e.g. train.num_epochs=3")
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or not all(_KEY_PART.match(p) for p in parts):
        raise OverrideError(
            f"malformed override '{text}': '{key}' is not a dotted key (letters, digits, _ joined by dots)"
        )
    if raw.strip() == "":
        return parts, ""
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise OverrideError(f"malformed override '{text}': value is not valid YAML ({' '.join(problem.split())})") from exc
    return parts, value


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` override applied in order.

    Missing intermediate sections are created (unknown ones are reported later by validation with a
    suggestion); a mapping value is merged into an existing section instead of replacing it.
    """
    result = _deep_merge({}, data)
    for text in overrides:
        parts, value = parse_override(text)
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, Mapping):
                section = ".".join(parts[: depth + 1])
                raise OverrideError(
                    f"override '{text}': '{section}' is a value ({child!r}), not a section, so it has no key "
                    f"'{parts[depth + 1]}'"
                )
            node[part] = child = dict(child)
            node = child
        leaf = parts[-1]
        if isinstance(value, Mapping) and isinstance(node.get(leaf), Mapping):
            node[leaf] = _deep_merge(dict(node[leaf]), value)
        else:
            node[leaf] = value
    return result


# ------------------------------------------------------------------------------------------ validation


def _section_class(root: type[BaseModel], parts: Sequence[str | int]) -> type[BaseModel] | None:
    """The model class at dotted path ``parts`` below ``root``, or None when the path is not a section."""
    current: type[BaseModel] = root
    for part in parts:
        if not isinstance(part, str) or part not in current.model_fields:
            return None
        annotation = current.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        current = annotation
    return current


def iter_spec_keys(model: type[BaseModel] = ExperimentSpec, prefix: str = "") -> Iterator[tuple[str, bool]]:
    """Yield ``(dotted_key, is_section)`` for every key of the spec, depth first."""
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield dotted, True
            yield from iter_spec_keys(annotation, dotted + ".")
        else:
            yield dotted, False


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def suggest_key(loc: Sequence[str | int], root: type[BaseModel] = ExperimentSpec) -> str | None:
    """Closest valid dotted key for an unknown key at ``loc``.

    Order: the same key name in a sub-section (``dataset.batch_size`` -> ``dataset.train.batch_size``),
    a typo of a key of the same section, the same key name anywhere, a typo of any dotted key.
    """
    parent, unknown = list(loc[:-1]), str(loc[-1])
    all_keys = [key for key, _ in iter_spec_keys(root)]
    below = _dotted(parent) + "." if parent else ""
    same_leaf = [key for key in all_keys if key.rsplit(".", 1)[-1] == unknown]
    nested = [key for key in same_leaf if key.startswith(below)]
    if nested:
        return nested[0]
    section = _section_class(root, parent)
    if section is not None:
        close = difflib.get_close_matches(unknown, list(section.model_fields), n=1, cutoff=0.6)
        if close:
            return _dotted([*parent, close[0]])
    if same_leaf:
        return same_leaf[0]
    close = difflib.get_close_matches(_dotted(loc), all_keys, n=1, cutoff=0.75)
    return close[0] if close else None


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_error(error: Mapping[str, Any], root: type[BaseModel] = ExperimentSpec) -> str:
    """One readable clause for one pydantic error dict, naming the dotted key."""
    loc = tuple(error.get("loc", ()))
    key = _dotted(loc) or "<top level>"
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        hint = suggest_key(loc, root)
        section = _section_class(root, list(loc[:-1]))
        if hint:
            return f"unknown key '{key}' (did you mean '{hint}'?)"
        valid = ", ".join(section.model_fields) if section is not None else ""
        return f"unknown key '{key}'" + (f" (valid keys here: {valid})" if valid else "")
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key}: expected a section (mapping of keys), got {_short_repr(error.get('input'))}"
    message = str(error.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind.startswith("value_error") or kind.startswith("assertion_error"):
        return f"{key}: {message}"
    return f"{key}: {message} (got {_short_repr(error.get('input'))})"


def _origin(loc: Sequence[str | int], override_keys: Mapping[str, str], source: str | None) -> str:
    dotted = _dotted(loc)
    for key, text in override_keys.items():
        if dotted == key or dotted.startswith(key + ".") or dotted.startswith(key + "[") or key.startswith(
            dotted + "."
        ):
            return f"override '{text}'"
    return source or "spec"


def validate_spec(
    data: Mapping[str, Any],
    source: str | None = None,
    override_keys: Mapping[str, str] | None = None,
) -> ExperimentSpec:
    """Validate a plain dict into an :class:`ExperimentSpec`, raising a one-line SpecError.

    ``source`` names the file for messages; ``override_keys`` maps dotted keys set on the command line to
    the override text, so an error in an override names the override rather than the file.
    """
    try:
        return ExperimentSpec.model_validate(dict(data))
    except ValidationError as exc:
        # Unknown keys first: a typo is the likeliest cause of the other errors too.
        errors = sorted(exc.errors(include_url=False), key=lambda e: e.get("type") != "extra_forbidden")
        clauses = [describe_error(err) for err in errors]
        first = errors[0]
        where = _origin(tuple(first.get("loc", ())), override_keys or {}, source)
        line = f"invalid spec ({where}): {clauses[0]}"
        if len(clauses) > 1:
            line += f" [+{len(clauses) - 1} more error(s); --verbose lists them]"
        err = SpecError(line)
        err.details = clauses  # type: ignore[attr-defined]
        raise err from None


def _check_override_path(text: str, parts: Sequence[str]) -> None:
    """Reject ``dataset.name.x=1``: a known value key cannot have sub-keys."""
    section: type[BaseModel] = ExperimentSpec
    for depth, part in enumerate(parts[:-1]):
        child = _section_class(section, [part])
        if child is None:
            if part in section.model_fields:
                raise OverrideError(
                    f"override '{text}': '{'.'.join(parts[: depth + 1])}' is a value, not a section, so it has "
                    f"no key '{parts[depth + 1]}'"
                )
            return  # unknown key: validation reports it with a suggestion
        section = child


def load_spec(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> ExperimentSpec:
    """Load the YAML spec at ``path`` (None = all defaults), apply ``dotted.key=value`` overrides, validate.

    Raises SpecFileNotFoundError / SpecError / OverrideError (all ValueError) with one-line messages.
    """
    data = read_spec_file(path) if path is not None else {}
    override_keys = {}
    for text in overrides:
        parts, _ = parse_override(text)
        _check_override_path(text, parts)
        override_keys[".".join(parts)] = text
    merged = apply_overrides(data, overrides)
    return validate_spec(merged, source=str(path) if path is not None else None, override_keys=override_keys)


# ------------------------------------------------------------------------------------------- outputs


def spec_to_dict(spec: ExperimentSpec) -> dict[str, Any]:
    """The spec as plain JSON/YAML-compatible data, every key present (defaults included)."""
    return spec.model_dump(mode="json")


def dump_spec(spec: ExperimentSpec, path: str | os.PathLike[str] | None = None) -> str:
    """YAML text of the fully resolved spec; also written atomically to ``path`` when given."""
    text = yaml.safe_dump(spec_to_dict(spec), sort_keys=False, default_flow_style=None, width=100)
    if path is not None:
        atomic_write_text(path, text)
    return text


def resolve_results_dir(spec: ExperimentSpec, action: str) -> Path:
    """Output folder of ``action``: ``spec.<action>.results_dir`` when set, else ``<results_dir>/<action>``.

    An empty top-level ``results_dir`` (the toolkit default) means ``./results``.
    """
    if not _KEY_PART.match(action):
        raise ValueError(f"not an action name: {action!r}")
    section = getattr(spec, action, None)
    own = getattr(section, "results_dir", None) if isinstance(section, BaseModel) else None
    if own:
        return Path(own).expanduser()
    return Path(spec.results_dir or _DEFAULT_RESULTS_ROOT).expanduser() / action
