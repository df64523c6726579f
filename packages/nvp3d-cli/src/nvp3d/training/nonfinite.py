"""Stopping training at the first non-finite loss, model output or gradient, before it reaches the weights.

Without this, a too-large ``train.optim.lr`` surfaced one step late as an unrelated error (the Hungarian
matcher refusing NaN costs), or silently: NaN weights were checkpointed, made ``*_latest`` and resumed into by
every rerun, and the 3D stage finished with ``train_loss: "nan"``. Now:

* :func:`guard_outputs` (2D ``compute_losses``) and :func:`guard_loss` (both stages' ``training_step``) check
  the network outputs and every loss term of the step;
* :class:`NonFiniteGuard` (a callback) checks the gradients after backward, before clipping and the optimizer
  step, and refuses to let :class:`~nvp3d.training.checkpointing.PeriodicCheckpoint` write non-finite weights.

A fault raises :class:`NonFiniteLossError` (exit code 5, one line with the step, the non-finite terms and the
hint to lower ``train.optim.lr``). With ``train.skip_nonfinite_steps: N`` up to N bad steps are skipped instead
(the loss step returns None, so Lightning does no update; a bad gradient is dropped); the N+1-th stops the run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from nvp3d.errors import ExitCode

log = logging.getLogger("nvp3d.train")

OUTPUT_KEYS = ("pred_logits", "pred_masks", "pred_depths")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss, output or gradient; the message is one line with the fix."""

    exit_code = ExitCode.NON_FINITE


def _fmt(value: torch.Tensor) -> str:
    v = float(value.detach().float().reshape(-1)[0]) if value.numel() == 1 else float("nan")
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else f"{v:.4g}"


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor is free of NaN/inf, with one device-to-host sync per device.

    A check per tensor would stall a GPU once per loss term or parameter (hundreds of times per step).
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t.detach())
    for group in by_device.values():
        if not bool(torch.stack([torch.isfinite(t).all() for t in group]).all()):
            return False
    return True


def _grads_finite(grads: list[torch.Tensor]) -> bool:
    """:func:`_all_finite` for gradients: a fused multi-tensor norm first (a NaN/inf makes it non-finite), the
    exact per-tensor test only when that norm is not finite (it also overflows for huge finite values)."""
    if not grads:
        return True
    norms = torch._foreach_norm([g.detach() for g in grads])
    return bool(torch.isfinite(torch.stack(norms)).all()) or _all_finite(grads)


def nonfinite_terms(terms: Mapping[str, Any]) -> list[str]:
    """``name=value`` of every tensor term that holds a NaN or inf (values of scalar terms shown)."""
    tensors = [v for v in terms.values() if torch.is_tensor(v) and v.is_floating_point()]
    if _all_finite(tensors):
        return []
    bad = []
    for name, value in terms.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value.detach()).all()):
            bad.append(f"{name}={_fmt(value)}" if value.numel() == 1 else f"{name}(non-finite)")
    return bad


def _on_any_rank(trainer: pl.Trainer, bad: list[str]) -> list[str]:
    """``bad``, or a placeholder when only another DDP rank saw a fault: every rank must stop or skip together
    (a rank that raised alone would leave the others waiting in the gradient all-reduce)."""
    if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(bool(bad), all=False) and not bad:
        return ["values on another process (DDP rank)"]
    return bad


