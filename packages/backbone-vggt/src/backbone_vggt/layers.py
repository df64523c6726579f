"""Transformer building blocks shared by the DINOv2 patch embed, the aggregator and the camera head.

Parameter names (``norm1``, ``attn.qkv``, ``attn.q_norm``, ``ls1.gamma``, ``mlp.fc1`` ...) follow the released
VGGT checkpoint so that its state_dict loads without renaming.

Attention backends (``Attention.backend``):
* ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention``, what the reference runs.
* ``"xformers"``: ``xformers.ops.memory_efficient_attention`` when xformers is importable and the tensors are
  on CUDA; otherwise it falls back to SDPA.
* ``"math"``: explicit ``softmax(q k^T / sqrt(d)) v``, useful as a readable check.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .rope import RotaryPositionEmbedding2D

ATTENTION_BACKENDS = ("sdpa", "xformers", "math")

RopeTables = tuple[torch.Tensor, torch.Tensor]  # cos, signed sin (RotaryPositionEmbedding2D.rotate)


def xformers_available() -> bool:
    """True when the optional ``xformers`` package can be imported (``backbone-vggt[cuda]`` extra)."""
    return importlib.util.find_spec("xformers") is not None


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """xformers memory-efficient attention on ``[B, heads, N, D]`` tensors (it wants ``[B, N, heads, D]``)."""
    import xformers.ops as xops

    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Explicit attention with the default 1/sqrt(head_dim) scale."""
    scale = q.shape[-1] ** -0.5
    weights = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)
    return weights @ v


class Linear(nn.Linear):
    """``nn.Linear`` that can keep a low-precision copy of its weights for autocast inference.

    Under ``torch.autocast(dtype=d)`` a linear layer casts its fp32 weight and bias to ``d`` on every call.
    After ``cache_low_precision(d)`` the cast copies are made once and reused while autocast uses ``d`` and the
    weights are unchanged: the result is bit-identical to plain autocast, minus the per-call cast kernels
    (about 1.8 GB of bf16 writes per VGGT-1B forward). Not in the state_dict.
    """

    _lp_weight: torch.Tensor | None = None
    _lp_bias: torch.Tensor | None = None
    _lp_version: tuple[int, int] | None = None

    def _versions(self) -> tuple[int, int]:
        return (self.weight._version, -1 if self.bias is None else self.bias._version)

    def cache_low_precision(self, dtype: torch.dtype | None) -> None:
        """Make (or with ``None`` drop) the cast copies of weight and bias."""
        if dtype is None:
            self._lp_weight = self._lp_bias = self._lp_version = None
            return
        with torch.no_grad():
            self._lp_weight = self.weight.detach().to(dtype)
            self._lp_bias = None if self.bias is None else self.bias.detach().to(dtype)
        self._lp_version = self._versions()

    def _apply(self, fn, recurse=True):  # .to()/.cuda() invalidate the copies
        self._lp_weight = self._lp_bias = self._lp_version = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lp = self._lp_weight
        if lp is not None and not (torch.is_grad_enabled() and self.weight.requires_grad):
            device = x.device.type
            if (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == lp.dtype
                    and lp.device == x.device and self._lp_version == self._versions()):
                return F.linear(x.to(lp.dtype), lp, self._lp_bias)
        return super().forward(x)


def cache_low_precision_weights(module: nn.Module, dtype: torch.dtype | None = torch.bfloat16) -> nn.Module:
    """Keep ``dtype`` copies of every ``Linear`` weight in ``module`` for autocast inference (``None`` drops them).

    Outputs under ``torch.autocast(dtype=dtype)`` are unchanged bit for bit; used only while no gradient
    flows into the weights. Costs ``dtype``-sized extra memory (about 1.8 GB for the VGGT-1B aggregator).
    """
    for sub in module.modules():
        if isinstance(sub, Linear):
            sub.cache_low_precision(dtype)
    return module


class LayerScale(nn.Module):
    """Per-channel learnable scaling of a residual branch (``gamma``, initialised to ``init_values``)."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (the transformer feed-forward)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        bias: bool = True,
        act_layer: Callable[[], nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with optional per-head q/k LayerNorm and optional 2D RoPE.

    The RoPE tables are passed in by the caller (computed once per forward for all blocks).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
        rope: RotaryPositionEmbedding2D | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ConfigError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = Linear(dim, dim, bias=proj_bias)
        self.rope = rope
        self.backend = "sdpa"

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.backend == "math":
            return _math_attention(q, k, v)
        if self.backend == "xformers" and q.is_cuda and xformers_available():
            # xformers wants matching dtypes; under autocast q/k leave the q/k LayerNorm in fp32.
            dtype = v.dtype
            if torch.is_autocast_enabled("cuda"):
                dtype = torch.get_autocast_dtype("cuda")
            return _xformers_attention(q.to(dtype), k.to(dtype), v.to(dtype))
        return F.scaled_dot_product_attention(q, k, v)

    def forward(self, x: torch.Tensor, rope: RopeTables | None = None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and rope is not None:
            cos, signed_sin = rope  # the aggregator's tables: sin with rotate_half's signs folded in
            q = self.rope.rotate(q, cos, signed_sin)
            k = self.rope.rotate(k, cos, signed_sin)
        out = self._attend(q, k, v)
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: float | None = None,
        norm_eps: float = 1e-5,
        qk_norm: bool = False,
        rope: RotaryPositionEmbedding2D | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, qk_norm=qk_norm, rope=rope)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor, rope: RopeTables | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope=rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


def set_attention_backend(module: nn.Module, backend: str) -> nn.Module:
    """Select the attention implementation of every ``Attention`` inside ``module`` (returns ``module``).

    ``"xformers"`` requires the optional xformers package; it is only used for CUDA tensors.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
    if backend == "xformers" and not xformers_available():
        raise ConfigError("attention backend 'xformers' needs the xformers package: pip install 'backbone-vggt[cuda]'")
    for sub in module.modules():
        if isinstance(sub, Attention):
            sub.backend = backend
    return module
