"""The 2D stage as one traceable graph: ``batch_inputs`` (B, 3, H, W, RGB 0..255) -> named outputs.

Why a wrapper: :meth:`NVPanoptix3D.forward` computes the padded and backbone sizes from the input tensor's
shape with Python arithmetic (``round``), which the tracer cannot record. An exported graph has a fixed
(H, W) anyway (only the batch may vary), so the wrapper fixes them at construction and then runs the very
same modules (``model.backbone``, ``model.sem_seg_head``) in the same order as the model's ``forward``.
The parity tests compare the exported graph with ``model.forward`` itself, so a drift between the two
would fail them.

Outputs (shapes for a 240 x 320 input with the ``full`` preset: padded 256 x 320, backbone 364 x 448,
patch grid 26 x 32, Q = 100 queries, K = 13 classes):

====================  ==========================  ===============================================================
name                  shape                       meaning
====================  ==========================  ===============================================================
pred_logits           (B, Q, K+1)                 class logits of the last decoder layer (last = no-object)
pred_masks            (B, Q, Hp/2, Wp/2)          mask logits resized (bilinear) to half the padded input (128x160)
ori_pred_masks        (B, Q, 4h, 4w)              mask logits at the mask-feature resolution (104 x 128)
pred_depths           (B, 1, Hp/2, Wp/2)          metric depth resized (bilinear) to half the padded input
ori_pred_depths       (B, 1, Hb, Wb)              metric depth at the backbone input size (364 x 448)
segm_decoder_out      (B, Q, hidden)              normalised query embeddings (the 3D stage's panoptic queries)
occupancy_preds       (B, bins, Hd, Wd)           multi-plane occupancy logits (100 bins, dataset.depth_size)
enc_feat_0..2         (B, conv_dim, h_l, w_l)     pixel-decoder maps, coarsest first (13x16, 26x32, 52x64)
mask_features         (B, mask_dim, 4h, 4w)       per-pixel mask embedding (104 x 128)
depth_features        (B, conv_dim, h, w)         projected DPT depth features (26 x 32)
orig_pad_shape        (2,) int64                  (Hp, Wp), the padded input size the masks cover
encoder_features      (B, mask_dim + F, 4h, 4w)   3D checkpoints only: cat(mask_features, projector(depth_features))
====================  ==========================  ===============================================================

``encoder_features`` (the toolkit's name) needs the 3D stage's depth-feature ``projector``; it is exported only
when the checkpoint holds ``projector.*`` weights (a 3D-stage checkpoint). The toolkit exports it from 2D
checkpoints too, with a randomly initialised projector; we do not. The nine auxiliary decoder predictions
(training only) are not exported.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nvp3d.model.image import backbone_size, padded_size

INPUT_NAME_2D = "batch_inputs"

#: the graph's outputs, in order; ``enc_feat_<i>`` follow the pixel decoder's number of levels (3)
OUTPUT_NAMES_2D: tuple[str, ...] = (
    "pred_logits", "pred_masks", "ori_pred_masks", "pred_depths", "ori_pred_depths", "segm_decoder_out",
    "occupancy_preds", "enc_feat_0", "enc_feat_1", "enc_feat_2", "mask_features", "depth_features",
    "orig_pad_shape",
)
#: appended to :data:`OUTPUT_NAMES_2D` when the 3D stage's projector is exported with the 2D graph
ENCODER_FEATURES = "encoder_features"


class Export2DWrapper(nn.Module):
    """``forward(batch_inputs)`` -> the tuple :data:`OUTPUT_NAMES_2D` for a fixed ``input_hw``.

    Args:
        model: a :class:`nvp3d.model.net2d.Panoptic2DNet` (weights loaded, any device).
        input_hw: the (H, W) of ``batch_inputs`` the graph is built for.
        projector: the 3D stage's depth-feature projection (``projector(depth_features, size)``); when given,
            ``encoder_features`` is appended to the outputs.
    """

    def __init__(self, model: nn.Module, input_hw: tuple[int, int], projector: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.projector = projector
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        h, w = self.input_hw
        self.padded_hw = padded_size(h, w, model.size_divisibility)
        self.backbone_hw = backbone_size(self.padded_hw, model.backbone_width, model.backbone.patch_size)
        self.patch_grid = (self.backbone_hw[0] // model.backbone.patch_size,
                           self.backbone_hw[1] // model.backbone.patch_size)
        self.half_padded_hw = (self.padded_hw[0] // 2, self.padded_hw[1] // 2)
        # DINOv2's antialiased bicubic position-table resize has no ONNX op: at a fixed size it is a constant
        patch_embed = getattr(model.backbone.aggregator, "patch_embed", None)
        if hasattr(patch_embed, "freeze_pos_encoding"):
            patch_embed.freeze_pos_encoding(*self.patch_grid)

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES_2D + ((ENCODER_FEATURES,) if self.projector is not None else ())

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) 0..255 -> (B, 1, 3, Hb, Wb) in [0, 1]: zero-pad bottom/right, /255, bilinear resize.

        Same maths as :func:`nvp3d.model.image.to_backbone_input` with the sizes fixed in advance.
        """
        h, w = self.input_hw
        ph, pw = self.padded_hw
        x = images.float()
        if (ph, pw) != (h, w):
            x = F.pad(x, (0, pw - w, 0, ph - h), value=0.0)
        x = F.interpolate(x / 255.0, size=self.backbone_hw, mode="bilinear", align_corners=False)
        return x[:, None]

    def head_outputs(self, images: torch.Tensor) -> dict[str, Any]:
        """The model's output dict for a batch (what ``model.forward`` returns, minus size bookkeeping)."""
        m = self.model
        back = m.backbone(self.preprocess(images))
        out = m.sem_seg_head(back["tokens"], self.patch_grid, back["depth_features"],
                             patch_start_idx=back["patch_start_idx"], use_occupancy=m.use_occupancy)
        out["pred_depths"] = back["pred_depths"]
        return out

    def forward(self, batch_inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if tuple(batch_inputs.shape[-2:]) != self.input_hw:
            raise ValueError(f"batch_inputs must be (B, 3, {self.input_hw[0]}, {self.input_hw[1]}), "
                             f"got {tuple(batch_inputs.shape)}")
        out = self.head_outputs(batch_inputs)
        return outputs_tuple(out, self.half_padded_hw, self.padded_hw, self.projector)


def outputs_tuple(out: dict[str, Any], half_padded_hw: tuple[int, int], padded_hw: tuple[int, int],
                  projector: nn.Module | None = None) -> tuple[torch.Tensor, ...]:
    """Order a model output dict as :data:`OUTPUT_NAMES_2D` (plus ``encoder_features`` with a projector).

    Also applied to ``model.forward``'s dict to build the PyTorch reference of the onnxruntime check.
    """
    if out.get("occupancy_logits") is None:
        raise ValueError("the model returned no occupancy_logits; export needs the occupancy head enabled")
    enc = list(out["enc_features"])
    if len(enc) != 3:
        raise ValueError(f"expected 3 pixel-decoder levels (enc_feat_0..2), the model has {len(enc)}")
    masks = out["pred_masks"]
    depth = out["pred_depths"]
    extra: tuple[torch.Tensor, ...] = ()
    if projector is not None:
        mask_features = out["mask_features"]
        projected = projector(out["depth_features"], tuple(int(v) for v in mask_features.shape[-2:]))
        extra = (torch.cat([mask_features, projected], 1),)
    return (
        out["pred_logits"],
        F.interpolate(masks, size=half_padded_hw, mode="bilinear", align_corners=False),
        masks,
        F.interpolate(depth, size=half_padded_hw, mode="bilinear", align_corners=False),
        depth,
        out["segm_decoder_out"],
        out["occupancy_logits"],
        *enc,
        out["mask_features"],
        out["depth_features"],
        torch.tensor(padded_hw, dtype=torch.int64, device=masks.device),
        *extra,
    )
