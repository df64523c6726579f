"""Build :class:`~nvp3d.model.nvpanoptix3d.NVPanoptix3D` from an experiment spec."""

from __future__ import annotations

from typing import Any

from nvp3d.model.nvpanoptix3d import NVPanoptix3D
from nvp3d.model.presets import effective, get_preset


def head_settings(spec: Any) -> dict[str, Any]:
    """Effective (preset-aware) ``sem_seg_head`` and ``mask_former`` values of a spec, merged in one dict."""
    arch = get_preset(spec.model.preset)
    values = effective(spec.model.sem_seg_head, "sem_seg_head", arch)
    values.update(effective(spec.model.mask_former, "mask_former", arch))
    return values


def build_model(spec: Any) -> NVPanoptix3D:
    """The network described by ``spec.model`` (sizes) and ``spec.dataset`` (stage, depth plane)."""
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
    model = NVPanoptix3D(
        preset=spec.model.preset, num_classes=v["num_classes"], head_overrides=overrides,
        size_divisibility=v["size_divisibility"], occupancy_size=(dh, dw), enable_3d=spec.dataset.enable_3d,
    )
    dpt = model.backbone.depth_head.scratch.layer1_rn.out_channels
    if v["depth_dim"] != dpt:
        raise ValueError(f"model.sem_seg_head.depth_dim={v['depth_dim']} must equal the DPT depth-head width "
                         f"{dpt} of preset {spec.model.preset!r}")
    return model
