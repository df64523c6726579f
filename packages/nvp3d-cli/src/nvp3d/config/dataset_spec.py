"""``dataset`` section: where the frames are, how they are sized, and the voxel/depth ranges.

Key names and defaults follow the NVPanoptix3D toolkit (reference sheet section 2.2); two keys are
ours: ``flip_frustum_mask`` (the toolkit flips the 3D-FRONT frustum mask with the 3D targets, Uni-3D
does not) and ``skip_bad`` (skip unreadable frames instead of failing); ``augmentation.random_zoom`` is our
3D-consistent crop (the toolkit's ``enable_crop`` changes the sample size and is 2D-only).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from nvp3d.config.base import NonNegFloatPair, PositiveIntPair, StrictModel

DATASET_NAMES = ("front3d", "matterport", "synthetic_hospital", "synthetic_warehouse", "synthetic")


class SplitSpec(StrictModel):
    """One data split (train, val or test)."""

    base_dir: str = Field("", description="Dataset root; per-frame files live under it.")
    json_path: str = Field("", description="Split list JSON, e.g. <base_dir>/meta/<split>.json.")
    batch_size: int = Field(1, ge=1, description="Frames per batch.")
    num_workers: int = Field(1, ge=0, description="DataLoader worker processes (0 = load in the main process).")


class AugmentationSpec(StrictModel):
    """Image augmentation and resize bounds (Mask2Former-style)."""

    train_min_size: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] = Field(
        default_factory=lambda: [448], description="Candidate shorter-side sizes for training resize."
    )
    train_max_size: int = Field(768, ge=1, description="Longest side cap for training resize.")
    train_crop_size: PositiveIntPair = Field(
        default_factory=lambda: [240, 240], description="Training crop size (unused by the toolkit)."
    )
    test_min_size: int = Field(240, ge=1, description="Shorter-side size at test time.")
    test_max_size: int = Field(960, ge=1, description="Longest side cap at test time.")
    color_aug_ssd: bool = Field(False, description="SSD-style colour augmentation.")
    enable_crop: bool = Field(False, description="Random crop during training.")
    crop_size: PositiveIntPair = Field(default_factory=lambda: [240, 240], description="Random crop size (H, W).")
    single_category_max_area: float = Field(
        1.0, gt=0.0, le=1.0, description="Max area fraction one category may cover in a crop."
    )
    random_flip: Literal["", "horizontal", "vertical"] = Field(
        "", description="Random flip direction; empty disables flipping."
    )
    random_flip_prob: float = Field(0.5, ge=0.0, le=1.0, description="Probability of the random flip.")
    size_divisibility: int = Field(-1, ge=-1, description="Pad images to a multiple of this (-1 = no padding).")
    gen_aug_weight: float = Field(0.0, ge=0.0, description="Weight of generated augmentation (toolkit key).")
    random_zoom: Annotated[list[Annotated[float, Field(ge=1.0, le=8.0)]], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [1.0, 1.0],
        description="Ours: [min, max] factor of a 3D-consistent random zoom (a crop resampled to full size; "
                    "intrinsic and 3D targets follow); [1, 1] = off.",
    )

    @model_validator(mode="after")
    def _zoom_is_ordered(self) -> AugmentationSpec:
        if self.random_zoom[0] > self.random_zoom[1]:
            raise ValueError(f"random_zoom must be [min, max] with min <= max, got {self.random_zoom}")
        return self


class DatasetSpec(StrictModel):
    """Dataset description shared by every action."""

    name: Literal["front3d", "matterport", "synthetic_hospital", "synthetic_warehouse", "synthetic"] = Field(
        "front3d", description="Dataset flavour; 'synthetic' is nvp3d's built-in generator."
    )
    contiguous_id: bool = Field(False, description="Map label ids to contiguous trainIds via label_map.")
    label_map: str = Field("", description="Colormap/label JSON, e.g. <base_dir>/meta/colormap.json.")
    frustum_mask_path: str = Field(
        "meta/frustum_mask.npz", description="Frustum mask .npz (not joined with base_dir, as the toolkit)."
    )
    flip_frustum_mask: bool = Field(
        True, description="Flip the frustum mask with the 3D targets (toolkit: True; Uni-3D: False)."
    )
    skip_bad: bool = Field(False, description="Skip unreadable or incomplete frames instead of failing.")
    downsample_factor: int = Field(1, ge=1, description="Eval grid downsampling (1 Front3D/synthetic, 2 Matterport).")
    iso_value: float = Field(1.0, gt=0.0, description="Near-surface threshold for GT instance masks at eval.")
    ignore_label: int = Field(255, ge=0, description="Label id ignored by the losses.")
    min_instance_pixels: int = Field(200, ge=0, description="2D instances need more than this many pixels.")
    img_format: Literal["RGB", "BGR"] = Field("RGB", description="Channel order of the network input.")
    target_size: PositiveIntPair = Field(
        default_factory=lambda: [320, 240], description="(W, H) the RGB image is resized to."
    )
    reduced_target_size: PositiveIntPair = Field(
        default_factory=lambda: [160, 120], description="(W, H) of the plane used for 3D lifting."
    )
    depth_size: PositiveIntPair = Field(
        default_factory=lambda: [120, 160], description="(H, W) of the depth map used for back-projection."
    )
    depth_bound: bool = Field(False, description="Clamp depth to [depth_min, depth_max].")
    depth_min: float = Field(0.4, gt=0.0, description="Near plane of the frustum in metres.")
    depth_max: float = Field(6.0, gt=0.0, description="Far plane of the frustum in metres.")
    occ_truncation_lvl: NonNegFloatPair = Field(
        default_factory=lambda: [8.0, 6.0], description="Occupancy thresholds for the 64^3 / 128^3 levels."
    )
    truncation_range: NonNegFloatPair = Field(
        default_factory=lambda: [0.0, 12.0], description="[min, max] distance clip of the 256^3 TDF (voxels)."
    )
    enable_3d: bool = Field(False, description="Stage switch: False trains/evaluates 2D, True the 3D stage.")
    enable_mp_occ: bool = Field(True, description="Build multi-plane occupancy targets.")
    depth_scale: float = Field(25.0, gt=0.0, description="Clamp for predicted depth in the postprocessor.")
    num_thing_classes: int = Field(9, ge=0, description="Classes 1..num_thing_classes are 'things'.")
    workers: int = Field(8, ge=0, description="Declared by the toolkit, unused (per-split num_workers is used).")
    pin_memory: bool = Field(True, description="Declared by the toolkit, unused.")
    train: SplitSpec = Field(default_factory=SplitSpec, description="Training split.")
    val: SplitSpec = Field(default_factory=SplitSpec, description="Validation split.")
    test: SplitSpec = Field(default_factory=SplitSpec, description="Test split (evaluate, inference).")
    augmentation: AugmentationSpec = Field(default_factory=AugmentationSpec, description="Augmentation.")

    @model_validator(mode="after")
    def _ranges_are_ordered(self) -> DatasetSpec:
        if self.depth_min >= self.depth_max:
            raise ValueError(f"depth_min ({self.depth_min}) must be smaller than depth_max ({self.depth_max})")
        lo, hi = self.truncation_range
        if lo >= hi:
            raise ValueError(f"truncation_range must be [min, max] with min < max, got {self.truncation_range}")
        return self
