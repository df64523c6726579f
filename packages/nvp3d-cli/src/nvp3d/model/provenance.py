"""What a checkpoint was trained as: the resolved ``model`` section, the image geometry and the label space.

``nvp3d train`` stores :func:`spec_record` in every checkpoint (key :data:`RECORD_KEY`). ``evaluate``,
``inference`` and ``export`` (and the 3D stage, from ``train.checkpoint_2d``) then build the network from it, so
train-time ``model.*`` overrides need not be repeated: :func:`apply_checkpoint_record` fills every model key the
spec leaves unset and refuses, in one line, an explicit key that contradicts the checkpoint
(:func:`nvp3d.config.sources.merge_recorded_model`). Checkpoints written before the record existed carry none;
they are used with the spec as it is, as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nvp3d.config.data_defaults import apply_data_defaults
from nvp3d.config.sources import GEOMETRY_KEYS, fill_unset, merge_recorded_model, resolve_mode

__all__ = ["CHECKPOINT_KEY_OF_ACTION", "RECORD_KEY", "apply_checkpoint_record", "apply_sources", "label_entries",
           "read_spec_record", "spec_record"]

#: checkpoint entry holding the record
RECORD_KEY = "nvp3d_spec"
RECORD_FORMAT = 1


#: the spec key naming each action's checkpoint
CHECKPOINT_KEY_OF_ACTION = {"evaluate": "evaluate.checkpoint", "inference": "inference.checkpoint",
                            "export": "export.checkpoint"}

#: model keys a 2D checkpoint decides for the 3D stage trained on top of it
TWO_D_SECTIONS = ("preset", "backbone.", "sem_seg_head.", "mask_former.")


def label_entries(classes: Mapping[int, tuple[str, bool]]) -> list[dict[str, Any]]:
    """Label-map entries (``colormap.json`` format) of a label space ``class id -> (name, isthing)``."""
    from datasets3d import default_colormap

    colours = {int(e["trainId"]): list(e["color"]) for e in default_colormap()}
    return [{"id": int(c), "trainId": int(c), "name": str(name), "isthing": int(bool(thing)),
             "color": colours.get(int(c), [128, 128, 128])} for c, (name, thing) in sorted(classes.items())]


def spec_record(spec: Any, classes: Mapping[int, tuple[str, bool]] | None) -> dict[str, Any]:
    """The record a checkpoint carries: its stage, resolved ``model``, the input geometry and the label space."""
    return {
        "format": RECORD_FORMAT,
        "stage": "3d" if spec.dataset.enable_3d else "2d",
        "model": spec.model.model_dump(mode="json"),
        "dataset": {k: spec.dataset.model_dump(mode="json")[k] for k in GEOMETRY_KEYS},
        "labels": label_entries(classes) if classes else None,
    }


def read_spec_record(path: str | Path) -> dict[str, Any] | None:
    """The record of the checkpoint at ``path``; None for a file without one (older checkpoints, plain state
    dicts) or one that cannot be read (the action reports that itself when it loads the weights)."""
    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        return None
    try:
        try:  # memory-mapped: only the small record is read from a multi-GB file
            data = torch.load(p, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:
            data = torch.load(p, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - unreadable: the weight loader raises the proper one-line error later
        return None
    record = data.get(RECORD_KEY) if isinstance(data, Mapping) else None
    return dict(record) if isinstance(record, Mapping) and isinstance(record.get("model"), Mapping) else None


def apply_checkpoint_record(spec: Any, record: Mapping[str, Any], source: str, *, two_d_only: bool = False,
                            action: str = "") -> list[str]:
    """Fill ``spec`` from ``record`` (see the module docstring); returns the changed dotted keys."""
    keys = None
    if two_d_only:
        flat = _flat(record["model"])
        keys = {k for k in flat if k == "preset" or k.startswith(TWO_D_SECTIONS[1:])}
    changed = [f"model.{k}" for k in merge_recorded_model(spec, record["model"], source, keys=keys)]
    if action == "evaluate" and record.get("stage") in ("2d", "3d") and "enable_3d" not in spec.dataset.model_fields_set:
        enable_3d = record["stage"] == "3d"  # evaluate the stage the checkpoint was trained as
        if spec.dataset.enable_3d != enable_3d:
            fill_unset(spec.dataset, "enable_3d", enable_3d)
            changed.append("dataset.enable_3d")
    if not two_d_only:
        for key, value in (record.get("dataset") or {}).items():
            if key in GEOMETRY_KEYS and key not in spec.dataset.model_fields_set and getattr(spec.dataset, key) != value:
                fill_unset(spec.dataset, key, value)
                changed.append(f"dataset.{key}")
    return changed


def _flat(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in node.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def apply_sources(spec: Any, action: str, say=None) -> Any:
    """Resolve the values other sources define into ``spec`` (in place, also returned) for ``action``: the
    checkpoint's model first, then the dataset's grid (which must agree with what the checkpoint decided)."""
    key = CHECKPOINT_KEY_OF_ACTION.get(action)
    two_d_only = False
    if key is None and action == "train" and spec.dataset.enable_3d and spec.train.checkpoint_2d:
        key, two_d_only = "train.checkpoint_2d", True
    record = None
    if key is not None:
        section, name = key.split(".")
        path = getattr(getattr(spec, section), name)
        record = read_spec_record(path) if path else None
    recorded: dict[str, str] = {}
    if record is not None:
        source = f"{key}={path}"
        changed = apply_checkpoint_record(spec, record, source, two_d_only=two_d_only, action=action)
        if not two_d_only:
            recorded = {k: source for k in _flat(record["model"])}
        if changed and say is not None:
            say(f"from {source}: {', '.join(changed)}")
    apply_data_defaults(spec, action, recorded=recorded)
    resolve_mode(spec, action)
    return spec
