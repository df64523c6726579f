"""Where a spec value comes from when the spec does not set it: the preset, the dataset, or the checkpoint.

A spec key the user writes (in the file or as an override) always counts as the user's choice; pydantic's
``model_fields_set`` records it. Keys left unset take, in this order of authority:

* the checkpoint's recorded model spec (``evaluate``/``inference``/``export``, and the 3D stage's
  ``train.checkpoint_2d``), see :func:`merge_recorded_model`;
* the dataset's own description (voxel size and grid side), see :mod:`nvp3d.config.data_defaults`;
* the preset's defaults (:mod:`nvp3d.config.presets`), then the field defaults.

Filling a value from one of these sources does not mark it as set, so a later source can still supply it, and
a key the user did set is compared instead: a conflict is one line naming both values and the fix.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel

from nvp3d.errors import SpecError

__all__ = ["DATA_KEYS", "GEOMETRY_KEYS", "RUNTIME_MODEL_KEYS", "explicit_keys", "fill_unset", "merge_recorded_model",
           "resolve_mode"]

#: model keys the dataset defines -> where nvp3d reads them (the templates write them commented out)
DATA_KEYS: dict[str, str] = {
    "model.projection.voxel_size": "from the dataset's meta/camera.json when it has one, else 0.03",
    "model.frustum3d.grid_dimensions": "from the dataset's grid (meta/camera.json or meta/frustum_mask.npz), else 256",
    "model.frustum3d.frustum_dims": "from the dataset's grid (meta/camera.json or meta/frustum_mask.npz), else 256",
}

#: dataset keys that shape the network input; a checkpoint records them and later actions take them from it
#: when the spec leaves them unset
GEOMETRY_KEYS: tuple[str, ...] = ("target_size", "reduced_target_size", "depth_size", "depth_min", "depth_max")

#: model keys that do not shape the trained network (post-processing, loss weights, point sampling): a value the
#: spec sets wins over the checkpoint's without a conflict. Every other model key describes the network and must
#: match the checkpoint.
RUNTIME_MODEL_KEYS: frozenset[str] = frozenset({
    "mode", "object_mask_threshold", "overlap_threshold", "test_topk_per_image", "test_time_flip",
    "backbone.pretrained_model_path",
    "frustum3d.coarse_mask_weight", "frustum3d.iso_recon_value", "frustum3d.labels_2d_bands",
    "frustum3d.panoptic_weight",
    "frustum3d.panoptic_dice_weight", "frustum3d.panoptic_ce_weight", "frustum3d.completion_weights",
    "frustum3d.hidden_thing_weight", "frustum3d.things_of_2d", "frustum3d.test_time_flip", "frustum3d.semantic_gate",
    "frustum3d.surface_weight", "frustum3d.train_depth_noise", "sem_seg_head.ignore_value",
    *(f"mask_former.{k}" for k in ("dropout", "class_weight", "dice_weight", "mask_weight", "depth_weight",
                                   "mp_occ_weight", "train_num_points", "oversample_ratio", "importance_sample_ratio",
                                   "no_object_weight", "deep_supervision")),
})


def _leaves(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, BaseModel, str]]:
    """(dotted key, owning section, field name) of every value (non-section) field below ``model``."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from _leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", model, name


def explicit_keys(model: BaseModel) -> set[str]:
    """Dotted keys (relative to ``model``) whose value the user set; a section the user set counts key by key."""
    return {key for key, section, name in _leaves(model) if name in section.model_fields_set}


def _section_at(root: BaseModel, dotted: str) -> tuple[BaseModel, str]:
    parts = dotted.split(".")
    node = root
    for part in parts[:-1]:
        node = getattr(node, part)
    return node, parts[-1]


def fill_unset(root: BaseModel, dotted: str, value: Any) -> None:
    """Set ``root.<dotted>`` to ``value`` (validated) without marking it as the user's choice."""
    section, name = _section_at(root, dotted)
    was_set = name in section.model_fields_set
    setattr(section, name, value)
    if not was_set:
        section.model_fields_set.discard(name)


def merge_recorded_model(spec: Any, recorded: Mapping[str, Any], source: str, *,
                         keys: set[str] | None = None) -> list[str]:
    """Take the network's sizes from ``recorded`` (a checkpoint's ``model`` section) into ``spec.model``.

    Every key the spec leaves unset takes the recorded value. A key the spec sets keeps its value when it is
    a post-processing key (:data:`RUNTIME_MODEL_KEYS`) or equal; otherwise a :class:`SpecError` names both
    values and ``source``. ``keys`` limits the merge to those dotted keys (relative to ``model``). Returns
    the dotted keys whose value changed. The preset is merged first, so its defaults follow the checkpoint.
    """
    flat: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(recorded, "")
    changed: list[str] = []
    preset = flat.get("preset")
    if preset is not None and "preset" in spec.model.model_fields_set and spec.model.preset != preset:
        raise SpecError(f"model.preset={spec.model.preset!r} conflicts with {preset!r} recorded in {source}: remove "
                        "the key (the checkpoint sets it) or use a checkpoint trained with that preset")
    if (preset is not None and preset != spec.model.preset and "preset" not in spec.model.model_fields_set
            and (keys is None or "preset" in keys)):
        # rebuild with the recorded preset so that its defaults reach the keys nobody set
        spec.model = type(spec.model).model_validate({**spec.model.model_dump(exclude_unset=True), "preset": preset})
        spec.model.model_fields_set.discard("preset")
        changed.append("preset")
    explicit = explicit_keys(spec.model)
    known = {key for key, _, _ in _leaves(spec.model)}
    for key in sorted(k for k in flat if k in known and k != "preset" and (keys is None or k in keys)):
        value = flat[key]
        section, name = _section_at(spec.model, key)
        current = getattr(section, name)
        same = current == value or (isinstance(current, float | int) and isinstance(value, float | int)
                                    and float(current) == float(value))
        if key in explicit:
            if not same and key not in RUNTIME_MODEL_KEYS:
                raise SpecError(f"model.{key}={current!r} conflicts with {value!r} recorded in {source}: remove "
                                f"the key (the checkpoint sets it) or use a checkpoint trained with that value")
            continue
        if not same:
            fill_unset(spec.model, key, value)
            changed.append(key)
    return changed


def resolve_mode(spec: Any, action: str) -> None:
    """Make ``model.mode`` act as in the toolkit, where it selects the post-processing.

    ``train`` and ``evaluate`` post-process panoptically (PQ/PRQ need panoptic segments); as in the toolkit,
    another ``model.mode`` is refused (one line). For ``inference`` it is the default of ``inference.mode``
    (which also offers ``instance`` and ``semantic`` outputs); an ``inference.mode`` the spec sets wins.
    """
    mode = spec.model.mode
    if action in ("train", "evaluate") and mode != "panoptic":
        raise SpecError(f"model.mode={mode}: {action} implements the panoptic post-processing only (as the toolkit); "
                        "remove the key, or use it (or inference.mode) for nvp3d inference")
    if action == "inference" and "mode" not in spec.inference.model_fields_set and spec.inference.mode != mode:
        fill_unset(spec, "inference.mode", mode)
