"""Optimizer parameter groups and learning-rate schedulers for NVPanoptix3D training.

The rules follow the toolkit (and Mask2Former): weight decay 0.05 for ordinary weights, 0 for normalisation
layers and embeddings; parameters under the ``backbone`` submodule (VGGT aggregator and DPT depth head) get
``lr * backbone_multiplier``. Two schedulers exist: ``MultiStep`` (stepped per epoch) and ``WarmupPoly``
(stepped per optimizer step: linear warmup then polynomial decay with power 0.9 over ``max_steps``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
"""Module types whose parameters never get weight decay."""

EMBEDDING_PARAM_NAMES: tuple[str, ...] = (
    "pos_embed",
    "level_embed",
    "camera_token",
    "register_token",
    "cls_token",
    "mask_token",
    "absolute_pos_embed",
    "relative_position_bias_table",
)
"""Bare ``nn.Parameter`` names that are embeddings (no weight decay) although not in an ``nn.Embedding``."""


@dataclass(frozen=True)
class GroupRule:
    """Hyper-parameters shared by one optimizer parameter group."""

    lr: float
    weight_decay: float


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, NORM_TYPES):
        return True
    # RMSNorm and custom norms (e.g. LayerNorm2d in the pixel decoder) are recognised by name.
    return "norm" in type(module).__name__.lower()


def param_group_rule(
    module_name: str, module: nn.Module, param_name: str, lr: float, weight_decay: float,
    backbone_multiplier: float,
) -> GroupRule:
    """Learning rate and weight decay of one parameter, given the module that owns it directly."""
    param_lr = lr
    if "backbone" in module_name.split("."):
        param_lr = lr * backbone_multiplier
    wd = weight_decay
    if _is_norm(module) or isinstance(module, nn.Embedding) or param_name in EMBEDDING_PARAM_NAMES:
        wd = 0.0
    return GroupRule(lr=param_lr, weight_decay=wd)


def build_param_groups(
    model: nn.Module, lr: float, weight_decay: float = 0.05, backbone_multiplier: float = 0.1,
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into groups of equal (lr, weight_decay).

    Frozen parameters (``requires_grad=False``) are left out; a parameter shared by two modules is counted
    once. Each group dict has ``params``, ``lr``, ``weight_decay`` and ``names`` (for reports and tests).
    """
    seen: set[int] = set()
    groups: dict[GroupRule, dict[str, Any]] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            rule = param_group_rule(module_name, module, param_name, lr, weight_decay, backbone_multiplier)
            group = groups.setdefault(
                rule, {"params": [], "lr": rule.lr, "weight_decay": rule.weight_decay, "names": []}
            )
            group["params"].append(param)
            group["names"].append(f"{module_name}.{param_name}" if module_name else param_name)
    return list(groups.values())


