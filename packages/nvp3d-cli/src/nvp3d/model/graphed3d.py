"""CUDA-graph replay of the 3D decoder's dense part (``inference.cuda_graphs``).

Between its sparse levels the completion decoder runs a dense step whose shapes depend only on the batch size
(:meth:`frustum3d.decoder.FrustumDecoder.dense_levels`: the 32^3 .. 8^3 encoders, the dense up-path back to
64^3 and the level-64 heads). At batch 1 the 3D part of inference is bound by the host's launch work, not by the
device (stop 44 profile: the device was busy 38 % of the decoder's time), so this step is captured once per
capture key (input shapes, dtypes, device, autocast state) with :class:`backbone_vggt.StaticGraph` and replayed.
The sparse levels around it keep running eagerly: their shapes change with every frame.

It applies in the decoder's evaluation-mode, no-grad calls on CUDA (the decoder only consults
``dense_runner`` then); anything else, or a capture that fails, runs the eager method (a failure is said once
and ends graph use for this decoder).

Staleness: the graph reads the weights' storage at replay time (under autocast the weight casts are part of the
graph), so in-place updates are seen; a replaced parameter or a ``.to()`` changes the weight signature
(:class:`nvp3d.model.graphed2d.WeightWatch`) and drops every capture.

Outputs: ``occupancy_64`` and ``panoptic_64`` are cloned out of the graph's buffers (the decoder returns them);
``u64`` is not: the decoder reads it before its forward returns (the kept level-64 voxels are gathered from it
into a new tensor), and the next replay overwrites it.
"""

from __future__ import annotations

import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from backbone_vggt import StaticGraph
from torch import Tensor, nn

from .graphed2d import CAPTURE_MODE, WeightWatch

__all__ = ["GraphedDenseLevels"]


class GraphedDenseLevels:
    """``GraphedDenseLevels(decoder)(*dense_inputs) -> decoder.dense_levels(*dense_inputs)`` (module docstring).

    Args:
        decoder: a :class:`frustum3d.decoder.FrustumDecoder` (anything with ``dense_levels``).
        max_captures: captures kept, least recently used dropped first (each holds its own memory pool).
        say: where the one-line notice of a failed capture goes.
    """

    def __init__(self, decoder: nn.Module, *, max_captures: int = 4, say: Callable[[str], None] = print) -> None:
        self._decoder = [decoder]  # a list: not registered as a sub-module (the decoder holds this object)
        self.max_captures = int(max_captures)
        self.say = say
        self.graphs: OrderedDict[tuple[Any, ...], StaticGraph] = OrderedDict()
        self.watch = WeightWatch(decoder)
        self.signature: list[tuple[int, int]] | None = None
        self.fallback_reason = ""
        self.captures = 0  # graphs captured so far (tests and benchmarks read it)

    @property
    def decoder(self) -> nn.Module:
        return self._decoder[0]

    def applies(self, inputs: tuple[Tensor, ...]) -> bool:
        """True when this call may be replayed: CUDA inputs and no earlier capture failure (the decoder only
        calls in evaluation mode without gradients)."""
        return not self.fallback_reason and all(t.is_cuda for t in inputs)

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        eager = self.decoder.dense_levels
        if not self.applies(inputs):
            return eager(*inputs)
        signature = self.watch.signature()
        if signature != self.signature:
            self.graphs.clear()
            self.signature = signature
        amp = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (tuple((tuple(t.shape), t.dtype, t.device) for t in inputs), amp)
        graph = self.graphs.get(key)
        if graph is None:
            while len(self.graphs) >= max(1, self.max_captures):
                self.graphs.popitem(last=False)
            try:
                graph = StaticGraph(eager, tuple(inputs), autocast_dtype=amp, capture_error_mode=CAPTURE_MODE)
            except Exception as exc:  # noqa: BLE001 - any capture failure means: eager from now on
                self.fallback_reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
                self.say(f"cuda graphs: capturing the 3D decoder's dense levels failed ({self.fallback_reason}); "
                         "they run eagerly from now on")
                self.say(traceback.format_exc())
                self.graphs.clear()
                return eager(*inputs)
            self.graphs[key] = graph
            self.captures += 1
        else:
            self.graphs.move_to_end(key)
        u64, occ64, pan64 = graph(*inputs)
        return u64, occ64.clone(), pan64.clone()
