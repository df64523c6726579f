"""VGGT camera head: iterative refinement of a 9-value pose encoding per frame.

The encoding is ``[t (3), quaternion XYZW (4), fov_h, fov_w]`` (OpenCV camera-from-world). The head reads the
camera token of the last aggregator layer, normalises it, and runs ``num_iterations`` rounds of an
adaLN-modulated 4-block transformer trunk over the frames; each round adds a delta to the previous (detached)
prediction. Translation and quaternion are linear, the field of view goes through ReLU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .layers import Block, Mlp

POSE_ACTIVATIONS = ("linear", "exp", "relu", "inv_log")


def _activate(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "linear":
        return x
    if kind == "exp":
        return torch.exp(x)
    if kind == "relu":
        return F.relu(x)
    if kind == "inv_log":
        return torch.sign(x) * torch.expm1(torch.abs(x))
    raise ConfigError(f"unknown pose activation {kind!r}; choose one of {POSE_ACTIVATIONS}")


def activate_pose(pose: torch.Tensor, trans_act: str = "linear", quat_act: str = "linear",
                  fl_act: str = "relu") -> torch.Tensor:
    """Apply the per-part activations to a raw ``[..., 9]`` pose encoding."""
    return torch.cat(
        [_activate(pose[..., :3], trans_act), _activate(pose[..., 3:7], quat_act), _activate(pose[..., 7:], fl_act)],
        dim=-1,
    )


class CameraHead(nn.Module):
    """Predicts ``[B, S, 9]`` pose encodings (one per refinement iteration) from aggregator tokens."""

    def __init__(
        self,
        dim_in: int = 2048,
        trunk_depth: int = 4,
        pose_encoding_type: str = "absT_quaR_FoV",
        num_heads: int = 16,
        mlp_ratio: float = 4,
        init_values: float = 0.01,
        trans_act: str = "linear",
        quat_act: str = "linear",
        fl_act: str = "relu",
    ) -> None:
        super().__init__()
        if pose_encoding_type != "absT_quaR_FoV":
            raise ConfigError(f"unsupported pose_encoding_type {pose_encoding_type!r}; only 'absT_quaR_FoV'")
        self.target_dim = 9
        self.trans_act, self.quat_act, self.fl_act = trans_act, quat_act, fl_act
        self.trunk = nn.Sequential(
            *[Block(dim_in, num_heads, mlp_ratio=mlp_ratio, init_values=init_values) for _ in range(trunk_depth)]
        )
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, self.target_dim))
        self.embed_pose = nn.Linear(self.target_dim, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in, bias=True))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, self.target_dim)

    def forward(self, aggregated_tokens_list: Sequence[torch.Tensor | None], num_iterations: int = 4) -> list[torch.Tensor]:
        """Tokens of the last layer ``[B, S, P, 2C]`` -> list of ``num_iterations`` activated ``[B, S, 9]``."""
        pose_tokens = self.token_norm(aggregated_tokens_list[-1][:, :, 0])
        batch, frames, _ = pose_tokens.shape
        pred = None
        preds = []
        for _ in range(num_iterations):
            if pred is None:
                cond = self.embed_pose(self.empty_pose_tokens.expand(batch, frames, -1))
            else:
                pred = pred.detach()
                cond = self.embed_pose(pred)
            shift, scale, gate = self.poseLN_modulation(cond).chunk(3, dim=-1)
            modulated = gate * (self.adaln_norm(pose_tokens) * (1 + scale) + shift) + pose_tokens
            delta = self.pose_branch(self.trunk_norm(self.trunk(modulated)))
            pred = delta if pred is None else pred + delta
            preds.append(activate_pose(pred, self.trans_act, self.quat_act, self.fl_act))
        return preds
