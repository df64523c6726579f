"""The lifting plane of the 3D stage: the 2D network's outputs resampled to ``dataset.reduced_target_size``.

:func:`to_plane` turns the frozen 2D network's raw outputs into :class:`PlaneInputs` (semantic scores, depth,
multi-plane occupancy, mask features, projected depth features, queries) for lifting; :class:`ProjectionBlock`
is the trainable depth-feature projection (the toolkit's ``projector``). Its 2D part, :func:`plane_2d`
(:class:`Plane2D`: panoptic segmentation, semantic scores and depth on the plane), needs no 3D weights: a 2D-only
``nvp3d inference`` run calls it alone.

Test-time flip of the 3D stage (``model.frustum3d.test_time_flip``): when the raw outputs carry the same network's
outputs on the horizontally mirrored images under :data:`FLIPPED` (:meth:`nvp3d.model.net3d.NVPanoptix3D.infer_2d`
puts them there), the plane's depth and multi-plane occupancy probabilities are the means of both passes (the
mirrored maps flipped back) before the lifting: the geometry the 3D stage lifts at. Everything of the queries (class
and mask logits, hence the 2D panoptic result) and the feature maps stay the plain pass's: averaging the queries'
class and mask probabilities too, query by query, cost 4.3 held-out PRQ on the GPU benchmark (stop 57).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from maskformer_head.postprocess import panoptic_inference, resize_mask_logits
from torch import nn

__all__ = ["FLIPPED", "Plane2D", "PlaneInputs", "ProjectionBlock", "crop_resize", "mean_probability_logits", "plane_2d",
           "to_plane"]

#: key of the raw 2D outputs under which the mirrored pass's outputs travel (test-time flip)
FLIPPED = "flipped"


def crop_resize(maps: torch.Tensor, padded_hw: Sequence[int], image_hw: Sequence[int], out_hw: Sequence[int],
                mode: str = "bilinear") -> torch.Tensor:
    """``[B, C, h, w]`` maps covering the padded image -> ``[B, C, *out_hw]`` covering the unpadded image.

    The map is resized so that one padded-image pixel maps to ``out/image`` of an output pixel, then cropped;
    this equals resize-to-padded, crop, resize-to-output for bilinear maps up to interpolation error, without
    materialising the full-resolution map.
    """
    ph, pw = padded_hw
    ih, iw = image_hw
    oh, ow = out_hw
    th, tw = max(oh, round(ph * oh / ih)), max(ow, round(pw * ow / iw))
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    x = F.interpolate(maps, size=(th, tw), mode=mode, **kw)
    return x[..., :oh, :ow]


class ProjectionBlock(nn.Module):
    """Depth-feature projection of the toolkit's 3D stage (``projector``): the coarsest DPT fusion map
    ``[B, depth_dim, h, w]`` -> conv3x3 + GroupNorm + ReLU -> bilinear to the mask-feature size -> conv1x1
    -> ``[B, out_channels, H, W]`` (concatenated with the mask features before lifting)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 8) -> None:
        super().__init__()
        g = groups if out_channels % groups == 0 else 1
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(g, out_channels)
        self.out = nn.Conv2d(out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        y = F.relu(self.norm(self.conv(x)))
        y = F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False)
        return self.out(y)


@dataclass
class PlaneInputs:
    """2D quantities on the lifting plane (``[B, ...]``) plus what the 3D head and the fusion need."""

    semantic: torch.Tensor  # [B, K, h, w] per-class scores (toolkit sem_seg)
    depth: torch.Tensor  # [B, h, w] metres
    occupancy: torch.Tensor  # [B, bins, h, w] multi-plane occupancy logits
    mask_features: torch.Tensor  # [B, mask_dim, h, w]
    depth_features: torch.Tensor  # [B, feature_dim, h, w] (projector output, trainable)
    ms_features: list[torch.Tensor]  # 3 x [B, conv_dim, ...] (strides 2/4/8 of the grid), finest first
    queries: torch.Tensor  # [B, Q, hidden]
    class_logits: torch.Tensor  # [B, Q, K+1]
    panoptic_2d: list[tuple[torch.Tensor, list[dict]]]  # per image (panoptic map on the plane, segments)
    mask_logits: torch.Tensor | None = None  # [B, Q, h, w] query mask logits on the plane (the 3D mask prior)


@dataclass
class Plane2D:
    """The 2D prediction on the lifting plane (``[B, ...]``): what the 2D outputs of ``nvp3d inference`` show, and
    the part of :class:`PlaneInputs` that needs no 3D weights."""

    semantic: torch.Tensor  # [B, K, h, w] per-class scores (toolkit sem_seg)
    depth: torch.Tensor  # [B, h, w] metres
    panoptic_2d: list[tuple[torch.Tensor, list[dict]]]  # per image (panoptic map on the plane, segments)
    mask_logits: torch.Tensor  # [B, Q, h, w] query mask logits on the plane
    class_logits: torch.Tensor  # [B, Q, K+1] float32


