"""``model`` section: VGGT backbone, Mask2Former-style 2D head, frustum 3D decoder and projection.

Defaults are the toolkit's (reference sheet section 2.3). ``preset`` is ours: ``full`` builds the
toolkit-sized network, ``small`` a ViT-S-sized one for one GPU, ``tiny`` a few-megabyte network of the same structure for CPU tests and demos.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, model_validator

from nvp3d.config.base import Fraction, StrictModel
from nvp3d.config.presets import PRESETS, dpt_width

PanopticMode = Literal["panoptic", "instance", "semantic"]

FeatureName = Literal["res2", "res3", "res4", "res5"]


class BackboneSpec(StrictModel):
    """Image backbone."""

    backbone_type: Literal["vggt"] = Field("vggt", description="Backbone family (only VGGT).")
    pretrained_model_path: str = Field(
        "", description="State dict to load (strict=False); empty = random init."
    )
    freeze: bool | None = Field(
        None,
        description="Freeze the VGGT aggregator (no_grad). null = frozen when pretrained_model_path is set "
        "(the toolkit's rule), trained otherwise (random features cannot be left frozen).",
    )
    input_width: int | None = Field(
        None, ge=14, description="Width in pixels the (padded) image is resized to for the aggregator, a multiple "
        "of its 14-px patch; the height follows the aspect ratio. null = the preset's (full 448, small 224, tiny 112). "
        "Not in the toolkit. Wider sees small objects in more patches (attention cost grows with the square of "
        "the patch count); part of the architecture, so it must match the checkpoint.")

    def aggregator_frozen(self) -> bool:
        """Whether the aggregator is frozen: ``freeze`` when set, else frozen iff pretrained weights are given."""
        return bool(self.pretrained_model_path) if self.freeze is None else bool(self.freeze)


class SemSegHeadSpec(StrictModel):
    """Pixel decoder / semantic head."""

    num_classes: int = Field(13, ge=1, description="Number of semantic classes (stuff + things).")
    common_stride: int = Field(4, ge=1, description="Output stride of the mask features.")
    transformer_enc_layers: int = Field(6, ge=0, description="Deformable transformer encoder layers.")
    convs_dim: int = Field(256, ge=1, description="Channels of the pixel-decoder convolutions.")
    mask_dim: int = Field(256, ge=1, description="Channels of the per-pixel mask embedding.")
    depth_dim: int = Field(256, ge=1, description="Channels of the depth branch.")
    ignore_value: int = Field(255, ge=0, description="Label ignored by the semantic loss.")
    norm: Literal["GN", "BN", "SyncBN", "LN", ""] = Field("GN", description="Normalisation layer type.")
    in_features: Annotated[list[FeatureName], Field(min_length=1)] = Field(
        default_factory=lambda: ["res2", "res3", "res4", "res5"], description="Backbone feature maps used."
    )
    deformable_transformer_encoder_in_features: Annotated[list[FeatureName], Field(min_length=1)] = Field(
        default_factory=lambda: ["res3", "res4", "res5"], description="Feature maps fed to the encoder."
    )


class MaskFormerSpec(StrictModel):
    """Query decoder, matcher and 2D loss weights."""

    num_object_queries: int = Field(100, ge=1, description="Number of object queries.")
    dec_layers: int = Field(10, ge=1, description="Decoder layers (predictions = dec_layers incl. initial).")
    hidden_dim: int = Field(256, ge=1, description="Query embedding width.")
    nheads: int = Field(8, ge=1, description="Attention heads.")
    dim_feedforward: int = Field(2048, ge=1, description="FFN width of the query decoder.")
    transformer_dim_feedforward: int = Field(1024, ge=1, description="FFN width of the pixel-decoder encoder.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability.")
    pre_norm: bool = Field(False, description="Pre-norm transformer layers.")
    class_weight: float = Field(2.0, ge=0.0, description="Classification loss weight.")
    dice_weight: float = Field(5.0, ge=0.0, description="Dice loss weight.")
    mask_weight: float = Field(5.0, ge=0.0, description="Mask BCE loss weight.")
    depth_weight: float = Field(5.0, ge=0.0, description="Depth loss weight.")
    mp_occ_weight: float = Field(5.0, ge=0.0, description="Multi-plane occupancy loss weight.")
    depth_loss: Literal["l1", "log_l1"] = Field(
        "l1", description="Form of the depth loss: l1 in metres (the toolkit's) or log_l1 (L1 of log depth: "
                          "relative error, near and far pixels weigh alike).")
    train_num_points: int = Field(12544, ge=1, description="Points sampled per mask for the mask losses.")
    oversample_ratio: float = Field(3.0, ge=1.0, description="Oversampling for importance point sampling.")
    importance_sample_ratio: Fraction = Field(0.75, description="Fraction of points chosen by uncertainty.")
    no_object_weight: Fraction = Field(0.1, description="Classification weight of the no-object class.")
    deep_supervision: bool = Field(True, description="Apply losses to every decoder layer.")
    size_divisibility: int = Field(32, ge=0, description="Pad inputs to a multiple of this (0 = none).")


class Frustum3DSpec(StrictModel):
    """Sparse 3D frustum decoder and its losses."""

    truncation: float = Field(3.0, gt=0.0, description="TSDF truncation in voxels.")
    iso_recon_value: float = Field(2.0, gt=0.0, description="Iso level for surface extraction (Front3D 1.0).")
    panoptic_weight: float = Field(25.0, ge=0.0, description="3D panoptic loss weight.")
    panoptic_dice_weight: float = Field(
        0.0, ge=0.0, description="Soft-dice term on the matched 3D masks, per level (0 = the toolkit's BCE only; "
        "dice learns small objects' masks faster: tools/bench_learning.py's 3D recipe uses 25, as heavy as the BCE).")
    panoptic_ce_weight: float = Field(
        0.0, ge=0.0, description="Voxel-ownership cross-entropy per level (not in the toolkit; 0 = off): at each GT "
        "segment's voxels, soft-max over all queries of log(class score) + log(sigmoid(3D mask logit)) with the "
        "segment's query as the target, balanced per segment. It trains the 3D panoptic fusion's arg-max, so a "
        "wall's mask stops owning the small objects in front of it.")
    hidden_thing_weight: float = Field(
        1.0, ge=0.0, description="Not in the toolkit (1 = off): multiplies the 3D losses' voxel weighting "
        "(occupancy, geometry, panoptic BCE, every level) at the GT thing voxels that the image does not show, those "
        "projecting onto a pixel outside their own GT 2D mask. The things the 3D fusion loses are mostly hidden "
        "ones, which only the 3D completion can find.")
    completion_weights: Annotated[list[Annotated[float, Field(ge=0.0)]], Field(min_length=3, max_length=3)] = Field(
        default_factory=lambda: [50.0, 25.0, 10.0], description="Occupancy loss weights at 64/128/256."
    )
    surface_weight: float = Field(5.0, ge=0.0, description="Geometry (L1) loss weight.")
    unet_output_channels: int = Field(16, ge=1, description="Output channels of the sparse UNet.")
    unet_features: int = Field(16, ge=1, description="Base feature width of the sparse UNet.")
    use_multi_scale: bool = Field(False, description="Multi-scale feature lifting.")
    fine_skip: bool = Field(
        False, description="Not in the toolkit: the completion decoder's finest level also reads the lifted "
        "features there (a skip connection at full resolution, projected from zero), instead of only the level "
        "above, upsampled. Export does not support it yet.")
    query_refine_layers: int = Field(
        0, ge=0, le=8, description="Not in the toolkit (0 = off): before the sparse levels, each 2D query reads the "
        "reconstructed level-64 voxels inside its own level-64 mask (masked cross-attention, this many residual "
        "layers that start as the identity), so the finer levels label a voxel with queries that have seen the "
        "instance's 3D extent, not only its image. Export does not support it yet.")
    mask_prior_2d: bool = Field(
        False, description="Add each query's 2D mask logit at a voxel's pixel to its 3D mask logit (not in the "
        "toolkit; 3D things appear early in training). Export does not support it yet.")
    labels_2d_bands: float = Field(
        0.0, ge=0.0, description="Evaluation and inference only (not in the toolkit): voxels within this many "
        "truncation bands of their pixel's predicted depth take the 2D mask logits instead of the 3D ones before "
        "the 3D panoptic fusion (the visible surface labelled by the 2D segmentation; 0 = off). Export does not "
        "support it yet.")
    things_of_2d: bool = Field(
        False, description="Evaluation and inference only, not in the toolkit: a thing query that owns no thing "
        "segment of the 2D panoptic result is left out of the 3D fusion (the 2D post-processing has already dropped "
        "duplicates and hidden queries, which would become spurious 3D things). A fusion setting: any 3D checkpoint "
        "takes it. Export refuses it for now.")
    semantic_weight: float = Field(
        0.0, ge=0.0, description="Not in the toolkit (0 = off): a per-voxel semantic head at the decoder's finest "
        "level, trained with this weight times the cross-entropy over the voxels the GT 3D semantics label (every "
        "object, also those that no 2D query stands for; each voxel weighed by 1 / sqrt of its class's count). With "
        "semantic_gate, out of training, a voxel where the head predicts a thing class may only go to a kept query "
        "of that class, when there is one. A network key (recorded in checkpoints); export refuses it for now.")
    semantic_gate: bool = Field(
        True, description="Evaluation and inference, with semantic_weight > 0 (not in the toolkit): where the semantic "
        "head predicts a thing class at a voxel and a kept query of that class exists, the 3D fusion gives the voxel "
        "only to such a query (false: the fusion ignores the head). A fusion setting: any checkpoint with the head "
        "takes either value.")
    test_time_flip: bool = Field(
        False, description="Evaluation and inference only, not in the toolkit: the 2D network also runs on the "
        "horizontally mirrored image, and the depth and multi-plane occupancy the 3D stage lifts at are the means of "
        "both passes (the queries and features stay the plain pass's). Twice the 2D network's cost; any 3D checkpoint "
        "takes it. Measured neutral on the CPU demo; export refuses it for now.")
    coarse_mask_weight: float = Field(
        0.0, ge=0.0, description="Evaluation and inference only (not in the toolkit): add this times the level-128 "
        "query mask logits of the voxel containing each finest voxel to its level-256 logits before the 3D panoptic "
        "fusion (0 = off, the toolkit's fusion; the demo uses 0.25). Export does not support it yet.")
    lifting_band: int | None = Field(
        None, ge=1, description="Projective lifting: voxels on each side of a pixel's predicted depth that receive "
        "its features (null = truncation, the toolkit's 3). With a predicted depth several voxels off, a wider band "
        "reaches the surface more often, at the cost of more lifted voxels.")
    train_depth_noise: float = Field(
        0.0, ge=0.0, le=1.0, description="3D-stage training only (not in the toolkit; 0 = off): the standard "
        "deviation of a random log-depth error applied to the frozen 2D network's depth before lifting (a scale "
        "error per image plus a smooth field over the image), so that the 3D network trains on depths as wrong as "
        "those of unseen frames, not on the better depths of the frames the 2D network was trained on. 0.1 is "
        "about 10 %.")
    grid_dimensions: int = Field(256, ge=8, description="Voxel grid side of the frustum decoder.")
    frustum_dims: int = Field(256, ge=8, description="Voxel grid side of back-projection and dense output.")
    signed_channel: int = Field(3, ge=0, description="Declared by the toolkit, unused.")


class ProjectionSpec(StrictModel):
    """2D-to-3D feature projection."""

    voxel_size: float = Field(0.03, gt=0.0, description="Voxel edge length in metres.")
    sign_channel: bool = Field(True, description="Add a TSDF sign channel to projected features.")
    depth_feature_dim: int = Field(256, ge=1, description="Channels of projected depth features.")


class ModelSpec(StrictModel):
    """The whole network."""

    preset: Literal["full", "small", "tiny"] = Field(
        "full", description="'full' = toolkit-sized network; 'small' = ViT-S-sized, one GPU, trains from scratch "
        "in minutes; 'tiny' = a few-MB network for CPU tests/demos."
    )
    mode: PanopticMode = Field(
        "panoptic", description="Post-processing: train/evaluate accept panoptic only; default of inference.mode."
    )
    object_mask_threshold: Fraction = Field(0.4, description="Min class score to keep a query.")
    overlap_threshold: Fraction = Field(0.5, description="Min visible fraction of a mask to keep it.")
    test_topk_per_image: int = Field(100, ge=1, description="Declared by the toolkit, unused.")
    test_time_flip: bool = Field(
        False, description="2D evaluation (test and in-fit validation) also runs the network on the horizontally "
        "flipped images and averages each query's class and mask probabilities, and the depth, with the flipped "
        "pass (twice the 2D forward cost). Not in the toolkit; the 3D stage and nvp3d inference use "
        "model.frustum3d.test_time_flip instead.")
    backbone: BackboneSpec = Field(default_factory=BackboneSpec, description="Backbone.")
    sem_seg_head: SemSegHeadSpec = Field(default_factory=SemSegHeadSpec, description="Pixel decoder.")
    mask_former: MaskFormerSpec = Field(default_factory=MaskFormerSpec, description="Query decoder.")
    frustum3d: Frustum3DSpec = Field(default_factory=Frustum3DSpec, description="3D decoder.")
    projection: ProjectionSpec = Field(default_factory=ProjectionSpec, description="2D-to-3D projection.")

    #: the preset whose defaults were last filled in (None: not yet)
    _defaults_of_preset: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _apply_preset_then_check(self) -> ModelSpec:
        """Fill the preset's defaults into keys the spec left unset, then check cross-key rules.

        The defaults are filled once per preset: every assignment re-runs this validator, and a key that a later
        source filled without marking it set (a checkpoint's ``num_object_queries``) must keep that value when
        another model key is assigned after it.
        """
        if self._defaults_of_preset != self.preset:
            for section_name, defaults in PRESETS[self.preset].spec_defaults.items():
                section = getattr(self, section_name)
                for key, value in defaults.items():
                    if key not in section.model_fields_set:
                        setattr(section, key, value)
                        # a preset default, not the user's choice: later sources (data, checkpoint) may still fill it
                        section.model_fields_set.discard(key)
            self._defaults_of_preset = self.preset
        depth_dim, dpt = self.sem_seg_head.depth_dim, dpt_width(self.preset)
        if depth_dim != dpt:
            raise ValueError(f"sem_seg_head.depth_dim={depth_dim} must equal the DPT depth-head width {dpt} of preset "
                             f"{self.preset!r}: remove the key (model.preset sets it)")
        heads, width = self.mask_former.nheads, self.mask_former.hidden_dim
        if width % heads:
            raise ValueError(f"mask_former.hidden_dim ({width}) must be divisible by mask_former.nheads ({heads})")
        input_width = self.backbone.input_width
        if input_width is not None and input_width % 14:
            raise ValueError(f"backbone.input_width={input_width} must be a multiple of the 14-px patch, e.g. "
                             f"{max(14, round(input_width / 14) * 14)}")
        return self
