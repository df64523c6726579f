"""``NVPanoptix3D``: the whole network, the 3D stage on top of the frozen 2D network (toolkit section 4.2).

Data flow of :class:`NVPanoptix3D.forward` for a batch of RGB frames:

1. **2D inference** (frozen, ``no_grad``, eval mode): the 2D network
   (:class:`nvp3d.model.net2d.Panoptic2DNet`) gives class logits, mask logits, depth, multi-plane
   occupancy logits, mask features, the coarsest depth features and the query embeddings.
2. **Reduced plane** (:func:`nvp3d.model.plane.to_plane`): mask logits and depth are resized to the padded image,
   cropped to the image and resized to the lifting plane (``dataset.reduced_target_size``, 160x120 for
   front3d); panoptic post-processing (with the toolkit's void back-fill) gives per-class semantic scores;
   2D feature maps are cropped/resized the same way.
3. **Lifting** (:mod:`frustum3d.lifting`): projective TSDF lifting of ``[mask features, projected depth
   features]`` + semantics (7 copies along the ray), BUOL occupancy-aware lifting of
   ``[semantics, occupancy, sign, |d|]``, coordinate union of both; optionally the multi-scale levels.
4. **Completion** (:class:`frustum3d.decoder.FrustumDecoder`): occupancy at three levels, the TDF and per-query
   3D mask logits (dot products with the 2D query embeddings, through the decoder's query projections); with
   ``model.frustum3d.mask_prior_2d`` the query's 2D mask logit at each voxel's pixel is added
   (:mod:`nvp3d.model.mask_prior`); with ``model.frustum3d.coarse_mask_weight`` (evaluation and inference) the
   level-128 logits of each finest voxel's parent are added to its own (:mod:`nvp3d.model.coarse_masks`); with
   ``model.frustum3d.labels_2d_bands`` (evaluation and inference) the level-256 logits of the voxels near each
   pixel's predicted depth are replaced by the 2D ones; with ``model.frustum3d.things_of_2d`` (evaluation and
   inference) the thing queries that own no thing segment of the 2D result are left out of the 3D fusion
   (:mod:`nvp3d.model.things_of_2d`); with ``model.frustum3d.test_time_flip`` (evaluation and inference) the 2D
   network also runs on the mirrored images and the plane averages both passes' depth and occupancy
   (:mod:`nvp3d.model.plane`); with ``model.frustum3d.semantic_weight`` the decoder also predicts each finest
   voxel's class, and (evaluation and inference, ``semantic_gate``) a voxel it calls a thing goes only to kept
   queries of that class (:mod:`nvp3d.model.semantic_gate`).

Trainable: ``projector`` (the depth-feature projection block) and ``completion`` (the U-Net with its query
projections). Everything of the 2D network is frozen. Module names follow the toolkit (``completion``,
``projector``) so that :func:`nvp3d.model.checkpoint.load_stage_weights` splits 2D and 3D keys correctly;
the 2D network's children (``backbone``, ``sem_seg_head``) are registered at the top level, so a state dict
of this module has the same 2D keys as the 2D stage's checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from frustum3d.decoder import FrustumDecoder, decoder_input_groups
from frustum3d.geometry import FrustumGeometry
from frustum3d.lifting import (
    fuse_lifted,
    fuse_multiscale,
    lift_depth,
    lift_depth_multiscale,
    occupancy_aware_lift,
    occupancy_pyramid,
)
from frustum3d.sparse import SparseVoxels
from torch import nn

from nvp3d.model.coarse_masks import add_coarse_mask_logits
from nvp3d.model.depth_noise import perturb_depth
from nvp3d.model.graphed3d import GraphedDenseLevels
from nvp3d.model.mask_prior import add_mask_prior, use_2d_labels
from nvp3d.model.plane import FLIPPED, Plane2D, PlaneInputs, ProjectionBlock, plane_2d, to_plane
from nvp3d.model.semantic_gate import gate_by_semantics
from nvp3d.model.things_of_2d import drop_things_not_in_2d

__all__ = ["GeometryMismatchError", "NVPanoptix3D", "geometry_from_spec"]


class GeometryMismatchError(ValueError):
    """The data's voxel grid or image plane does not match the spec's (message names the keys)."""


def geometry_from_spec(spec: Any) -> FrustumGeometry:
    """The frustum grid and image planes a spec describes (``model.frustum3d``, ``model.projection``,
    ``dataset``): grid ``grid_dimensions``^3, ``voxel_size``, depth range, truncation, network input
    ``target_size`` and lifting plane ``reduced_target_size`` (the per-frame intrinsic is given per call)."""
    n = int(spec.model.frustum3d.grid_dimensions)
    ds = spec.dataset
    return FrustumGeometry(grid_dims=(n, n, n), voxel_size=float(spec.model.projection.voxel_size),
                           depth_min=float(ds.depth_min), depth_max=float(ds.depth_max),
                           truncation=float(spec.model.frustum3d.truncation),
                           image_size=tuple(int(v) for v in ds.target_size),
                           plane_size=tuple(int(v) for v in ds.reduced_target_size))


class NVPanoptix3D(nn.Module):
    """Frozen 2D network + trainable lifting projection and completion U-Net (module docstring).

    Args:
        net2d: the 2D network (:class:`~nvp3d.model.net2d.Panoptic2DNet`), already loaded with its 2D weights.
        geometry: grid and planes.
        stuff_ids: stuff classes (BUOL far limit; 3D fusion merges them).
        thing_ids: thing classes (2D panoptic post-processing).
        feature_dim: channels of the projected depth features (toolkit 256).
        unet_features, unet_output_channels, use_multi_scale: FrustumDecoder settings.
        object_mask_threshold, overlap_threshold: 2D/3D post-processing thresholds.
        depth_scale: clamp of the predicted depth (toolkit 25 m).
        mask_prior_2d: add the 2D mask logits to the 3D mask logits (:mod:`nvp3d.model.mask_prior`).
        labels_2d_bands: out of training, replace the level-256 3D mask logits by the 2D ones within this many
            truncation bands of each pixel's predicted depth (0 = off; :func:`nvp3d.model.mask_prior.use_2d_labels`).
        lifting_band: voxels on each side of a pixel's predicted depth that the projective lifting fills (None =
            the truncation, the toolkit's 3; :func:`frustum3d.lifting.lift_depth`).
        train_depth_noise: in training mode only, the standard deviation of a random log-depth error applied to
            the lifting depth (0 = off; :mod:`nvp3d.model.depth_noise`).
        coarse_mask_weight: out of training, add this times the level-128 mask logits of each finest voxel's parent
            to its level-256 ones (0 = off; :mod:`nvp3d.model.coarse_masks`).
        fine_skip: the decoder's finest level also reads the lifted features (``FrustumDecoder(fine_skip=)``).
        query_refine_layers: the queries of the decoder's levels 128 and 256 first read the level-64 voxels in their
            masks (``FrustumDecoder(query_refine_layers=)``; 0 = off).
        things_of_2d: out of training, only the thing queries that own a thing segment of the 2D result enter the
            3D fusion (:mod:`nvp3d.model.things_of_2d`).
        semantic_head: the decoder has a per-voxel semantic head (``FrustumDecoder(semantic_classes=)``, all classes).
        semantic_gate: out of training, with the head, a voxel where it predicts a thing class may only go to kept
            queries of that class, when there is one (:mod:`nvp3d.model.semantic_gate`).
        test_time_flip: out of training, :meth:`infer_2d` also runs the 2D network on the mirrored images and the
            lifting plane averages both passes' depth and occupancy (:mod:`nvp3d.model.plane`); twice the 2D cost.
    """

    def __init__(self, net2d: nn.Module, geometry: FrustumGeometry, *, stuff_ids: Sequence[int],
                 thing_ids: Sequence[int], feature_dim: int, unet_features: int = 16, unet_output_channels: int = 16,
                 use_multi_scale: bool = False, object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8,
                 depth_scale: float = 25.0, mask_prior_2d: bool = False, labels_2d_bands: float = 0.0,
                 lifting_band: int | None = None, train_depth_noise: float = 0.0,
                 coarse_mask_weight: float = 0.0, fine_skip: bool = False, things_of_2d: bool = False,
                 query_refine_layers: int = 0, test_time_flip: bool = False, semantic_head: bool = False,
                 semantic_gate: bool = True) -> None:
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
        self.mask_prior_2d = bool(mask_prior_2d)
        self.labels_2d_bands = float(labels_2d_bands)
        self.lifting_band = None if lifting_band is None else int(lifting_band)
        self.train_depth_noise = float(train_depth_noise)
        self.coarse_mask_weight = float(coarse_mask_weight)
        self.things_of_2d = bool(things_of_2d)
        self.test_time_flip = bool(test_time_flip)
        self.semantic_gate = bool(semantic_gate)
        self.projector = ProjectionBlock(int(cfg.depth_dim), int(feature_dim))
        groups = decoder_input_groups(int(cfg.mask_dim) + int(feature_dim), self.num_classes)
        self.completion = FrustumDecoder(
            groups, query_dim=int(cfg.hidden_dim), unet_features=unet_features,
            unet_output_channels=unet_output_channels, truncation=geometry.truncation,
            use_multi_scale=self.use_multi_scale, multi_scale_channels=int(cfg.conv_dim) + self.num_classes + 3,
            grid_dims=geometry.grid_dims, fine_skip=fine_skip,
            query_refine_layers=query_refine_layers, semantic_classes=self.num_classes if semantic_head else 0,
        )
        self.freeze_2d()
        self.train()  # a new module is in training mode: the frozen 2D network starts in eval mode too

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

    def enable_cuda_graphs(self, enabled: bool = True, *, compile_2d: bool = False, say=print) -> None:
        """``inference.cuda_graphs``: replay the 2D network's forward (:mod:`nvp3d.model.graphed2d`) and the 3D
        decoder's dense levels (:mod:`nvp3d.model.graphed3d`) from CUDA graphs in evaluation-mode, no-grad calls
        on CUDA; ``False`` drops the captures. Training and CPU calls run eagerly either way. ``compile_2d``
        (``inference.compile_2d``): the 2D network's graphs replay its ``torch.compile``-d parts."""
        self._net2d.enable_cuda_graphs(enabled, compile=compile_2d, say=say)
        self.completion.dense_runner = GraphedDenseLevels(self.completion, say=say) if enabled else None

    def train(self, mode: bool = True) -> NVPanoptix3D:
        super().train(mode)
        for m in self.modules_2d():
            m.train(False)  # frozen: no dropout, fixed norms
        return self

    @torch.no_grad()
    def infer_2d(self, images: torch.Tensor) -> dict[str, Any]:
        """The frozen 2D network's raw outputs (``no_grad``); with ``test_time_flip`` out of training, the outputs on
        the horizontally mirrored images ride along under :data:`nvp3d.model.plane.FLIPPED`."""
        out2d = self._net2d(images)
        if self.test_time_flip and not self.training:
            out2d = {**out2d, FLIPPED: self._net2d(images.flip(-1))}
        return out2d

    def plane_2d(self, out2d: dict[str, Any], image_hw: Sequence[int]) -> Plane2D:
        """2D outputs -> the 2D prediction on the lifting plane (the 2D part of :meth:`plane`; no 3D weights)."""
        return plane_2d(out2d, image_hw, self.geometry.plane_size, num_classes=self.num_classes,
                        thing_ids=self.thing_ids, object_mask_threshold=self.object_mask_threshold,
                        overlap_threshold=self.overlap_threshold, depth_scale=self.depth_scale)

    def plane(self, out2d: dict[str, Any], image_hw: Sequence[int]) -> PlaneInputs:
        """2D outputs -> lifting-plane inputs (module docstring step 2)."""
        return to_plane(out2d, image_hw, self.geometry.plane_size, projector=self.projector,
                        num_classes=self.num_classes, thing_ids=self.thing_ids,
                        object_mask_threshold=self.object_mask_threshold, overlap_threshold=self.overlap_threshold,
                        depth_scale=self.depth_scale, use_multi_scale=self.use_multi_scale)

    # ------------------------------------------------------------------ lifting + completion
    def lift(self, p: PlaneInputs, plane_intrinsic: torch.Tensor, frustum: torch.Tensor
             ) -> tuple[SparseVoxels, list[SparseVoxels] | None]:
        """Projective + occupancy-aware lifting (and the multi-scale levels when enabled)."""
        g = self.geometry
        proj = lift_depth(p.depth, plane_intrinsic, [p.mask_features, p.depth_features], p.semantic, geometry=g,
                          truncation=self.lifting_band)
        buol = occupancy_aware_lift(p.semantic, p.occupancy, p.depth, plane_intrinsic, frustum,
                                    stuff_classes=self.stuff_ids, geometry=g)
        ms = None
        if self.use_multi_scale:
            levels = lift_depth_multiscale(p.depth, plane_intrinsic, p.ms_features, geometry=g)
            ms = fuse_multiscale(levels, occupancy_pyramid(buol))
        return fuse_lifted(proj, buol), ms

    def frustum_batch(self, images: torch.Tensor, frustum: torch.Tensor) -> torch.Tensor:
        """The frustum mask as ``[B, X, Y, Z]`` for ``images`` ``[B, 3, H, W]``, after checking both against the
        geometry (a one-line :class:`GeometryMismatchError` naming the spec key to set)."""
        g = self.geometry
        fr = frustum if frustum.dim() == 4 else frustum[None].expand(images.shape[0], *frustum.shape)
        if tuple(fr.shape[1:]) != g.grid_dims:
            raise GeometryMismatchError(
                f"the data's voxel grid {tuple(fr.shape[1:])} differs from model.frustum3d.grid_dimensions "
                f"{g.grid_dims[0]}: set model.frustum3d.grid_dimensions (and frustum_dims) to the data's grid")
        self.check_images(images)
        return fr

    def check_images(self, images: torch.Tensor) -> None:
        """Refuse ``images`` ``[B, 3, H, W]`` of another size than ``dataset.target_size`` (one-line
        :class:`GeometryMismatchError`): the 2D-only path checks this without a frustum mask."""
        g = self.geometry
        if tuple(images.shape[-2:]) != (g.image_size[1], g.image_size[0]):
            raise GeometryMismatchError(f"images are {tuple(images.shape[-2:])} (H, W) but dataset.target_size is "
                                        f"{list(g.image_size)} (W, H)")

    def forward(self, images: torch.Tensor, plane_intrinsic: torch.Tensor, frustum: torch.Tensor,
                gt_occupancy: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Args:
            images: ``[B, 3, H, W]`` RGB 0..255 at the network input size.
            plane_intrinsic: ``[B, 4, 4]`` or ``[4, 4]`` intrinsic of the lifting plane.
            frustum: bool ``[B, X, Y, Z]`` or ``[X, Y, Z]`` frustum mask.
            gt_occupancy: training-time prune fallback targets (see FrustumDecoder).

        Returns the decoder's dict plus ``out2d`` (raw 2D outputs) and ``plane`` (:class:`PlaneInputs`).
        """
        fr = self.frustum_batch(images, frustum)
        return self.forward_3d(self.infer_2d(images), images.shape[-2:], plane_intrinsic, fr,
                               gt_occupancy=gt_occupancy)

    def forward_3d(self, out2d: dict[str, Any], image_hw: Sequence[int], plane_intrinsic: torch.Tensor,
                   frustum: torch.Tensor, gt_occupancy: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Steps 2-4 of the module docstring on the 2D outputs of :meth:`infer_2d` (``frustum`` ``[B, X, Y, Z]``
        from :meth:`frustum_batch`). Split from :meth:`forward` so that a caller can run the 2D network of the
        next batch while this one's 3D part runs (:meth:`nvp3d.inference.predictor.Predictor.start`)."""
        g = self.geometry
        p = self.plane(out2d, image_hw)
        if self.training and self.train_depth_noise > 0:
            p = dataclasses.replace(p, depth=perturb_depth(p.depth, self.train_depth_noise))
        lifted, ms = self.lift(p, plane_intrinsic, frustum)
        device = p.depth.device
        out = self.completion(lifted, p.queries, frustum.to(device), ms_features=ms, gt_occupancy=gt_occupancy)
        if self.mask_prior_2d:
            out = add_mask_prior(out, p.mask_logits, plane_intrinsic, g, p.depth)
        if self.coarse_mask_weight > 0 and not self.training:
            out = add_coarse_mask_logits(out, self.coarse_mask_weight)
        if self.labels_2d_bands > 0 and not self.training:
            out = use_2d_labels(out, p.mask_logits, plane_intrinsic, g, p.depth, self.labels_2d_bands)
        if self.things_of_2d and not self.training:
            p = drop_things_not_in_2d(p, self.stuff_ids, self.object_mask_threshold)
        if self.semantic_gate and "semantic_256" in out and not self.training:
            out = gate_by_semantics(out, p.class_logits, self.object_mask_threshold, self.stuff_ids)
        out["out2d"] = out2d
        out["plane"] = p
        return out

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the 3D keys (``projector.*``, ``completion.*``)."""
        return {k: v for k, v in self.state_dict().items() if k.split(".", 1)[0] in ("projector", "completion")}
