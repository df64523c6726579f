"""CUDA-graph replay of the 2D network's *training* forward and backward (``train.cuda_graphs_train_2d``).

The ``small`` preset's 2D training step is bound by the host: at batch 32 it costs about 1.3x a batch-1 step on
an H200, because the step dispatches about 14,000 kernels (``tools/count_step_ops.py``) and the GPU waits for
them. For one input shape the network's forward has static shapes and no host synchronisation (the inference
graphs of :mod:`nvp3d.model.graphed2d` capture it), so its forward and the backward to its parameters can be
captured once and replayed; the loss (Hungarian matching, point sampling) stays eager between the two replays.

How (the algorithm of ``torch.cuda.make_graphed_callables``, written out so that the capture runs in
``thread_local`` mode: a training DataLoader's pin-memory thread keeps using CUDA while the capture runs,
which torch's default mode turns into a failed capture):

1. a few eager forward + ``autograd.grad`` passes on a side stream (lazy initialisation stays out of the graph;
   ``autograd.grad`` leaves ``.grad`` untouched); the buffers are restored afterwards, so the batch norms'
   running statistics see the first batch once, as in eager training, not once per warm-up pass;
2. the forward is captured into one graph, the gradient of its outputs with respect to the trainable
   parameters into a second (sharing the first one's memory pool);
3. :class:`_Replay`, an ``autograd.Function``, copies the images into the static input, replays the forward,
   and in backward copies the incoming output gradients into static buffers, replays the backward and hands
   the parameters their gradients.

Rules, checked by :meth:`TrainingGraphs.applies` (outside them the eager forward runs, unchanged): CUDA
images, the network in training mode with gradients on, no autocast (fp32 with TF32: the recipe's setting;
autocast's weight-cast cache cannot live in a graph), no activation checkpointing, one process (DDP's
gradient hooks are not tested with replayed gradients). A capture is kept per input shape (the last,
smaller batch of an epoch gets its own); after ``max_captures`` other shapes run eagerly. A capture that
fails is reported once and training goes on eagerly.

The parameters' gradients are the backward graph's static buffers (no copy per step): a parameter's ``.grad``
is valid until the next replay. That holds for the Lightning loop (``zero_grad`` with ``set_to_none`` after
every optimizer step), not for gradient accumulation over several batches, which the trainer does not use.
Weights are read from their storage at replay time, so in-place optimizer updates are seen; replacing a
parameter tensor (``load_state_dict(assign=True)``) after a capture is not, and :meth:`TrainingGraphs.reset`
must be called then.

Not yet run on a GPU (no device was lent when this was written): the CUDA test in
``tests/test_graphed_train2d.py`` compares replayed steps with eager ones.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["FlatOutputs", "TrainingGraphs"]

#: other threads (the DataLoader's pin-memory thread) keep using CUDA while a capture runs
CAPTURE_MODE = "thread_local"


class FlatOutputs:
    """A forward's output pytree split into its tensor leaves (what a graph can hold) and everything else
    (Python sizes, ``None``), so the tensors can be replayed and the same structure rebuilt around them."""

    def __init__(self, outputs: Any) -> None:
        leaves, self.spec = tree_flatten(outputs)
        self.tensor_at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self.leaves = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]

    @staticmethod
    def tensors(outputs: Any) -> tuple[torch.Tensor, ...]:
        """The tensor leaves of ``outputs`` in pytree order."""
        return tuple(leaf for leaf in tree_flatten(outputs)[0] if isinstance(leaf, torch.Tensor))

    def rebuild(self, tensors: tuple[torch.Tensor, ...]) -> Any:
        """The output structure with ``tensors`` (from :meth:`tensors`) in place of the tensor leaves."""
        leaves = list(self.leaves)
        if len(tensors) != len(self.tensor_at):
            raise ValueError(f"expected {len(self.tensor_at)} tensors, got {len(tensors)}")
        for i, t in zip(self.tensor_at, tensors, strict=True):
            leaves[i] = t
        return tree_unflatten(leaves, self.spec)


class _Capture:
    """Forward and backward graphs of ``fn`` for one input shape (module docstring, steps 1-2)."""

    def __init__(self, fn: Callable[[torch.Tensor], Any], params: list[nn.Parameter], example: torch.Tensor,
                 warmup: int = 3, buffers: Sequence[torch.Tensor] = ()) -> None:
        self.params = params
        self.static_input = example.detach().clone()
        before = [b.detach().clone() for b in buffers]  # running statistics, counters: warm-up must not move them
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                outs = FlatOutputs.tensors(fn(self.static_input))
                need = [o for o in outs if o.requires_grad]
                torch.autograd.grad(need, params, grad_outputs=[torch.empty_like(o) for o in need],
                                    allow_unused=True)
                del outs, need
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for b, saved in zip(buffers, before, strict=True):
                b.copy_(saved)
        torch.cuda.synchronize()
        self.fwd = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.fwd, capture_error_mode=CAPTURE_MODE):
            out = fn(self.static_input)
        self.structure = FlatOutputs(out)
        self.static_outputs = FlatOutputs.tensors(out)
        self.grad_at = [i for i, o in enumerate(self.static_outputs) if o.requires_grad]
        self.static_grad_outputs = [torch.empty_like(self.static_outputs[i]) for i in self.grad_at]
        self.bwd = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.bwd, pool=self.fwd.pool(), capture_error_mode=CAPTURE_MODE):
            grads = torch.autograd.grad([self.static_outputs[i] for i in self.grad_at], params,
                                        grad_outputs=self.static_grad_outputs, allow_unused=True)
        self.static_param_grads = tuple(grads)

    def matches(self, x: torch.Tensor) -> bool:
        s = self.static_input
        return x.shape == s.shape and x.dtype == s.dtype and x.device == s.device


class _Replay(torch.autograd.Function):
    """Replays a :class:`_Capture` (module docstring, step 3); the parameters are inputs so that autograd
    delivers their gradients."""

    @staticmethod
    def forward(ctx: Any, capture: _Capture, images: torch.Tensor, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.capture = capture
        capture.static_input.copy_(images)
        capture.fwd.replay()
        outs = tuple(o.detach() for o in capture.static_outputs)
        ctx.mark_non_differentiable(*(o for i, o in enumerate(outs) if i not in set(capture.grad_at)))
        return outs

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> tuple[Any, ...]:
        capture: _Capture = ctx.capture
        for buf, i in zip(capture.static_grad_outputs, capture.grad_at, strict=True):
            g = grad_outputs[i]
            if g is None:
                buf.zero_()
            elif g.data_ptr() != buf.data_ptr():
                buf.copy_(g)
        capture.bwd.replay()
        return (None, None, *(None if g is None else g.detach() for g in capture.static_param_grads))


class TrainingGraphs:
    """Capture-and-replay of a 2D network's training forward + backward, per input shape (module docstring).

    ``net`` must offer ``forward_eager(images)``; ``max_captures`` shapes are captured, later ones run eagerly;
    ``say`` receives the one-line notice when a capture fails.
    """

    def __init__(self, net: nn.Module, *, max_captures: int = 2, say: Callable[[str], None] = print) -> None:
        self._net = [net]  # not registered as a sub-module
        self.max_captures = int(max_captures)
        self.say = say
        self.captures: list[_Capture] = []
        self.failed: str | None = None  # the reason, once a capture failed: eager from then on

    @property
    def net(self) -> nn.Module:
        return self._net[0]

    def blocking_reasons(self, device: torch.device, autocast: bool, world_size: int) -> list[str]:
        """Why this run cannot replay (empty: it can), one phrase per rule of the module docstring that holds
        for the whole run: the device, autocast (``train.precision`` other than fp32), activation
        checkpointing, several processes. The per-call rules (training mode, gradients on, no failed
        capture) are :meth:`applies`' own. The training module prints these when training starts."""
        aggregator = getattr(getattr(self.net, "backbone", None), "aggregator", None)
        rules = (
            ("the model is not on a CUDA GPU", device.type != "cuda"),
            ("autocast is on (train.precision is not fp32; fp32 only)", autocast),
            ("activation checkpointing is on (train.activation_checkpoint)",
             bool(getattr(aggregator, "gradient_checkpointing", False))),
            ("more than one process trains", world_size > 1),
        )
        return [reason for reason, holds in rules if holds]

    def applies(self, images: torch.Tensor) -> bool:
        """True when this call can use (or make) a capture: the rules of the module docstring."""
        if self.failed is not None or not (self.net.training and torch.is_grad_enabled()):
            return False
        world = (torch.distributed.get_world_size()
                 if torch.distributed.is_available() and torch.distributed.is_initialized() else 1)
        return not self.blocking_reasons(images.device, torch.is_autocast_enabled("cuda"), world)

    def reset(self) -> None:
        """Drop every capture (after replacing parameter tensors)."""
        self.captures.clear()

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def __call__(self, images: torch.Tensor) -> Any:
        capture = next((c for c in self.captures if c.matches(images)), None)
        if capture is None:
            if len(self.captures) >= self.max_captures:
                return self.net.forward_eager(images)
            try:
                capture = _Capture(self.net.forward_eager, self.trainable(), images,
                                   buffers=list(self.net.buffers()))
            except Exception as exc:  # a capture must never end a training run: eager from here on
                self.failed = f"{type(exc).__name__}: {exc}"
                self.say(f"train.cuda_graphs_train_2d: capture failed ({self.failed.splitlines()[0]}); the 2D "
                         f"network trains eagerly from here on")
                traceback.print_exc()
                return self.net.forward_eager(images)
            self.captures.append(capture)
        outs = _Replay.apply(capture, images, *capture.params)
        return capture.structure.rebuild(outs)
