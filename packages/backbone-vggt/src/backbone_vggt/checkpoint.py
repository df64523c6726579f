"""Loading official VGGT checkpoints (and toolkit / golden state_dicts) key-for-key.

Accepted inputs: a path to ``.pt`` / ``.pth`` / ``.bin`` (torch pickle, loaded with ``weights_only=True``) or
``.safetensors``; or an in-memory mapping. Wrappers ``{"model": ...}`` / ``{"state_dict": ...}`` and a DDP
``module.`` prefix are unwrapped. When loading into an ``Aggregator`` or ``DPTHead`` from a full checkpoint,
pass ``prefix="aggregator."`` / ``"depth_head."`` (auto-detected for the aggregator).
Keys of heads that the model did not build (``track_head`` always; others if disabled) are skipped and
reported, never silently dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .aggregator import Aggregator
from .errors import CheckpointError

log = logging.getLogger(__name__)

OPTIONAL_HEADS = ("camera_head", "depth_head", "point_head", "track_head")


class CheckpointNotFoundError(FileNotFoundError):
    """The checkpoint path does not exist."""


@dataclass
class LoadReport:
    """What ``load_pretrained`` did: counts and the offending key names."""

    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded} tensors"]
        if self.skipped:
            parts.append("skipped " + ", ".join(f"{n} {p}* keys (head not built)" for p, n in self.skipped.items()))
        if self.missing:
            parts.append(f"{len(self.missing)} missing (first: {self.missing[:3]})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (first: {self.unexpected[:3]})")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} shape mismatches (first: {self.mismatched[:3]})")
        return "; ".join(parts)


def read_state_dict(source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file (or take a mapping) and unwrap it to a flat ``{name: tensor}`` dict."""
    if isinstance(source, Mapping):
        data: object = source
        name = "<state_dict>"
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise CheckpointNotFoundError(f"checkpoint {path} does not exist (download model.pt from the VGGT release)")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                data = load_file(str(path), device="cpu")
            else:
                try:  # memory-map zip-format files so a 5 GB checkpoint is not held twice in RAM
                    data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:
                    data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any reader failure means an unreadable file
            raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    for _ in range(3):
        if isinstance(data, Mapping):
            wrapped = [k for k in ("model", "state_dict", "model_state_dict") if isinstance(data.get(k), Mapping)]
            if wrapped:
                data = data[wrapped[0]]
                continue
        break
    if not isinstance(data, Mapping) or not data:
        raise CheckpointError(f"checkpoint {name} holds no state_dict (expected a dict of tensors, "
                              f"or one under 'model' / 'state_dict')")
    non_tensor = [k for k, v in data.items() if not isinstance(v, torch.Tensor)]
    if non_tensor:
        raise CheckpointError(f"checkpoint {name}: entry {non_tensor[0]!r} is a {type(data[non_tensor[0]]).__name__}, "
                              f"not a tensor; is this a training-state file rather than model weights?")
    state = dict(data)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_pretrained(
    model: nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    strict: bool = True,
    prefix: str | None = None,
    assign: bool = False,
) -> LoadReport:
    """Load ``source`` into ``model`` and return a ``LoadReport``.

    ``strict=True`` raises ``CheckpointError`` naming the first missing / unexpected / wrongly shaped keys;
    ``strict=False`` loads every key whose name and shape match and reports the rest.
    """
    state = read_state_dict(source)
    if prefix is None and isinstance(model, Aggregator) and "aggregator.camera_token" in state:
        prefix = "aggregator."
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise CheckpointError(f"checkpoint has no keys starting with {prefix!r}")
    report = LoadReport()
    for head in OPTIONAL_HEADS:
        if getattr(model, head, "absent") is None:
            dropped = [k for k in state if k.startswith(head + ".")]
            if dropped:
                report.skipped[head + "."] = len(dropped)
                for k in dropped:
                    del state[k]
                log.warning("load_pretrained: skipping %d %s.* keys (that head is not built)", len(dropped), head)
    own = model.state_dict()
    report.missing = [k for k in own if k not in state]
    report.unexpected = [k for k in state if k not in own]
    report.mismatched = [
        (k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if k in state and state[k].shape != own[k].shape
    ]
    if strict and not report.ok:
        lines = []
        if report.missing:
            first = report.missing[0]
            lines.append(f"{len(report.missing)} missing keys, first {first!r} {tuple(own[first].shape)}")
        if report.unexpected:
            first = report.unexpected[0]
            lines.append(f"{len(report.unexpected)} unexpected keys, first {first!r} {tuple(state[first].shape)}")
        if report.mismatched:
            k, got, want = report.mismatched[0]
            lines.append(f"{len(report.mismatched)} shape mismatches, first {k!r}: checkpoint {got} vs model {want}")
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(lines)
                              + " (wrong preset or prefix? use strict=False to load what matches)")
    bad = {k for k, _, _ in report.mismatched}
    usable = {k: v for k, v in state.items() if k in own and k not in bad}
    model.load_state_dict(usable, strict=strict, assign=assign)
    report.loaded = len(usable)
    for sub in model.modules():  # meta-built models: give the non-persistent image statistics real storage
        if isinstance(sub, Aggregator) and sub._resnet_mean.is_meta and not sub.camera_token.is_meta:
            sub.reset_image_stats()
    return report
