"""CUDA-graph replay of a frozen aggregator for one fixed input shape (inference only).

Single-frame inference at 364x448 is bound by kernel launches, not arithmetic (see the package README):
capturing the whole forward once and replaying it removes the per-kernel launch cost. The aggregator's
forward has no host synchronisation (RoPE table sizes come from the grid, the DINO position table is cached
per size), which is what makes it capturable.

The replayed outputs live in static buffers that the next call overwrites; clone them if you keep them.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from .aggregator import Aggregator
from .errors import BackboneInputError


class GraphedAggregator:
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
        self.autocast_dtype = autocast_dtype
        self.static_images = example_images.detach().clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):  # also fills the position-table cache outside the capture
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_tokens, self.patch_start_idx = self._forward()

    def _forward(self):
        # autocast's weight-cast cache must be off while capturing (the cache would outlive the graph)
        amp = (torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)
               if self.autocast_dtype is not None else nullcontext())
        with torch.no_grad(), amp:
            return self.aggregator(self.static_images)

    def __call__(self, images: torch.Tensor) -> tuple[list[torch.Tensor | None], int]:
        if images.shape != self.static_images.shape or images.dtype != self.static_images.dtype:
            raise BackboneInputError(
                f"captured for {tuple(self.static_images.shape)} {self.static_images.dtype}, got "
                f"{tuple(images.shape)} {images.dtype}; build another GraphedAggregator for this size"
            )
        self.static_images.copy_(images)
        self.graph.replay()
        return self.static_tokens, self.patch_start_idx