def build_optimizer(
    params: Iterable[dict[str, Any]], optim_type: str, lr: float, weight_decay: float, momentum: float = 0.9,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """AdamW or SGD over prepared parameter groups (the ``names`` entries are dropped); ``fused``: AdamW's fused
    kernel (:func:`fused_adamw_fits`)."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in params]
    kind = optim_type.lower()
    if kind == "adamw":
        return torch.optim.AdamW(clean, lr=lr, weight_decay=weight_decay, fused=True if fused else None)
    if kind == "sgd":
        return torch.optim.SGD(clean, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"train.optim.type={optim_type!r} is not supported; use 'AdamW' or 'SGD'")


def warmup_poly_factor(step: int, max_steps: int, warmup_iters: int, warmup_factor: float, power: float) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (Mask2Former's WarmupPolyLR with linear warmup).

    Warmup: ``warmup_factor * (1 - a) + a`` with ``a = step / warmup_iters`` for ``step < warmup_iters``.
    Decay: ``(1 - step / max_steps) ** power``, reaching 0 at ``max_steps`` and staying there.
    """
    warm = 1.0
    if warmup_iters > 0 and step < warmup_iters:
        alpha = step / warmup_iters
        warm = warmup_factor * (1.0 - alpha) + alpha
    remaining = max(0.0, 1.0 - step / max(1, max_steps))
    return warm * math.pow(remaining, power)


class WarmupPolyLR(torch.optim.lr_scheduler.LambdaLR):
    """Step-based polynomial decay with linear warmup; ``max_steps`` can be changed on resume."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, max_steps: int, warmup_iters: int = 0,
        warmup_factor: float = 1.0, power: float = 0.9, last_epoch: int = -1,
    ) -> None:
        if max_steps <= 0:
            raise ValueError(f"train.optim.max_steps must be > 0 for WarmupPoly, got {max_steps}")
        self.max_steps = int(max_steps)
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        self.power = float(power)
        super().__init__(optimizer, self._factor, last_epoch=last_epoch)

    def _factor(self, step: int) -> float:
        return warmup_poly_factor(step, self.max_steps, self.warmup_iters, self.warmup_factor, self.power)

    def state_dict(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        keep_max = self.max_steps
        self.__dict__.update({k: v for k, v in state_dict.items() if k != "lr_lambdas"})
        # The toolkit overwrites max_iters with the current spec on resume: a longer schedule can be resumed.
        self.max_steps = keep_max


def build_scheduler(
    optimizer: torch.optim.Optimizer, name: str, *, milestones: list[int] | None = None, gamma: float = 0.1,
    max_steps: int = 160000, warmup_iters: int = 0, warmup_factor: float = 1.0, power: float = 0.9,
) -> dict[str, Any]:
    """A Lightning ``lr_scheduler`` config: MultiStep steps per epoch, WarmupPoly per optimizer step."""
    kind = name.lower()
    if kind == "multistep":
        sched = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones or []), gamma=gamma)
        return {"scheduler": sched, "interval": "epoch", "frequency": 1}
    if kind == "warmuppoly":
        sched = WarmupPolyLR(optimizer, max_steps, warmup_iters, warmup_factor, power)
        return {"scheduler": sched, "interval": "step", "frequency": 1}
    raise ValueError(f"train.optim.lr_scheduler={name!r} is not supported; use 'MultiStep' or 'WarmupPoly'")


def fused_adamw_fits(groups: list[dict[str, Any]], optim_type: str, precision: str) -> bool:
    """Whether AdamW runs as its fused kernel: fp32 training with every parameter on the CPU.

    On the CPU torch's default AdamW loops over the parameters one small op at a time: on the tiny model's 470
    tensors (``nvp3d demo``, one thread) a step took 37.3 ms that way and 9.3 ms fused (CUDA already defaults to
    the multi-tensor form). Not under bf16: Lightning refuses gradient clipping (``train.clip_grad_norm``) with an
    optimizer that unscales its gradients itself, as the fused one declares.
    """
    if optim_type.lower() != "adamw" or precision != "fp32":
        return False
    return all(p.device.type == "cpu" for g in groups for p in g["params"])


def align_fused_after_resume(optimizers: Iterable[torch.optim.Optimizer], precision: str) -> None:
    """Set each AdamW's ``fused`` flag by :func:`fused_adamw_fits` for this run.

    Loading an optimizer state replaces its parameter groups with the saved ones, ``fused`` flag included: a
    checkpoint of a CPU fp32 run resumed under bf16 on a GPU would otherwise keep the fused kernel and Lightning
    would refuse its gradient clipping.
    """
    for opt in optimizers:
        if isinstance(opt, torch.optim.AdamW):
            fits = fused_adamw_fits(opt.param_groups, "adamw", precision)
            for group in opt.param_groups:
                group["fused"] = True if fits else None


def optimization_from_spec(model: nn.Module, optim: Any, no_trainable_message: str,
                           precision: str = "fp32") -> dict[str, Any]:
    """Lightning ``configure_optimizers`` result for ``model`` from ``train.optim`` (both stages use it);
    ``precision`` is ``train.precision`` (:func:`fused_adamw_fits`).

    Raises ``ValueError(no_trainable_message)`` when no parameter of ``model`` is trainable.
    """
    groups = build_param_groups(model, lr=optim.lr, weight_decay=optim.weight_decay,
                                backbone_multiplier=optim.backbone_multiplier)
    if not groups:
        raise ValueError(no_trainable_message)
    optimizer = build_optimizer(groups, str(optim.type), lr=optim.lr, weight_decay=optim.weight_decay,
                                momentum=optim.momentum,
                                fused=fused_adamw_fits(groups, str(optim.type), str(precision)))
    sched = build_scheduler(optimizer, str(optim.lr_scheduler), milestones=list(optim.milestones),
                            gamma=optim.gamma, max_steps=optim.max_steps, warmup_iters=optim.warmup_iters,
                            warmup_factor=optim.warmup_factor)
    return {"optimizer": optimizer, "lr_scheduler": sched}
