"""CUDA-graph replay of the 2D network's inference forward (``inference.cuda_graphs``).

For one input shape the 2D network (VGGT aggregator, DPT depth head, MaskFormer head) has static shapes and no
host synchronisation, so its whole forward can be captured once and replayed: at batch 1 it is bound by kernel
launches, and a replay removes them. :class:`Graphed2D` keeps one :class:`backbone_vggt.StaticGraph` per
*capture key* (input shape, dtype, device, autocast on/off and dtype) and replays it.

When it is used (:meth:`Graphed2D.applies`): switched on (``Panoptic2DNet.enable_cuda_graphs``, which the
:class:`~nvp3d.inference.predictor.Predictor` does from ``inference.cuda_graphs`` and the 3D stage's training
and evaluation from ``train.cuda_graphs_2d``: there the 2D network is frozen), CUDA input, the network in
eval mode and gradients off. 2D training, CPU and gradient-enabled calls run the eager forward, untouched.

Levels (:attr:`Graphed2D.level`): ``"full"`` captures backbone + head; if that capture fails (an operation the
head gains later that cannot be captured) it falls back to ``"backbone"`` (aggregator + DPT graphed, head eager),
and if that fails too to ``"eager"``. The reason is kept in :attr:`Graphed2D.fallback_reason`.

Staleness rule: a graph reads the weights' storage at replay time, but values derived from the weights at
capture time (the bf16 copies of :func:`backbone_vggt.cache_low_precision_weights`, made for autocast
captures) are frozen. So every call compares a *weight signature* (storage address and in-place version counter
of every parameter and buffer) with the one of the captures: ``load_state_dict`` (in place or with
``assign=True``), ``.to()`` to another device or dtype, an optimizer step, any in-place edit, a replaced
parameter, buffer or sub-module changes it, and then all captures and low-precision copies are dropped and
rebuilt on demand. :meth:`Graphed2D.invalidate` does the same explicitly; call it after edits through
``.data`` (they do not bump version counters).

The check has to be cheap (it runs on every call of a ~50 ms forward): :class:`WeightWatch` keeps the
parameter and buffer dicts of the network's modules and reads only those (a walk over ~3000 modules per call
would cost milliseconds); the list is rebuilt whenever any module, parameter or buffer is registered anywhere in
the process (``torch.nn`` global registration hooks, installed on import), so a replaced sub-module or an
``assign=True`` load is still seen.

Each capture holds on to the cached tensors it read (``StaticGraph(keep_alive=...)``: the DINO position table of
its size and dtype, the bf16 weight copies), so a later capture that evicts them, or a same-device ``.to()``
that drops the weight copies, cannot leave it reading freed memory.

Outputs are cloned out of the graph's static buffers, so a caller may keep them across calls.

``compile=True`` (``inference.compile_2d``) compiles the network's parts with ``torch.compile`` before the first
capture (:mod:`nvp3d.model.compiled2d`), so the graphs replay fused kernels. If a capture of the compiled network
fails, the parts are un-compiled and the capture is tried again at the same level (reason in
:attr:`Graphed2D.compile_failure`); :meth:`Graphed2D.release` un-compiles them too.
"""

from __future__ import annotations

import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from backbone_vggt import Linear, StaticGraph, cache_low_precision_weights
from torch import nn
from torch.utils._pytree import tree_map

from nvp3d.model.compiled2d import compile_2d, is_compiled

__all__ = ["LEVELS", "Graphed2D", "WeightWatch", "capture_key", "weight_signature"]

#: capture levels, most to least graphed
LEVELS = ("full", "backbone", "eager")

#: other threads keep using CUDA while a capture runs: a training DataLoader's pin-memory thread (3D stage),
#: the inference writers; under torch's default "global" mode their calls would break the capture
CAPTURE_MODE = "thread_local"

CaptureKey = tuple[Any, ...]


def capture_key(x: torch.Tensor) -> CaptureKey:
    """What a capture is valid for: input shape, dtype, device and the caller's CUDA autocast state."""
    amp = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    return (tuple(x.shape), x.dtype, x.device, amp)


#: bumped whenever a module, parameter or buffer is registered on any module (WeightWatch rebuilds its lists)
_REGISTRATIONS = [0]


def _registered(*_args: Any) -> None:
    _REGISTRATIONS[0] += 1


for _hook in ("register_module_module_registration_hook", "register_module_parameter_registration_hook",
              "register_module_buffer_registration_hook"):
    getattr(torch.nn.modules.module, _hook)(_registered)


