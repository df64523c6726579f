"""Generated reference files: JSON Schemas, a manifest, commented spec templates and example specs.

``nvp3d schema --out-dir <repo root>`` writes

- ``schemas/<action>.schema.json``: JSON Schema (draft 2020-12) of the spec, with min/max and enums;
  every action accepts the whole spec, ``x-nvp3d-sections`` names the sections it reads;
- ``schemas/manifest.json``: the actions, their sections, schema and template paths;
- ``references/spec_template_<action>.yaml``: every key the action reads with its default, commented;
- ``references/spec_synthetic_{2d,3d}.yaml``: specs for data made by ``nvp3d dataset synth``.

Output is deterministic so that a test can regenerate it and compare with the committed copies.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from nvp3d.automl.schema_meta import SKILL_INFO_PATH, annotate_train_schema, skill_info_yaml
from nvp3d.config import ACTION_SECTIONS, SPEC_ACTIONS, TOP_LEVEL_KEYS, ExperimentSpec
from nvp3d.config.presets import preset_keys
from nvp3d.config.sources import DATA_KEYS, GEOMETRY_KEYS
from nvp3d.demo.specs import example_spec_dict
from nvp3d.fileio import atomic_write_text

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SPEC_FORMAT_VERSION = 1

ACTION_SUMMARIES: dict[str, str] = {
    "train": "Train the 2D stage (dataset.enable_3d=false) or the 3D stage (true).",
    "evaluate": "Evaluate a checkpoint on dataset.test (2D PQ or 3D PRQ/RSQ/RRQ).",
    "inference": "Reconstruct panoptic 3D scenes from the images in inference.images_dir.",
    "export": "Export the network to ONNX (export.format=onnx) or a TensorRT engine.",
    "gen_trt_engine": "Build a TensorRT engine from an exported ONNX file (needs a CUDA GPU).",
}

#: Paths of the example specs, relative to the output root, and how they are made.
SYNTHETIC_EXAMPLES: dict[str, tuple[str, str, str]] = {
    "references/spec_synthetic_2d.yaml": ("data/synthetic", "results/synthetic_2d", "2d"),
    "references/spec_synthetic_3d.yaml": ("data/synthetic", "results/synthetic_3d", "3d"),
}


# ------------------------------------------------------------------------------------------ schemas


def action_schema(action: str) -> dict[str, Any]:
    """JSON Schema of the spec as read by ``action``."""
    if action not in ACTION_SECTIONS:
        raise ValueError(f"unknown action {action!r}; valid: {', '.join(SPEC_ACTIONS)}")
    schema = ExperimentSpec.model_json_schema(mode="validation")
    if action == "train":  # the AutoML metadata a searcher reads (nvp3d.automl.schema_meta)
        schema = annotate_train_schema(schema)
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": f"nvp3d/{action}.schema.json",
        **schema,
        "title": f"nvp3d {action} spec",
        "description": (
            f"{ACTION_SUMMARIES[action]} Every section is optional (defaults apply); unknown keys are "
            f"errors. Sections read by '{action}': {', '.join(ACTION_SECTIONS[action])}."
        ),
        "x-nvp3d-action": action,
        "x-nvp3d-sections": list(ACTION_SECTIONS[action]),
    }


def manifest() -> dict[str, Any]:
    """Index of the generated files."""
    return {
        "spec_format_version": SPEC_FORMAT_VERSION,
        "command": "nvp3d <action> -e <spec.yaml> [dotted.key=value ...]",
        "actions": [
            {
                "name": action,
                "summary": ACTION_SUMMARIES[action],
                "sections": list(ACTION_SECTIONS[action]),
                "schema": f"schemas/{action}.schema.json",
                "template": f"references/spec_template_{action}.yaml",
            }
            for action in SPEC_ACTIONS
        ],
        "commands_without_spec": ["demo", "schema", "dataset synth"],
        "examples": sorted(SYNTHETIC_EXAMPLES),
    }


# ---------------------------------------------------------------------------------------- templates


def _yaml_scalar(value: Any) -> str:
    """One-line YAML for a default value (flow style for lists)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def _choices(annotation: Any) -> list[Any] | None:
    """Allowed values of a Literal (possibly wrapped in Annotated)."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return None


def _bounds(field: FieldInfo) -> list[str]:
    symbols = (
        (annotated_types.Ge, "ge", ">="),
        (annotated_types.Gt, "gt", ">"),
        (annotated_types.Le, "le", "<="),
        (annotated_types.Lt, "lt", "<"),
    )
    out = []
    for meta in field.metadata:
        for cls, attr, sym in symbols:
            if isinstance(meta, cls):
                out.append(f"{sym} {getattr(meta, attr)}")
    return out


def _comment(field: FieldInfo) -> str:
    parts = [(field.description or "").rstrip(".")]
    choices = _choices(field.annotation)
    if choices:
        parts.append("one of: " + ", ".join(_yaml_scalar(c) for c in choices))
    parts.extend(_bounds(field))
    return "; ".join(p for p in parts if p)


#: actions whose network sizes come from their checkpoint (the template writes every model key commented out)
CHECKPOINT_ACTIONS = ("evaluate", "inference", "export")


def derived_keys(action: str) -> dict[str, str]:
    """Dotted key -> where its value comes from, for the keys the template writes commented out.

    A key written in a spec is the user's choice and wins over the preset, the dataset and the checkpoint
    (or conflicts with them), so the template must not write these: it lists them as comments instead.
    """
    out: dict[str, str] = {}
    for dotted, by_preset in preset_keys().items():
        defaults = ExperimentSpec().model
        section, key = dotted.split(".")
        own = getattr(getattr(defaults, section), key)
        values = ", ".join(f"{name} {_yaml_scalar(own if v is None else v)}" for name, v in by_preset.items())
        out[f"model.{dotted}"] = f"set by model.preset ({values})"
    out.update(DATA_KEYS)
    out["inference.mode"] = "model.mode"
    if action == "train":
        out["model.preset"] = "full, or (3D stage) the preset recorded in train.checkpoint_2d"
    if action in CHECKPOINT_ACTIONS:
        for dotted, _ in _leaf_keys(ExperimentSpec().model, "model."):
            out[dotted] = f"from the checkpoint, else {out[dotted]}" if dotted in out else "from the checkpoint"
        for key in GEOMETRY_KEYS:
            out[f"dataset.{key}"] = "from the checkpoint"
    if action == "evaluate":
        out["dataset.enable_3d"] = "the checkpoint's stage (false for a 2D-stage checkpoint)"
    return out


def _leaf_keys(model: BaseModel, prefix: str) -> list[tuple[str, Any]]:
    keys: list[tuple[str, Any]] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            keys.extend(_leaf_keys(value, f"{prefix}{name}."))
        else:
            keys.append((f"{prefix}{name}", value))
    return keys


def _template_lines(model: BaseModel, indent: int, prefix: str = "", derived: dict[str, str] | None = None
                    ) -> list[str]:
    pad = "  " * indent
    derived = derived or {}
    lines: list[str] = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:  # {field.description}" if field.description else f"{pad}{name}:")
            lines.extend(_template_lines(value, indent + 1, f"{prefix}{name}.", derived))
        else:
            comment = _comment(field)
            scalar = _yaml_scalar(value if not isinstance(value, tuple) else list(value))
            note = derived.get(f"{prefix}{name}")
            if note is not None:  # listed, but left to its source: uncomment only to force a value
                lines.append(f"{pad}# {name}: {scalar}  # default {note}" + (f"; {comment}" if comment else ""))
            else:
                lines.append(f"{pad}{name}: {scalar}" + (f"  # {comment}" if comment else ""))
    return lines


def spec_template(action: str) -> str:
    """Commented YAML with the default of every key ``action`` reads (top-level keys and its sections)."""
    if action not in ACTION_SECTIONS:
        raise ValueError(f"unknown action {action!r}; valid: {', '.join(SPEC_ACTIONS)}")
    defaults = ExperimentSpec()
    header = [
        f"# nvp3d {action} spec template: every key with its default (generated by `nvp3d schema`; do not edit).",
        f"# {ACTION_SUMMARIES[action]}",
        f"# Usage: nvp3d {action} -e <copy of this file> [dotted.key=value ...]",
        f"# Schema: schemas/{action}.schema.json. Keys of other sections are accepted too (defaults apply).",
    ]
    if "model" in ACTION_SECTIONS[action]:
        header.append(
        "# Keys written as comments ('# key: value  # default ...') take their value from model.preset, the dataset"
        + (" or the checkpoint" if action in CHECKPOINT_ACTIONS else "")
        + "; uncomment one only to force it.")
    lines = list(header)
    fields = ExperimentSpec.model_fields
    for key in TOP_LEVEL_KEYS:
        comment = _comment(fields[key])
        lines.append(f"{key}: {_yaml_scalar(getattr(defaults, key))}" + (f"  # {comment}" if comment else ""))
    for section in ACTION_SECTIONS[action]:
        description = fields[section].description
        lines.append(f"{section}:  # {description}" if description else f"{section}:")
        lines.extend(_template_lines(getattr(defaults, section), 1, f"{section}.", derived_keys(action)))
    return "\n".join(lines) + "\n"


def synthetic_example(data_dir: str, results_dir: str, stage: str) -> str:
    """Example spec for synthetic data (only the keys that differ from the defaults)."""
    body = yaml.safe_dump(
        example_spec_dict(data_dir, results_dir, stage), sort_keys=False, default_flow_style=None, width=100
    )
    make = f"nvp3d dataset synth --out {data_dir}"
    run = f"nvp3d train -e references/spec_synthetic_{stage}.yaml"
    header = (
        f"# nvp3d example spec: {stage.upper()} stage on synthetic data (generated by `nvp3d schema`).\n"
        f"# Make the data with `{make}`, then run `{run}`.\n"
        "# Keys not listed keep their defaults (see references/spec_template_train.yaml).\n"
        "# On a machine without a GPU add the override train.num_gpus=0 (CPU).\n"
    )
    return header + body


# ------------------------------------------------------------------------------------------- writer


def generated_files() -> dict[str, str]:
    """Relative path -> content of every generated file."""
    files: dict[str, str] = {}
    for action in SPEC_ACTIONS:
        files[f"schemas/{action}.schema.json"] = json.dumps(action_schema(action), indent=2) + "\n"
        files[f"references/spec_template_{action}.yaml"] = spec_template(action)
    files["schemas/manifest.json"] = json.dumps(manifest(), indent=2) + "\n"
    files[SKILL_INFO_PATH] = skill_info_yaml()
    for rel, (data_dir, results_dir, stage) in SYNTHETIC_EXAMPLES.items():
        files[rel] = synthetic_example(data_dir, results_dir, stage)
    return files


def write_generated(out_dir: str | Path) -> list[Path]:
    """Write every generated file under ``out_dir`` (atomically); return the paths written."""
    root = Path(out_dir)
    written = []
    for rel, text in generated_files().items():
        written.append(atomic_write_text(root / rel, text))
    return written
