"""The only path from an experiment spec to a network.

* :func:`build_net2d` -- :class:`~nvp3d.model.net2d.Panoptic2DNet` (the 2D stage) with the spec's sizes.
* :func:`build_net3d` -- :class:`~nvp3d.model.net3d.NVPanoptix3D` (the whole network: the 2D network plus the
  lifting projection and the completion decoder).
* :func:`load_weights_3d` -- ``train.checkpoint_2d`` (2D keys) then ``train.checkpoint_3d`` (3D keys).

Sizes come from ``spec.model`` with the preset's defaults already applied by the spec itself
(:mod:`nvp3d.config.presets`), so these functions read the spec as it is.
"""

from __future__ import annotations

from typing import Any

from nvp3d.config.presets import projected_feature_dim
from nvp3d.errors import SpecError
from nvp3d.model.checkpoint import WeightsReport, load_stage_weights
from nvp3d.model.net2d import Panoptic2DNet
from nvp3d.model.net3d import NVPanoptix3D, geometry_from_spec

__all__ = ["build_net2d", "build_net3d", "head_settings", "load_weights_3d"]


def head_settings(spec: Any) -> dict[str, Any]:
    """``model.sem_seg_head`` and ``model.mask_former`` values of a spec, merged in one dict."""
    return {**spec.model.sem_seg_head.model_dump(), **spec.model.mask_former.model_dump()}


def build_net2d(spec: Any) -> Panoptic2DNet:
    """The 2D network described by ``spec.model`` (sizes) and ``spec.dataset`` (depth plane)."""
    v = head_settings(spec)
    if v["common_stride"] != 4:
        raise ValueError(f"model.sem_seg_head.common_stride={v['common_stride']} is not supported; use 4")
    if v["hidden_dim"] % v["nheads"]:
        raise ValueError(f"model.mask_former.hidden_dim ({v['hidden_dim']}) must be divisible by nheads "
                         f"({v['nheads']})")
    if v["dec_layers"] < 2:
        raise ValueError("model.mask_former.dec_layers must be >= 2 (the initial prediction plus one layer)")
    overrides = dict(
        conv_dim=v["convs_dim"], mask_dim=v["mask_dim"], norm=v["norm"] or "GN",
        transformer_enc_layers=v["transformer_enc_layers"], transformer_dim_feedforward=v["transformer_dim_feedforward"],
        transformer_dropout=v["dropout"], hidden_dim=v["hidden_dim"], num_queries=v["num_object_queries"],
        nheads=v["nheads"], dim_feedforward=v["dim_feedforward"], dec_layers=v["dec_layers"] - 1,
        pre_norm=v["pre_norm"],
    )
    dh, dw = spec.dataset.depth_size
    model = Panoptic2DNet(
        preset=spec.model.preset, num_classes=v["num_classes"], head_overrides=overrides,
        size_divisibility=v["size_divisibility"], occupancy_size=(dh, dw),
        backbone_width=spec.model.backbone.input_width,
        train_aggregator=not spec.model.backbone.aggregator_frozen(),
        activation_checkpoint=bool(spec.train.activation_checkpoint),
    )
    dpt = model.backbone.depth_head.scratch.layer1_rn.out_channels
    if v["depth_dim"] != dpt:
        raise SpecError(f"model.sem_seg_head.depth_dim={v['depth_dim']} must equal the DPT depth-head width "
                         f"{dpt} of preset {spec.model.preset!r}")
    return model


def build_net3d(spec: Any, thing_ids: tuple[int, ...], stuff_ids: tuple[int, ...]) -> NVPanoptix3D:
    """The whole network (random 3D weights, 2D weights as built; load them with :func:`load_weights_3d`)."""
    net2d = build_net2d(spec)
    f3 = spec.model.frustum3d
    if f3.frustum_dims != f3.grid_dimensions:
        raise SpecError(f"model.frustum3d.frustum_dims ({f3.frustum_dims}) must equal grid_dimensions "
                         f"({f3.grid_dimensions}): the lifting grid is the decoder grid")
    if f3.grid_dimensions % 32:
        raise ValueError(f"model.frustum3d.grid_dimensions={f3.grid_dimensions} must be a multiple of 32")
    net = NVPanoptix3D(
        net2d, geometry_from_spec(spec), stuff_ids=stuff_ids, thing_ids=thing_ids,
        feature_dim=projected_feature_dim(spec.model), unet_features=f3.unet_features,
        unet_output_channels=f3.unet_output_channels, use_multi_scale=f3.use_multi_scale,
        object_mask_threshold=spec.model.object_mask_threshold, overlap_threshold=spec.model.overlap_threshold,
        depth_scale=spec.dataset.depth_scale, mask_prior_2d=f3.mask_prior_2d,
        labels_2d_bands=f3.labels_2d_bands, lifting_band=f3.lifting_band, train_depth_noise=f3.train_depth_noise,
        coarse_mask_weight=f3.coarse_mask_weight, fine_skip=f3.fine_skip, things_of_2d=f3.things_of_2d,
        query_refine_layers=f3.query_refine_layers, test_time_flip=f3.test_time_flip,
        semantic_head=f3.semantic_weight > 0, semantic_gate=f3.semantic_gate,
    )
    # the 2D network is frozen in the 3D stage (eval mode, no_grad): on CUDA its forward can be replayed from
    # CUDA graphs in training and evaluation too (the Predictor sets this again from inference.cuda_graphs)
    net2d.enable_cuda_graphs(bool(spec.train.cuda_graphs_2d))
    return net


def load_weights_3d(model: NVPanoptix3D, spec: Any, *, checkpoint_2d: str | None = None,
                    checkpoint_3d: str | None = None, require_2d: bool = True) -> list[WeightsReport]:
    """Load the 2D weights (``train.checkpoint_2d``) and optionally 3D weights (``train.checkpoint_3d``)."""
    reports = []
    ck2 = spec.train.checkpoint_2d if checkpoint_2d is None else checkpoint_2d
    ck3 = spec.train.checkpoint_3d if checkpoint_3d is None else checkpoint_3d
    if ck2:
        reports.append(load_stage_weights(model, ck2, "2d", "train.checkpoint_2d"))
    elif require_2d:
        raise ValueError("train.checkpoint_2d is empty: the 3D stage (dataset.enable_3d: true) trains on top of a "
                         "trained 2D stage; set it to the 2D run's panoptic_recon_3d_model_latest.pth")
    if ck3:
        reports.append(load_stage_weights(model, ck3, "3d", "train.checkpoint_3d"))
    return reports