def plane_2d(out2d: dict[str, Any], image_hw: Sequence[int], plane_size: Sequence[int], *, num_classes: int,
             thing_ids: Sequence[int], object_mask_threshold: float, overlap_threshold: float,
             depth_scale: float) -> Plane2D:
    """The 2D network's raw outputs -> panoptic segmentation and depth on the lifting plane (``plane_size`` (W, H)).

    Mask logits and depth are resized to the padded image, cropped to the image and resized to the plane;
    panoptic post-processing (with the toolkit's void back-fill) gives the segments and per-class semantic scores.
    Split from :func:`to_plane` so that a run that writes only 2D files gets them without the 3D stage, from the
    very same arithmetic (its files equal those of a full run)."""
    pw, ph = plane_size
    plane_hw = (ph, pw)
    image_hw = tuple(int(v) for v in image_hw)
    with torch.no_grad():
        logits, masks, depth = _plane_masks_depth(out2d, image_hw, plane_hw, depth_scale)
        flipped = out2d.get(FLIPPED)
        if flipped is not None:  # test-time flip: the depth of both passes averaged (the queries stay the plain pass's)
            depth = (depth + _plane_depth(flipped, image_hw, plane_hw, depth_scale).flip(-1)) * 0.5
        sem, pan = [], []
        for b in range(logits.shape[0]):
            res = panoptic_inference(logits[b], masks[b], num_classes=num_classes, thing_ids=thing_ids,
                                     object_mask_threshold=object_mask_threshold,
                                     overlap_threshold=overlap_threshold, fill_void_with_stuff=True)
            sem.append(res.semantic_probs)
            pan.append((res.panoptic_seg, res.segments_info))
    return Plane2D(semantic=torch.stack(sem), depth=depth, panoptic_2d=pan, mask_logits=masks, class_logits=logits)


def mean_probability_logits(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Logits whose sigmoid is the mean of ``a``'s and ``b``'s (``eps`` keeps them finite)."""
    return torch.logit((a.sigmoid() + b.sigmoid()).mul(0.5).clamp(eps, 1.0 - eps))


def _plane_masks_depth(out2d: dict[str, Any], image_hw: tuple[int, int], plane_hw: tuple[int, int],
                       depth_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass's class logits ``[B, Q, K+1]``, query mask logits ``[B, Q, h, w]`` and depth ``[B, h, w]`` on the
    plane (resized to the padded image, cropped to the image, resized to the plane)."""
    padded = tuple(int(v) for v in out2d["padded_size"])
    logits = out2d["pred_logits"].float()
    masks = torch.stack([resize_mask_logits(m.float(), padded, image_hw, plane_hw) for m in out2d["pred_masks"]])
    return logits, masks, _plane_depth(out2d, image_hw, plane_hw, depth_scale)


def _plane_depth(out2d: dict[str, Any], image_hw: tuple[int, int], plane_hw: tuple[int, int],
                 depth_scale: float) -> torch.Tensor:
    """One pass's depth ``[B, h, w]`` on the plane, clamped to ``[0, depth_scale]``."""
    padded = tuple(int(v) for v in out2d["padded_size"])
    depth = F.interpolate(out2d["pred_depths"].float(), size=padded, mode="bilinear", align_corners=False)
    depth = depth[:, :, : image_hw[0], : image_hw[1]]
    depth = F.interpolate(depth, size=plane_hw, mode="bilinear", align_corners=False)[:, 0]
    return depth.clamp(0.0, depth_scale)


def to_plane(out2d: dict[str, Any], image_hw: Sequence[int], plane_size: Sequence[int], *, projector: nn.Module,
             num_classes: int, thing_ids: Sequence[int], object_mask_threshold: float, overlap_threshold: float,
             depth_scale: float, use_multi_scale: bool) -> PlaneInputs:
    """The 2D network's raw outputs -> :class:`PlaneInputs` on the lifting plane (``plane_size`` (W, H)).

    The 2D prediction comes from :func:`plane_2d`; feature maps are cropped/resized the same way. Only
    ``projector`` (trainable) runs with gradients.
    """
    pw, ph = plane_size
    plane_hw = (ph, pw)
    padded = tuple(int(v) for v in out2d["padded_size"])
    image_hw = tuple(int(v) for v in image_hw)
    p2 = plane_2d(out2d, image_hw, plane_size, num_classes=num_classes, thing_ids=thing_ids,
                  object_mask_threshold=object_mask_threshold, overlap_threshold=overlap_threshold,
                  depth_scale=depth_scale)
    with torch.no_grad():
        occ = out2d["occupancy_logits"]
        if occ is None:
            raise ValueError("the 3D stage needs the multi-plane occupancy head (dataset.enable_mp_occ: true)")
        occ = _plane_occupancy(occ, plane_hw)
        flipped = out2d.get(FLIPPED)
        if flipped is not None:  # test-time flip: the occupancy probabilities of both passes averaged
            occ = mean_probability_logits(occ, _plane_occupancy(flipped["occupancy_logits"], plane_hw).flip(-1))
        mask_feats = crop_resize(out2d["mask_features"].float(), padded, image_hw, plane_hw)
        ms = []
        if use_multi_scale:
            # enc_features are coarsest first (1/32, 1/16, 1/8); the grid levels go finest first
            # (each map covers the padded image: crop it to the image like the other plane inputs)
            for f in reversed(list(out2d["enc_features"])):
                ms.append(crop_resize(f.float(), padded, image_hw, plane_hw))
    depth_in = out2d["depth_features"].detach().float()
    mf_size = tuple(out2d["mask_features"].shape[-2:])
    depth_feats = crop_resize(projector(depth_in, mf_size), padded, image_hw, plane_hw)
    return PlaneInputs(semantic=p2.semantic, depth=p2.depth, occupancy=occ, mask_features=mask_feats,
                       depth_features=depth_feats, ms_features=ms, queries=out2d["segm_decoder_out"].float(),
                       class_logits=p2.class_logits, panoptic_2d=p2.panoptic_2d, mask_logits=p2.mask_logits)


def _plane_occupancy(occ: torch.Tensor, plane_hw: tuple[int, int]) -> torch.Tensor:
    """Multi-plane occupancy logits ``[B, bins, h', w']`` at the plane size (float32)."""
    occ = occ.float()
    if tuple(occ.shape[-2:]) != plane_hw:
        occ = F.interpolate(occ, size=plane_hw, mode="bilinear", align_corners=False)
    return occ