def find_guard(module: pl.LightningModule) -> NonFiniteGuard | None:
    """The :class:`NonFiniteGuard` among the callbacks of the module's trainer (None outside a fit)."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return None
    for cb in trainer.callbacks:
        if isinstance(cb, NonFiniteGuard):
            return cb
    return None


def guard_outputs(module: pl.LightningModule, out: Mapping[str, Any]) -> None:
    """Stop (no skipping: the loss cannot be computed) when the network outputs of a training step are non-finite."""
    guard = find_guard(module)
    if guard is None or not module.training:
        return
    bad = _on_any_rank(module.trainer, nonfinite_terms({k: out[k] for k in OUTPUT_KEYS if k in out}))
    if bad:
        guard.fail(module.trainer, "network outputs " + ", ".join(bad) + " (the weights diverged)")


def guard_loss(module: pl.LightningModule, total: torch.Tensor, terms: Mapping[str, Any]) -> torch.Tensor | None:
    """``total`` when it and every term are finite; None (skip this step) or :class:`NonFiniteLossError` if not."""
    guard = find_guard(module)
    if guard is None:
        return total
    bad = _on_any_rank(module.trainer, nonfinite_terms(terms) or nonfinite_terms({"loss": total}))
    if not bad:
        return total
    guard.bad_step(module.trainer, "loss " + ", ".join(bad))
    return None


class NonFiniteGuard(Callback):
    """Counts and reports non-finite steps; checks gradients and checkpointed weights (see the module doc)."""

    def __init__(self, lr: float, skip_allowed: int = 0) -> None:
        self.lr = lr
        self.skip_allowed = int(skip_allowed)
        self.skipped: list[int] = []
        self._params: list[tuple[str, torch.nn.Parameter]] = []  # the parameters, listed once per fit

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # listing them walks every submodule (5.5 ms per step on the demo's tiny model, one CPU thread)
        self._params = list(pl_module.named_parameters())

    def message(self, trainer: pl.Trainer, what: str) -> str:
        """The one-line report of a fault at the step being computed."""
        step = trainer.global_step + 1
        skipped = f"; {len(self.skipped)} step(s) skipped before (train.skip_nonfinite_steps={self.skip_allowed})" \
            if self.skipped else ""
        return (f"non-finite values at training step {step} (epoch {trainer.current_epoch}): {what}{skipped}; "
                f"lower train.optim.lr (now {self.lr:g}) or set train.skip_nonfinite_steps; no checkpoint of this "
                "step was written")

    def fail(self, trainer: pl.Trainer, what: str) -> None:
        exc = NonFiniteLossError(self.message(trainer, what))
        exc.status_fields = {"step": trainer.global_step + 1, "nonfinite": what}  # extra status.json fields
        raise exc

    def bad_step(self, trainer: pl.Trainer, what: str) -> None:
        """Skip the step when skips are left, else stop the run."""
        if len(self.skipped) >= self.skip_allowed:
            self.fail(trainer, what)
        self.skipped.append(trainer.global_step + 1)
        log.warning("skipping training step %d (%d of train.skip_nonfinite_steps=%d): non-finite %s",
                    trainer.global_step + 1, len(self.skipped), self.skip_allowed, what)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        params = self._params or list(pl_module.named_parameters())
        named = [(name, p.grad) for name, p in params if p.grad is not None]
        if _grads_finite([g for _, g in named]):
            return
        bad = [name for name, g in named if not bool(torch.isfinite(g).all())]
        self.bad_step(trainer, f"gradient of {len(bad)} parameter(s) (first: {bad[0]})")
        optimizer.zero_grad(set_to_none=True)  # skipped: the optimizer leaves every parameter as it is

    def check_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse to checkpoint non-finite weights (called by PeriodicCheckpoint before it writes)."""
        named = list(pl_module.named_parameters())
        if _all_finite([p for _, p in named if p.is_floating_point()]):
            return
        for name, p in named:
            if not bool(torch.isfinite(p.detach()).all()):
                self.fail(trainer, f"weight {name} became non-finite")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": list(self.skipped)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = [int(s) for s in state_dict.get("skipped", [])]


def check_weights_before_save(trainer: pl.Trainer) -> None:
    """Hook for checkpoint writers: raise when a :class:`NonFiniteGuard` finds non-finite weights."""
    for cb in trainer.callbacks:
        if isinstance(cb, NonFiniteGuard):
            cb.check_weights(trainer, trainer.lightning_module)
