"""CUDA-graph replay of an inference forward for one fixed input shape.

Single-frame inference at 364x448 is bound by kernel launches, not arithmetic (see the package README):
capturing the whole forward once and replaying it removes the per-kernel launch cost. The aggregator's
forward has no host synchronisation (RoPE table sizes come from the grid, the DINO position table is cached
per size), which is what makes it capturable.

* :class:`StaticGraph` captures any callable ``fn(x) -> outputs`` (tensors, or lists/tuples/dicts of them and
  plain Python values) for one input shape, dtype and device, under a fixed autocast setting. Composed models
  (``nvp3d``'s 2D network) use it to capture more than the aggregator.
* :class:`GraphedAggregator` is a :class:`StaticGraph` of a frozen :class:`~backbone_vggt.aggregator.Aggregator`.

The replayed outputs live in static buffers that the next call overwrites; clone them if you keep them.
Weights are read by the graph from their storage at replay time, so in-place weight updates are seen, but any
value computed from the weights at capture time (for example :func:`~backbone_vggt.layers.cache_low_precision_weights`
copies) is frozen into the graph: re-capture after changing weights.

Cached tensors that the capture read but did not allocate (the DINO position table, low-precision weight copies)
live outside the graph's memory pool: if their module later drops them (a new size evicts the position table,
``.to()`` drops the weight copies), the allocator could hand their memory to something else while the graph
still reads it. ``keep_alive=module`` holds a reference to every tensor attribute of the module's sub-modules
(and those in their dicts, lists and tuples) for the graph's lifetime, so that cannot happen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .aggregator import Aggregator
from .errors import BackboneInputError


def held_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every tensor an attribute of ``module`` or of a sub-module holds (directly, or in a dict, list or tuple)."""
    out: list[torch.Tensor] = []
    for sub in module.modules():
        for value in vars(sub).values():
            items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else (value,)
            out += [v for v in items if isinstance(v, torch.Tensor)]
    return out


class StaticGraph:
    """``StaticGraph(fn, example, autocast_dtype=None)(x) -> fn(x)`` replayed from one captured CUDA graph.

    ``example`` fixes the input's shape, dtype and device (CUDA). A tuple of tensors captures ``fn(*inputs)``
    for that many inputs, called the same way (``graph(a, b, ...)``). ``autocast_dtype`` runs the capture under
    ``torch.autocast("cuda", dtype=...)`` (``None``: autocast off, whatever the caller's context is). The
    capture runs under ``no_grad``; ``warmup`` eager calls on a side stream come first (they fill lazily built
    caches outside the capture). ``pool`` is an optional ``torch.cuda.graph_pool_handle()`` to share memory
    between graphs that are never replayed concurrently. ``keep_alive``: the module(s) whose cached tensors the
    graph may read (module docstring). ``capture_error_mode`` is ``torch.cuda.graph``'s: ``"thread_local"``
    lets other threads (a DataLoader's pin-memory thread, file writers) keep calling CUDA while this thread
    captures; ``"global"`` (torch's default) makes such calls fail the capture.
    """

    def __init__(self, fn: Callable[..., Any], example: torch.Tensor | tuple[torch.Tensor, ...],
                 autocast_dtype: torch.dtype | None = None, warmup: int = 3, pool: Any = None,
                 keep_alive: nn.Module | None = None, capture_error_mode: str = "global") -> None:
        examples = example if isinstance(example, tuple) else (example,)
        if not examples or not all(e.is_cuda for e in examples):
            raise BackboneInputError("CUDA graphs need CUDA tensors")
        self.fn = fn
        self.autocast_dtype = autocast_dtype
        self.static_inputs = tuple(e.detach().clone() for e in examples)
        self.static_input = self.static_inputs[0]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode=capture_error_mode):
            self.static_output = self._run()
        self.kept = held_tensors(keep_alive) if keep_alive is not None else []

    def _run(self) -> Any:
        # autocast's weight-cast cache must be off while capturing (the cache would outlive the graph)
        amp = (torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)
               if self.autocast_dtype is not None else torch.autocast("cuda", enabled=False))
        with torch.no_grad(), amp:
            return self.fn(*self.static_inputs)

    def matches(self, *x: torch.Tensor) -> bool:
        """True when the input(s) have the captured shapes, dtypes and device."""
        return len(x) == len(self.static_inputs) and all(
            a.shape == s.shape and a.dtype == s.dtype and a.device == s.device
            for a, s in zip(x, self.static_inputs, strict=True))

    def __call__(self, *x: torch.Tensor) -> Any:
        if not self.matches(*x):
            def shapes(ts) -> str:
                return ", ".join(f"{tuple(t.shape)} {t.dtype} on {t.device}" for t in ts)
            raise BackboneInputError(f"captured for {shapes(self.static_inputs)}, got {shapes(x)}; capture another "
                                     "graph for this input")
        for static, value in zip(self.static_inputs, x, strict=True):
            static.copy_(value)
        self.graph.replay()
        return self.static_output


class GraphedAggregator(StaticGraph):
    """``GraphedAggregator(agg, example_images, autocast_dtype=torch.bfloat16)(images) -> (tokens, start)``.

    ``agg`` must be on CUDA and in eval mode; ``images`` must have the example's shape, dtype and device.
    """

    def __init__(self, aggregator: Aggregator, example_images: torch.Tensor,
                 autocast_dtype: torch.dtype | None = None, warmup: int = 3) -> None:
        if not example_images.is_cuda:
            raise BackboneInputError("GraphedAggregator needs CUDA tensors (CUDA graphs)")
        if aggregator.training:
            raise BackboneInputError("GraphedAggregator is for inference: call aggregator.eval() first")
        self.aggregator = aggregator
        super().__init__(aggregator, example_images, autocast_dtype=autocast_dtype, warmup=warmup,
                         keep_alive=aggregator)
        self.static_images = self.static_input
        self.static_tokens, self.patch_start_idx = self.static_output

    def __call__(self, images: torch.Tensor) -> tuple[list[torch.Tensor | None], int]:
        if images.shape != self.static_images.shape or images.dtype != self.static_images.dtype:
            raise BackboneInputError(
                f"captured for {tuple(self.static_images.shape)} {self.static_images.dtype}, got "
                f"{tuple(images.shape)} {images.dtype}; build another GraphedAggregator for this size"
            )
        return super().__call__(images)
