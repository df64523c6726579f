"""maskformer_head: the depth-aware Mask2Former 2D head of NVPanoptix3D (pure PyTorch).

Pixel decoder with multi-scale deformable attention, (depth-aware) masked-attention query
decoder, token adapter, depth projector, BUOL multi-plane occupancy head, Hungarian matcher,
set criterion, semantic / instance / panoptic post-processing and 2D (depth-aware) PQ.
"""

from . import compat
from .adapter import ViTFeatureAdapter
from .criterion import SetCriterion
from .depth_projector import DepthProjector
from .head import HeadConfig, MaskFormerHead, build_head
from .layers import PositionEmbeddingSine, ShapeSpec
from .matcher import HungarianMatcher
from .metrics import (
    DepthAwarePanopticQuality,
    image_pq_stats,
    image_segment_matching,
    pq_from_stats,
    sum_over_ranks,
)
from .ms_deform_attn import MSDeformAttn, ms_deform_attn_sample
from .occupancy import MultiPlaneOccupancyHead
from .pixel_decoder import MSDeformAttnPixelDecoder
from .point_sampling import TapeRandom, TorchRandom, point_sample
from .postprocess import (
    PostProcessor,
    instance_inference,
    merge_flipped,
    panoptic_inference,
    resize_mask_logits,
    semantic_inference,
)
from .transformer_decoder import (
    DepthAwareMultiScaleMaskedTransformerDecoder,
    MultiScaleMaskedTransformerDecoder,
)

__version__ = "0.1.10"

__all__ = [
    "DepthAwareMultiScaleMaskedTransformerDecoder",
    "DepthAwarePanopticQuality",
    "DepthProjector",
    "HeadConfig",
    "HungarianMatcher",
    "MSDeformAttn",
    "MSDeformAttnPixelDecoder",
    "MaskFormerHead",
    "MultiPlaneOccupancyHead",
    "MultiScaleMaskedTransformerDecoder",
    "PositionEmbeddingSine",
    "PostProcessor",
    "SetCriterion",
    "ShapeSpec",
    "TapeRandom",
    "TorchRandom",
    "ViTFeatureAdapter",
    "build_head",
    "compat",
    "image_pq_stats",
    "image_segment_matching",
    "instance_inference",
    "merge_flipped",
    "ms_deform_attn_sample",
    "panoptic_inference",
    "point_sample",
    "pq_from_stats",
    "resize_mask_logits",
    "semantic_inference",
    "sum_over_ranks",
]
