"""``torch.compile`` of the 2D network's parts for graphed inference (``inference.compile_2d``).

A CUDA-graph replay (:mod:`nvp3d.model.graphed2d`) removes the launch cost of the 2D network's ~4000 kernels but
not the kernels themselves: at batch 1 most are small element-wise steps around the matrix products (casts,
layer norms, RoPE, residual adds, the fp32 pixel decoder's up-sampling). Compiled with TorchInductor those
steps fuse into fewer kernels, and the graph then captures the compiled code. Measured on one H200 (full
preset, 320x240, bf16, graphed, random weights): the 2D network's replay 31.8 -> 20.6 ms at batch 1 (4000 ->
2395 kernels) and 84.4 -> 58.5 ms at batch 4, at the price of about a minute of compilation per input size
on first use.

What is compiled (:func:`compiled_parts`): each transformer block of the VGGT aggregator (all blocks share one
compiled program), the DPT depth head, and each part of the MaskFormer head (adapter, pixel decoder,
transformer decoder, depth projector, occupancy head). The modules are compiled in place
(``nn.Module.compile``), so parameter names, the state_dict and the weight signature of the graph cache are
unchanged; :func:`compile_2d` with ``enabled=False`` restores the plain forwards. While they are compiled, every
call of these modules runs the compiled code, eager calls included (the Predictor makes evaluation-mode, no-grad
calls only); a new input size compiles again, and so may a weight reload (new bf16 weight copies).

Numerics: fused kernels keep intermediates in fp32 where the eager bf16 path rounds them, so outputs move by
about the size of bf16 rounding (relative L2 difference of the 2D outputs against the fp32 forward: 0.036-0.063
compiled, 0.050 plain bf16, on random weights).
"""

from __future__ import annotations

from torch import nn

__all__ = ["compile_2d", "compiled_parts", "is_compiled"]


def compiled_parts(net: nn.Module) -> list[nn.Module]:
    """The sub-modules of a :class:`~nvp3d.model.net2d.Panoptic2DNet` that :func:`compile_2d` compiles."""
    aggregator = net.backbone.aggregator
    blocks = [*aggregator.frame_blocks, *aggregator.global_blocks]
    return [*blocks, net.backbone.depth_head, *net.sem_seg_head.children()]


def compile_2d(net: nn.Module, enabled: bool = True) -> int:
    """Compile (or with ``enabled=False`` un-compile) :func:`compiled_parts` in place; returns how many.

    Static shapes (``dynamic=False``): each input size compiles once, as each gets its own CUDA graph."""
    parts = compiled_parts(net)
    for module in parts:
        if enabled:
            module.compile(dynamic=False)
        else:
            module._compiled_call_impl = None  # what nn.Module.compile set; the plain forward again
    return len(parts)


def is_compiled(net: nn.Module) -> bool:
    """True when every part of :func:`compiled_parts` runs compiled."""
    return all(getattr(m, "_compiled_call_impl", None) is not None for m in compiled_parts(net))
