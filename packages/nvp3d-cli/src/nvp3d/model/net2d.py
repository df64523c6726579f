"""``Panoptic2DNet``: the 2D stage of NVPanoptix3D (image -> panoptic masks, depth, multi-plane occupancy).

Data flow (toolkit section 4.1): image -> :func:`~nvp3d.model.image.to_backbone_input` -> VGGT aggregator
(frozen under ``no_grad`` by default; trainable with ``train_aggregator``) -> 4 token layers -> (a) the DPT depth head (trained; metric depth plus its four fusion
maps) and (b) the :class:`maskformer_head.MaskFormerHead` (feature adapter, pixel decoder, depth projector,
depth-aware masked decoder, multi-plane occupancy head; all trained).
"""

from __future__ import annotations

from typing import Any

import torch
from backbone_vggt import VGGT, build_vggt
from maskformer_head.head import HeadConfig, MaskFormerHead
from torch import nn

from nvp3d.config.presets import get_preset
from nvp3d.model.graphed2d import Graphed2D
from nvp3d.model.image import to_backbone_input

#: head modules (paths under ``sem_seg_head``) that the toolkit builds but whose output is never used: kept so
#: toolkit checkpoints load, but no gradient ever reaches them
UNUSED_REFERENCE_MODULES = (
    "predictor.cross_transformer_attention_layers", "predictor.depth_decoder_norm", "predictor.depth_embed",
    "depth_projector.proj_convs1.0", "depth_projector.proj_convs2.0",
)


class VGGTBackbone(nn.Module):
    """VGGT aggregator + DPT depth head (the checkpoint's ``aggregator.*`` and ``depth_head.*`` keys).

    By default the aggregator is frozen and runs under ``no_grad`` (as the toolkit, which loads VGGT-1B
    weights). ``trainable=True`` trains it too (needed when it starts from random weights: frozen random
    tokens carry little more than colour and position); ``checkpointing`` then recomputes its blocks in the
    backward pass (``train.activation_checkpoint``). The depth head is always trained and also returns its
    four fusion maps, which feed the depth-aware decoder.
    """

    def __init__(self, preset: str, *, trainable: bool = False, checkpointing: bool = True) -> None:
        super().__init__()
        vggt: VGGT = build_vggt(preset, enable_camera=False, enable_point=False, enable_depth=True)
        self.aggregator = vggt.aggregator
        self.depth_head = vggt.depth_head
        # heads of the official checkpoint that are not built here: load_pretrained skips their keys
        self.camera_head = None
        self.point_head = None
        self.track_head = None
        self.patch_size = vggt.aggregator.patch_size
        self.token_dim = 2 * vggt.aggregator.embed_dim
        self.layers = list(self.depth_head.intermediate_layer_idx)
        self.trainable = bool(trainable)
        self.aggregator.gradient_checkpointing = bool(checkpointing)
        if not self.trainable:
            self.aggregator.requires_grad_(False)
        self.train()  # a new module is in training mode: a frozen aggregator starts in eval mode

    def train(self, mode: bool = True) -> VGGTBackbone:
        super().train(mode)
        if not self.trainable:
            self.aggregator.eval()  # frozen: no dropout/drop-path, no activation checkpointing
        return self

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        """``images`` [B, S, 3, h, w] in [0, 1] -> tokens (4 layers), depth [B*S,1,h,w], fusion maps."""
        trained = self.trainable and torch.is_grad_enabled()
        with torch.set_grad_enabled(trained):
            tokens, start = self.aggregator(images, cached_layer_indices=self.layers)
        # layers the depth head does not read come back as None (not cached by the aggregator)
        if not trained:
            tokens = [None if t is None else t.detach() for t in tokens]
        (depth, conf), fused = self.depth_head(tokens, images=images, patch_start_idx=start, return_features=True)
        b, s = images.shape[:2]
        return {
            "tokens": [tokens[i] for i in self.layers],
            "patch_start_idx": start,
            "pred_depths": depth.reshape(b * s, 1, *depth.shape[2:4]),
            "depth_conf": conf.reshape(b * s, *conf.shape[2:4]),
            "depth_features": fused,
        }