class WeightWatch:
    """``WeightWatch(module).signature()``: (storage address, in-place version) of every parameter and buffer.

    Reads the modules' parameter/buffer dicts from a cached list, refreshed after any registration anywhere
    (module docstring), so a call costs about 0.1 us per tensor instead of a walk over every module.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._seen = -1
        self._values: list[Any] = []  # live views of the non-empty parameter/buffer dicts

    def signature(self) -> list[tuple[int, int]]:
        if self._seen != _REGISTRATIONS[0]:
            self._seen = _REGISTRATIONS[0]
            self._values = [d.values() for m in self.module.modules() for d in (m._parameters, m._buffers) if d]
        return [(t.data_ptr(), t._version) for v in self._values for t in v if t is not None]


def weight_signature(module: nn.Module) -> list[tuple[int, int]]:
    """(storage address, in-place version) of every parameter and buffer: changes when weights do."""
    return WeightWatch(module).signature()


def _has_low_precision(module: nn.Module, dtype: torch.dtype) -> bool:
    """True when every ``backbone_vggt`` ``Linear`` of ``module`` holds a current ``dtype`` weight copy."""
    layers = [m for m in module.modules() if isinstance(m, Linear)]
    return all(m._lp_weight is not None and m._lp_weight.dtype == dtype and m._lp_version == m._versions()
               for m in layers)


def _clone(out: Any) -> Any:
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)


class Graphed2D:
    """Capture-and-replay of a 2D network's forward (module docstring).

    Args:
        net: the 2D network; it must offer ``forward_eager(images, backbone=None)``, ``backbone_input(images)``
            and a ``backbone`` module.
        max_captures: captures kept (least recently used dropped first); each holds its own memory pool.
        say: where the one-line fallback notice goes.
        compile: compile the network's parts before the first capture (module docstring).
    """

    def __init__(self, net: nn.Module, *, max_captures: int = 4, say: Callable[[str], None] = print,
                 compile: bool = False) -> None:
        self._net = [net]  # a list: not registered as a sub-module of anything
        self.max_captures = int(max_captures)
        self.say = say
        self.level = LEVELS[0]
        self.fallback_reason = ""
        self.graphs: OrderedDict[CaptureKey, StaticGraph] = OrderedDict()
        self.signature: list[tuple[int, int]] | None = None
        self.watch = WeightWatch(net)
        self.captures = 0  # graphs captured so far (tests and benchmarks read it)
        self.compile = bool(compile)
        self.compile_failure = ""

    @property
    def net(self) -> nn.Module:
        return self._net[0]

    def applies(self, images: torch.Tensor) -> bool:
        """True when this call may be replayed: CUDA input, eval mode, no gradient, not given up."""
        net = self.net  # its children's modes count (NVPanoptix3D sets them, not the wrapper's own flag)
        return (images.is_cuda and not torch.is_grad_enabled() and self.level != "eager"
                and not net.backbone.training and not net.sem_seg_head.training)

    def invalidate(self) -> None:
        """Drop every capture and the low-precision weight copies (rebuilt on the next call)."""
        self.graphs.clear()
        self.signature = None
        cache_low_precision_weights(self.net, None)

    def release(self) -> None:
        """:meth:`invalidate`, and the network's parts back to their plain forwards if they were compiled here."""
        self.invalidate()
        if self.compile and is_compiled(self.net):
            compile_2d(self.net, enabled=False)

    def __call__(self, images: torch.Tensor) -> dict[str, Any]:
        signature = self.watch.signature()
        if signature != self.signature:
            self.invalidate()
        key = capture_key(images)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(key, images)
            if graph is None:  # gave up on graphs: eager from now on
                return self.net.forward_eager(images)
            self.signature = self.watch.signature()  # after the low-precision copies were made
        else:
            self.graphs.move_to_end(key)
        if self.level == "full":
            return _clone(graph(images))
        return self.net.forward_eager(images, backbone=lambda x: _clone(graph(x)))

    def _capture(self, key: CaptureKey, images: torch.Tensor) -> StaticGraph | None:
        amp = key[3]
        if amp is not None and not _has_low_precision(self.net, amp):
            # the graph reads these copies instead of casting every weight per replay; captures of other shapes
            # share them (made once per weight signature)
            cache_low_precision_weights(self.net, amp)
        while len(self.graphs) >= max(1, self.max_captures):
            self.graphs.popitem(last=False)
        if self.compile:  # compilation happens in the capture's warm-up calls: say why this one takes long
            if not is_compiled(self.net):
                compile_2d(self.net)
            self.say(f"inference.compile_2d: compiling the 2D network for input {tuple(images.shape)} (about a "
                     "minute for each new input size)")
        while self.level != "eager":
            try:
                graph = self._capture_level(images, amp)
            except Exception as exc:  # noqa: BLE001 - any capture failure means: one level less
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
                if self.compile:  # first without compilation, at the same level
                    self.compile_failure = reason
                    self.say(f"inference.compile_2d: capturing the compiled 2D network failed "
                             f"({self.compile_failure}); it runs uncompiled")
                    compile_2d(self.net, enabled=False)
                    self.compile = False
                    self.graphs.clear()
                    continue
                nxt = LEVELS[LEVELS.index(self.level) + 1]
                self.fallback_reason = reason
                self.say(f"cuda graphs: capturing the 2D network at level {self.level!r} failed "
                         f"({self.fallback_reason}); falling back to {nxt!r}")
                self.say(traceback.format_exc())
                self.graphs.clear()
                self.level = nxt
                continue
            self.graphs[key] = graph
            self.captures += 1
            return graph
        return None

    def _capture_level(self, images: torch.Tensor, amp: torch.dtype | None) -> StaticGraph:
        net = self.net
        if self.level == "full":
            return StaticGraph(net.forward_eager, images, autocast_dtype=amp, keep_alive=net,
                               capture_error_mode=CAPTURE_MODE)
        # backbone level: the graph takes the backbone input (``Panoptic2DNet.backbone_input``), whose shape
        # follows from the images' shape, so the images' capture key still identifies it
        return StaticGraph(net.backbone, net.backbone_input(images), autocast_dtype=amp, keep_alive=net.backbone,
                           capture_error_mode=CAPTURE_MODE)
