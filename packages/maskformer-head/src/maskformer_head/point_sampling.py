"""Point sampling for the mask costs and losses, with an injectable random source.

Both the matcher (uniform points) and the criterion (importance-sampled points) draw random
coordinates; a `RandomSource` decides where they come from so tests can be deterministic:
`TorchRandom` draws ``torch.rand`` (optionally from a given generator) and `TapeRandom`
replays stored tensors in order, checking each requested shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F


class RandomSource(Protocol):
    """Returns a uniform [0, 1) tensor of the requested shape on ``device`` with ``dtype``."""

    def __call__(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor: ...


class TorchRandom:
    """``torch.rand`` on the target device (the reference behaviour), or from ``generator``."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, shape, device, dtype):
        if self.generator is None:
            return torch.rand(shape, device=device, dtype=dtype)
        gen_device = self.generator.device
        return torch.rand(shape, generator=self.generator, device=gen_device, dtype=dtype).to(device)


class TapeRandom:
    """Replays pre-recorded uniform tensors in order (e.g. the golden ``rand_tape``)."""

    def __init__(self, tape: Sequence[torch.Tensor]) -> None:
        self.tape = list(tape)
        self.position = 0

    def __call__(self, shape, device, dtype):
        if self.position >= len(self.tape):
            raise IndexError(f"TapeRandom exhausted after {len(self.tape)} draws (asked for {tuple(shape)})")
        t = self.tape[self.position]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"TapeRandom draw {self.position}: tape has {tuple(t.shape)}, asked for {tuple(shape)}")
        self.position += 1
        return t.to(device=device, dtype=dtype)

    @property
    def exhausted(self) -> bool:
        return self.position == len(self.tape)


def default_random() -> RandomSource:
    return TorchRandom()


def sampling_dtype(t: torch.Tensor) -> torch.dtype:
    """Point coordinates and sampled logits stay float32 (float64 for float64 inputs), as the
    reference draws ``torch.rand`` in the default dtype even when masks are half precision."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def point_sample(inputs: torch.Tensor, point_coords: torch.Tensor, **kwargs) -> torch.Tensor:
    """Bilinearly sample ``inputs [N, C, H, W]`` at ``point_coords [N, P, 2]`` ((x, y) in [0, 1]);
    returns ``[N, C, P]``. Extra keyword arguments go to ``grid_sample``."""
    add_dim = point_coords.dim() == 3
    if add_dim:
        point_coords = point_coords.unsqueeze(2)
    out = F.grid_sample(inputs, 2.0 * point_coords - 1.0, **kwargs)
    return out.squeeze(3) if add_dim else out


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of a binary mask logit: closer to 0 is more uncertain (``-|logit|``)."""
    return -logits.abs()


def uncertain_point_coords_with_randomness(
    coarse_logits: torch.Tensor,
    uncertainty_func: Callable[[torch.Tensor], torch.Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    rand: RandomSource | None = None,
) -> torch.Tensor:
    """PointRend importance sampling: oversample uniformly, keep the most uncertain
    ``int(importance_sample_ratio*num_points)``, fill up with fresh uniform points.

    ``coarse_logits [R, 1, H, W]`` -> ``[R, num_points, 2]``. Draws ``[R, int(num_points*
    oversample_ratio), 2]`` then ``[R, num_points - n_uncertain, 2]`` from ``rand``."""
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    rand = rand or default_random()
    coarse_logits = coarse_logits.to(sampling_dtype(coarse_logits))
    num_boxes = coarse_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = rand((num_boxes, num_sampled, 2), coarse_logits.device, coarse_logits.dtype)
    point_logits = point_sample(coarse_logits, coords, align_corners=False)
    point_uncertainties = uncertainty_func(point_logits)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(point_uncertainties[:, 0, :], k=num_uncertain, dim=1)[1]
    shift = num_sampled * torch.arange(num_boxes, dtype=torch.long, device=coarse_logits.device)
    idx = idx + shift[:, None]
    coords = coords.reshape(-1, 2)[idx.reshape(-1), :].view(num_boxes, num_uncertain, 2)
    if num_random > 0:
        extra = rand((num_boxes, num_random, 2), coarse_logits.device, coarse_logits.dtype)
        coords = torch.cat([coords, extra], dim=1)
    return coords