class Panoptic2DNet(nn.Module):
    """The 2D network of NVPanoptix3D, built from a spec's ``model`` and ``dataset`` sections.

    ``forward(images)`` takes ``[B, 3, H, W]`` (one frame) or ``[B, S, 3, H, W]`` (S posed frames, folded
    into the batch after the backbone) RGB in 0..255 at ``dataset.target_size`` and returns the head's dict
    (``pred_logits``, ``pred_masks``, ``aux_outputs``, ``occupancy_logits``, ...) plus ``pred_depths``
    ``[B*S, 1, h, w]``, ``depth_conf`` and ``padded_size`` (the padded input (H, W) the masks cover).
    """

    def __init__(
        self, *, preset: str = "full", num_classes: int = 13, head_overrides: dict[str, Any] | None = None,
        size_divisibility: int = 32, occupancy_size: tuple[int, int] = (120, 160), backbone_width: int | None = None,
        train_aggregator: bool = False, activation_checkpoint: bool = True,
    ) -> None:
        super().__init__()
        arch = get_preset(preset)
        self.preset = preset
        self.size_divisibility = size_divisibility
        self.backbone_width = backbone_width or arch.backbone_width
        self.backbone = VGGTBackbone(arch.backbone_preset, trainable=train_aggregator,
                                     checkpointing=activation_checkpoint)
        if self.backbone_width % self.backbone.patch_size:
            raise ValueError(f"backbone width {self.backbone_width} must be a multiple of the patch size "
                             f"{self.backbone.patch_size}")
        cfg = dict(
            token_dim=self.backbone.token_dim, res_channels=arch.res_channels, num_classes=num_classes,
            transformer_nheads=arch.transformer_nheads, occupancy_bins=arch.occupancy_bins,
            occupancy_size=tuple(occupancy_size), occupancy_fusion_channels=arch.occupancy_fusion_channels,
            depth_dim=self.backbone.depth_head.scratch.layer1_rn.out_channels,
        )
        cfg.update(head_overrides or {})
        self.head_config = HeadConfig(**cfg)
        self.sem_seg_head = MaskFormerHead(self.head_config)
        self.use_occupancy = True
        self._graphed: Graphed2D | None = None  # inference.cuda_graphs (enable_cuda_graphs)
        # Modules the toolkit builds but never calls (kept so toolkit checkpoints load): frozen, so that
        # DDP can run with find_unused_parameters=False and the optimizer does not carry them.
        for name in UNUSED_REFERENCE_MODULES:
            try:
                self.sem_seg_head.get_submodule(name).requires_grad_(False)
            except AttributeError:  # not built (e.g. keep_reference_unused=False)
                pass

    @property
    def num_classes(self) -> int:
        return self.head_config.num_classes

    def enable_cuda_graphs(self, enabled: bool = True, *, compile: bool = False, say=print) -> None:
        """Replay the forward from CUDA graphs in eval/no-grad calls on CUDA (:mod:`nvp3d.model.graphed2d`);
        ``compile``: of the ``torch.compile``-d network (:mod:`nvp3d.model.compiled2d`).

        Off by default (training and CPU never use it); ``False`` drops the captures (and the compilation).
        """
        if self._graphed is not None:
            self._graphed.release()
        self._graphed = Graphed2D(self, say=say, compile=compile) if enabled else None

    @property
    def graphed(self) -> Graphed2D | None:
        """The capture cache when CUDA graphs are on, else ``None``."""
        return self._graphed

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        if self._graphed is not None and self._graphed.applies(images):
            return self._graphed(images)
        return self.forward_eager(images)

    def backbone_input(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's input ``[B, S, 3, h, w]`` in [0, 1] (padded and resized, see :mod:`nvp3d.model.image`)."""
        return to_backbone_input(images, self.size_divisibility, self.backbone_width, self.backbone.patch_size)[0]

    def forward_eager(self, images: torch.Tensor, backbone: Any = None) -> dict[str, Any]:
        """The forward without graphs; ``backbone`` replaces ``self.backbone`` (a graphed backbone)."""
        x, padded = to_backbone_input(images, self.size_divisibility, self.backbone_width, self.backbone.patch_size)
        back = (backbone or self.backbone)(x)
        grid = (x.shape[-2] // self.backbone.patch_size, x.shape[-1] // self.backbone.patch_size)
        out = self.sem_seg_head(back["tokens"], grid, back["depth_features"], patch_start_idx=back["patch_start_idx"],
                                use_occupancy=self.use_occupancy)
        out["pred_depths"] = back["pred_depths"]
        out["depth_conf"] = back["depth_conf"]
        out["padded_size"] = padded
        out["backbone_size"] = tuple(x.shape[-2:])
        return out
