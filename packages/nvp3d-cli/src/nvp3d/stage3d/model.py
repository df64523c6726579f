"""The 3D stage of NVPanoptix3D on top of the frozen 2D network (toolkit section 4.2).

Data flow of :class:`Panoptic3DModel.forward` for a batch of RGB frames:

1. **2D inference** (frozen, ``no_grad``, eval mode): the composed 2D network
   (:class:`nvp3d.model.nvpanoptix3d.NVPanoptix3D`) gives class logits, mask logits, depth, multi-plane
   occupancy logits, mask features, the coarsest depth features and the query embeddings.
2. **Reduced plane** (:meth:`Panoptic3DModel.plane`): mask logits and depth are resized to the padded image,
   cropped to the image and resized to the lifting plane (``dataset.reduced_target_size``, 160x120 for
   front3d); panoptic post-processing (with the toolkit's void back-fill) gives per-class semantic scores;
   2D feature maps are cropped/resized the same way.
3. **Lifting** (:mod:`frustum3d.lifting`): projective TSDF lifting of ``[mask features, projected depth
   features]`` + semantics (7 copies along the ray), BUOL occupancy-aware lifting of
   ``[semantics, occupancy, sign, |d|]``, coordinate union of both; optionally the multi-scale levels.
4. **Completion** (:class:`frustum3d.decoder.FrustumDecoder`): occupancy at three levels, the TDF and per-query
   3D mask logits (dot products with the 2D query embeddings, through the decoder's query projections).

Trainable: ``projector`` (the depth-feature projection block) and ``completion`` (the U-Net with its query
projections). Everything of the 2D network is frozen. Module names follow the toolkit (``completion``,
``projector``) so that :func:`nvp3d.model.checkpoint.load_stage_weights` splits 2D and 3D keys correctly;
the 2D network's children (``backbone``, ``sem_seg_head``) are registered at the top level, so a state dict
of this module has the same 2D keys as the 2D stage's checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from frustum3d import geometry as G
from frustum3d.decoder import FrustumDecoder, decoder_input_groups
from frustum3d.lifting import (
    fuse_lifted,
    fuse_multiscale,
    lift_depth,
    lift_depth_multiscale,
    occupancy_aware_lift,
    occupancy_pyramid,
)
from frustum3d.sparse import SparseVoxels
from maskformer_head.postprocess import panoptic_inference, resize_mask_logits
from torch import nn

__all__ = ["GridGeometry", "Panoptic3DModel", "ProjectionBlock", "crop_resize"]


class GeometryMismatchError(ValueError):
    """The data's voxel grid or image plane does not match the spec's (message names the keys)."""


@dataclass(frozen=True)
class GridGeometry:
    """Frustum grid and image planes of the 3D stage (from the spec; front3d defaults in brackets).

    Attributes:
        grid_dims: voxel grid (256^3).
        voxel_size: metres per voxel (0.03).
        depth_min, depth_max: depth range of the frustum (0.4, 6.0).
        truncation: TDF clamp of the geometry head and lifting half-width in voxels (3).
        image_size: (W, H) network input (320x240).
        plane_size: (W, H) lifting plane (160x120).
    """

    grid_dims: tuple[int, int, int] = G.FRONT3D_GRID
    voxel_size: float = G.FRONT3D_VOXEL_SIZE
    depth_min: float = G.FRONT3D_DEPTH_RANGE[0]
    depth_max: float = G.FRONT3D_DEPTH_RANGE[1]
    truncation: float = G.FRONT3D_TRUNCATION
    image_size: tuple[int, int] = G.FRONT3D_IMAGE_SIZE
    plane_size: tuple[int, int] = G.FRONT3D_REDUCED_SIZE

    @classmethod
    def from_spec(cls, spec: Any) -> GridGeometry:
        n = int(spec.model.frustum3d.grid_dimensions)
        ds = spec.dataset
        return cls(grid_dims=(n, n, n), voxel_size=float(spec.model.projection.voxel_size),
                   depth_min=float(ds.depth_min), depth_max=float(ds.depth_max),
                   truncation=float(spec.model.frustum3d.truncation),
                   image_size=tuple(int(v) for v in ds.target_size),
                   plane_size=tuple(int(v) for v in ds.reduced_target_size))

    def plane_intrinsic(self, intrinsic: torch.Tensor | None = None, from_size: Sequence[int] | None = None
                        ) -> torch.Tensor:
        """Intrinsic of the lifting plane: ``intrinsic`` (of an image of ``from_size`` (W, H), default the
        network input) rescaled, or the front3d intrinsic rescaled when None."""
        if intrinsic is None:
            return G.front3d_intrinsic(self.plane_size)
        return G.rescale_intrinsic(intrinsic, tuple(from_size or self.image_size), self.plane_size)

    def frustum(self, plane_intrinsic: torch.Tensor | None = None) -> torch.Tensor:
        """Analytic frustum mask bool ``[X, Y, Z]`` of a plane intrinsic (default: front3d)."""
        k = self.plane_intrinsic() if plane_intrinsic is None else plane_intrinsic
        return G.frustum_mask(k, self.plane_size, self.grid_dims, self.voxel_size, self.depth_min, self.depth_max)

    def grid_to_camera(self, plane_intrinsic: torch.Tensor | None = None) -> torch.Tensor:
        """4x4 continuous grid coordinates -> camera metres for a plane intrinsic."""
        k = self.plane_intrinsic() if plane_intrinsic is None else plane_intrinsic
        return G.grid_to_camera(k, self.plane_size, self.grid_dims, self.voxel_size, self.depth_min, self.depth_max)


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


class Panoptic3DModel(nn.Module):
    """Frozen 2D network + trainable lifting projection and completion U-Net (module docstring).

    Args:
        net2d: the composed 2D network (``NVPanoptix3D``), already loaded with its 2D weights.
        geometry: grid and planes.
        stuff_ids: stuff classes (BUOL far limit; 3D fusion merges them).
        thing_ids: thing classes (2D panoptic post-processing).
        feature_dim: channels of the projected depth features (toolkit 256).
        unet_features, unet_output_channels, use_multi_scale: FrustumDecoder settings.
        object_mask_threshold, overlap_threshold: 2D/3D post-processing thresholds.
        depth_scale: clamp of the predicted depth (toolkit 25 m).
    """

    def __init__(self, net2d: nn.Module, geometry: GridGeometry, *, stuff_ids: Sequence[int],
                 thing_ids: Sequence[int], feature_dim: int, unet_features: int = 16, unet_output_channels: int = 16,
                 use_multi_scale: bool = False, object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8,
                 depth_scale: float = 25.0) -> None:
        super().__init__()
        object.__setattr__(self, "_net2d", net2d)  # not registered twice: its children are registered below
        for name, child in net2d.named_children():
            self.add_module(name, child)
        cfg = net2d.head_config
        self.geometry = geometry
        self.num_classes = int(cfg.num_classes)
        self.stuff_ids = tuple(int(s) for s in stuff_ids)
        self.thing_ids = tuple(int(t) for t in thing_ids)
        self.object_mask_threshold = float(object_mask_threshold)
        self.overlap_threshold = float(overlap_threshold)
        self.depth_scale = float(depth_scale)
        self.use_multi_scale = bool(use_multi_scale)
        self.projector = ProjectionBlock(int(cfg.depth_dim), int(feature_dim))
        groups = decoder_input_groups(int(cfg.mask_dim) + int(feature_dim), self.num_classes)
        self.completion = FrustumDecoder(
            groups, query_dim=int(cfg.hidden_dim), unet_features=unet_features,
            unet_output_channels=unet_output_channels, truncation=geometry.truncation,
            use_multi_scale=self.use_multi_scale, multi_scale_channels=int(cfg.conv_dim) + self.num_classes + 3,
            grid_dims=geometry.grid_dims,
        )
        self.freeze_2d()

    # ------------------------------------------------------------------ 2D part
    @property
    def net2d(self) -> nn.Module:
        return self._net2d

    def modules_2d(self) -> list[nn.Module]:
        return [child for _, child in self._net2d.named_children()]

    def freeze_2d(self) -> None:
        """``requires_grad_(False)`` on the whole 2D network (the toolkit's stage-2 rule)."""
        for m in self.modules_2d():
            m.requires_grad_(False)

    def train(self, mode: bool = True) -> Panoptic3DModel:
        super().train(mode)
        for m in self.modules_2d():
            m.train(False)  # frozen: no dropout, fixed norms
        return self

    @torch.no_grad()
    def infer_2d(self, images: torch.Tensor) -> dict[str, Any]:
        """The frozen 2D network's raw outputs (``no_grad``)."""
        return self._net2d(images)

    def plane(self, out2d: dict[str, Any], image_hw: Sequence[int]) -> PlaneInputs:
        """2D outputs -> lifting-plane inputs (module docstring step 2)."""
        g = self.geometry
        pw, ph = g.plane_size
        plane_hw = (ph, pw)
        padded = tuple(int(v) for v in out2d["padded_size"])
        image_hw = tuple(int(v) for v in image_hw)
        logits = out2d["pred_logits"].float()
        bsz = logits.shape[0]
        with torch.no_grad():
            sem, pan = [], []
            for b in range(bsz):
                masks = resize_mask_logits(out2d["pred_masks"][b].float(), padded, image_hw, plane_hw)
                res = panoptic_inference(logits[b], masks, num_classes=self.num_classes, thing_ids=self.thing_ids,
                                         object_mask_threshold=self.object_mask_threshold,
                                         overlap_threshold=self.overlap_threshold, fill_void_with_stuff=True)
                sem.append(res.semantic_probs)
                pan.append((res.panoptic_seg, res.segments_info))
            semantic = torch.stack(sem)
            depth = F.interpolate(out2d["pred_depths"].float(), size=padded, mode="bilinear", align_corners=False)
            depth = depth[:, :, : image_hw[0], : image_hw[1]]
            depth = F.interpolate(depth, size=plane_hw, mode="bilinear", align_corners=False)[:, 0]
            depth = depth.clamp(0.0, self.depth_scale)
            occ = out2d["occupancy_logits"]
            if occ is None:
                raise ValueError("the 3D stage needs the multi-plane occupancy head (dataset.enable_mp_occ: true)")
            occ = occ.float()
            if tuple(occ.shape[-2:]) != plane_hw:
                occ = F.interpolate(occ, size=plane_hw, mode="bilinear", align_corners=False)
            mask_feats = crop_resize(out2d["mask_features"].float(), padded, image_hw, plane_hw)
            ms = []
            if self.use_multi_scale:
                # enc_features are coarsest first (1/32, 1/16, 1/8); the grid levels go finest first
                # (each map covers the padded image: crop it to the image like the other plane inputs)
                for f in reversed(list(out2d["enc_features"])):
                    ms.append(crop_resize(f.float(), padded, image_hw, plane_hw))
        depth_in = out2d["depth_features"].detach().float()
        mf_size = tuple(out2d["mask_features"].shape[-2:])
        depth_feats = crop_resize(self.projector(depth_in, mf_size), padded, image_hw, plane_hw)
        return PlaneInputs(semantic=semantic, depth=depth, occupancy=occ, mask_features=mask_feats,
                           depth_features=depth_feats, ms_features=ms, queries=out2d["segm_decoder_out"].float(),
                           class_logits=logits, panoptic_2d=pan)

    # ------------------------------------------------------------------ lifting + completion
    def lift(self, p: PlaneInputs, plane_intrinsic: torch.Tensor, frustum: torch.Tensor
             ) -> tuple[SparseVoxels, list[SparseVoxels] | None]:
        """Projective + occupancy-aware lifting (and the multi-scale levels when enabled)."""
        g = self.geometry
        kw = dict(grid_dims=g.grid_dims, voxel_size=g.voxel_size, depth_min=g.depth_min, depth_max=g.depth_max)
        proj = lift_depth(p.depth, plane_intrinsic, [p.mask_features, p.depth_features], p.semantic,
                          truncation=g.truncation, **kw)
        buol = occupancy_aware_lift(p.semantic, p.occupancy, p.depth, plane_intrinsic, frustum,
                                    stuff_classes=self.stuff_ids, **kw)
        ms = None
        if self.use_multi_scale:
            levels = lift_depth_multiscale(p.depth, plane_intrinsic, p.ms_features, **kw)
            ms = fuse_multiscale(levels, occupancy_pyramid(buol))
        return fuse_lifted(proj, buol), ms

    def forward(self, images: torch.Tensor, plane_intrinsic: torch.Tensor, frustum: torch.Tensor,
                gt_occupancy: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Args:
            images: ``[B, 3, H, W]`` RGB 0..255 at the network input size.
            plane_intrinsic: ``[B, 4, 4]`` or ``[4, 4]`` intrinsic of the lifting plane.
            frustum: bool ``[B, X, Y, Z]`` or ``[X, Y, Z]`` frustum mask.
            gt_occupancy: training-time prune fallback targets (see FrustumDecoder).

        Returns the decoder's dict plus ``out2d`` (raw 2D outputs) and ``plane`` (:class:`PlaneInputs`).
        """
        g = self.geometry
        fr = frustum if frustum.dim() == 4 else frustum[None].expand(images.shape[0], *frustum.shape)
        if tuple(fr.shape[1:]) != g.grid_dims:
            raise GeometryMismatchError(
                f"the data's voxel grid {tuple(fr.shape[1:])} differs from model.frustum3d.grid_dimensions "
                f"{g.grid_dims[0]}: set model.frustum3d.grid_dimensions (and frustum_dims) to the data's grid")
        if tuple(images.shape[-2:]) != (g.image_size[1], g.image_size[0]):
            raise GeometryMismatchError(f"images are {tuple(images.shape[-2:])} (H, W) but dataset.target_size is "
                                        f"{list(g.image_size)} (W, H)")
        out2d = self.infer_2d(images)
        p = self.plane(out2d, images.shape[-2:])
        lifted, ms = self.lift(p, plane_intrinsic, fr)
        out = self.completion(lifted, p.queries, fr.to(images.device), ms_features=ms, gt_occupancy=gt_occupancy)
        out["out2d"] = out2d
        out["plane"] = p
        return out

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the 3D keys (``projector.*``, ``completion.*``)."""
        return {k: v for k, v in self.state_dict().items() if k.split(".", 1)[0] in ("projector", "completion")}
