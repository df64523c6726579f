"""Build the 3D-stage network from an experiment spec and load its weights.

* :func:`spec_2d` -- the same spec with ``dataset.enable_3d: false`` (to build the 2D network with the 2D
  builder, which refuses the 3D switch).
* :func:`build_model_3d` -- :class:`~nvp3d.stage3d.model.Panoptic3DModel` with the spec's sizes. The projected
  depth-feature width is ``model.projection.depth_feature_dim`` (toolkit 256); with the ``tiny`` preset a
  value left at that full-size default means the head's narrow ``mask_dim`` instead (a rule that survives the
  experiment.yaml round trip, where every key is explicit).
* :func:`load_weights_3d` -- ``train.checkpoint_2d`` (2D keys) then ``train.checkpoint_3d`` (3D keys).
"""

from __future__ import annotations

from typing import Any

from nvp3d.model.builder import build_model, head_settings
from nvp3d.model.checkpoint import WeightsReport, load_stage_weights
from nvp3d.stage3d.model import GridGeometry, Panoptic3DModel

FULL_DEPTH_FEATURE_DIM = 256

__all__ = ["build_model_3d", "feature_dim", "load_weights_3d", "spec_2d"]


def spec_2d(spec: Any) -> Any:
    """Copy of ``spec`` with ``dataset.enable_3d`` off."""
    return spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"enable_3d": False})})


def feature_dim(spec: Any) -> int:
    """Channels of the projected depth features (module docstring)."""
    dim = int(spec.model.projection.depth_feature_dim)
    if spec.model.preset == "tiny" and dim == FULL_DEPTH_FEATURE_DIM:
        return int(head_settings(spec)["mask_dim"])
    return dim


def build_model_3d(spec: Any, thing_ids: tuple[int, ...], stuff_ids: tuple[int, ...]) -> Panoptic3DModel:
    """The 3D-stage network (random 3D weights, 2D weights as built; load them with :func:`load_weights_3d`)."""
    net2d = build_model(spec_2d(spec))
    f3 = spec.model.frustum3d
    if f3.frustum_dims != f3.grid_dimensions:
        raise ValueError(f"model.frustum3d.frustum_dims ({f3.frustum_dims}) must equal grid_dimensions "
                         f"({f3.grid_dimensions}): the lifting grid is the decoder grid")
    if f3.grid_dimensions % 32:
        raise ValueError(f"model.frustum3d.grid_dimensions={f3.grid_dimensions} must be a multiple of 32")
    return Panoptic3DModel(
        net2d, GridGeometry.from_spec(spec), stuff_ids=stuff_ids, thing_ids=thing_ids, feature_dim=feature_dim(spec),
        unet_features=f3.unet_features, unet_output_channels=f3.unet_output_channels,
        use_multi_scale=f3.use_multi_scale, object_mask_threshold=spec.model.object_mask_threshold,
        overlap_threshold=spec.model.overlap_threshold, depth_scale=spec.dataset.depth_scale,
    )


def load_weights_3d(model: Panoptic3DModel, spec: Any, *, checkpoint_2d: str | None = None,
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
