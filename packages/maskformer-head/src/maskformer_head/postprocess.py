"""Inference post-processing: semantic, instance and panoptic maps from query predictions.

Follows Mask2Former (``maskformer_model.py``): masks are upsampled to the padded input size,
cropped to the image size and resized to the requested output size (`resize_mask_logits`);
then

* `semantic_inference`: per-class scores ``sum_q softmax(cls)[q, c] * sigmoid(mask_q)``;
* `panoptic_inference`: keep queries whose best class is not "no object" and whose score
  exceeds ``object_mask_threshold``; assign each pixel to the argmax of score*sigmoid(mask);
  drop segments whose visible area / own area (sigmoid >= 0.5) is below
  ``overlap_threshold`` (strict); stuff classes merge into one segment per class; 0 = void.
  ``fill_void_with_stuff=True`` adds the NVPanoptix3D toolkit's back-fill of void pixels
  with the best kept stuff query, and ``semantic_probs`` is the toolkit's per-class map of
  the winning score*sigmoid(mask);
* `instance_inference`: top-k (query, class) pairs, binary masks ``logit > 0``, score =
  class score x mean sigmoid inside the mask (boxes are not produced).

Test-time flip (not in Mask2Former's or the toolkit's inference): given the network's outputs on the
horizontally flipped images as well, `merge_flipped` averages each query's class probabilities and mask
probabilities with those of the same query on the flipped image, its masks flipped back. The queries are the
same learned embeddings in both passes, so a query that finds an object finds its mirror image.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MODES = ("panoptic", "instance", "semantic")


def resize_mask_logits(
    mask_logits: torch.Tensor,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    output_size: tuple[int, int],
) -> torch.Tensor:
    """``[Q, h, w]`` (1/4 scale) -> ``[Q, *output_size]``: bilinear to the padded input size,
    crop to ``image_size``, bilinear to ``output_size`` (align_corners=False throughout)."""
    x = F.interpolate(mask_logits[None], size=tuple(padded_size), mode="bilinear", align_corners=False)
    x = x[:, :, : image_size[0], : image_size[1]]
    return F.interpolate(x, size=tuple(output_size), mode="bilinear", align_corners=False)[0]


def merge_flipped(
    mask_cls: torch.Tensor, mask_pred: torch.Tensor, mask_cls_flipped: torch.Tensor, mask_pred_flipped: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Test-time flip of one image: ``mask_cls [Q, K+1]`` logits and ``mask_pred [Q, H, W]`` logits (cropped to the
    image) merged with the same queries' outputs on the horizontally flipped image (``*_flipped``, also cropped,
    not yet flipped back).

    Returns class log-probabilities and mask logits whose softmax / sigmoid are the means of the two passes', so
    every consumer of logits (`semantic_inference`, `panoptic_inference`, `instance_inference`) sees averaged
    probabilities. ``eps`` keeps the mask logits finite.
    """
    if mask_cls.shape != mask_cls_flipped.shape or mask_pred.shape != mask_pred_flipped.shape:
        raise ValueError(f"flipped outputs {tuple(mask_cls_flipped.shape)} / {tuple(mask_pred_flipped.shape)} do not "
                         f"match {tuple(mask_cls.shape)} / {tuple(mask_pred.shape)}")
    cls = (F.softmax(mask_cls, dim=-1) + F.softmax(mask_cls_flipped, dim=-1)).mul(0.5).log()
    prob = (mask_pred.sigmoid() + mask_pred_flipped.flip(-1).sigmoid()).mul(0.5).clamp(eps, 1.0 - eps)
    return cls, torch.logit(prob)


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """``mask_cls [Q, K+1]`` logits, ``mask_pred [Q, H, W]`` logits -> ``[K, H, W]`` scores."""
    probs = F.softmax(mask_cls, dim=-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", probs, mask_pred.sigmoid())


@dataclass
class PanopticResult:
    """Panoptic map (int32, 0 = void), its segments and the toolkit's per-class score map."""

    panoptic_seg: torch.Tensor
    segments_info: list[dict]
    semantic_probs: torch.Tensor


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    *,
    num_classes: int,
    thing_ids: Iterable[int],
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    fill_void_with_stuff: bool = False,
) -> PanopticResult:
    """Merge per-query masks into a panoptic map (see module docstring).

    The per-query areas are reduced on the device for all kept queries at once and read back in one copy; the
    keep / merge decisions run on those host numbers and the maps are written with one lookup. Two host syncs per
    image instead of four per kept query (each kept query read its class and three areas one by one)."""
    things = {int(t) for t in thing_ids}
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    masks = mask_pred.sigmoid()
    h, w = masks.shape[-2:]
    device = masks.device
    panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=device)
    semantic_probs = torch.zeros((num_classes, h, w), dtype=masks.dtype, device=device)
    segments: list[dict] = []
    kept = (labels.ne(num_classes) & (scores > object_mask_threshold)).nonzero().flatten()
    n = int(kept.numel())
    if n == 0:
        return PanopticResult(panoptic_seg, segments, semantic_probs)
    cur_classes, cur_masks = labels[kept], masks[kept]
    prob_masks = scores[kept].view(-1, 1, 1) * cur_masks
    mask_ids = prob_masks.argmax(0)  # [h, w]: the kept query each pixel goes to
    visible = mask_ids[None] == torch.arange(n, device=device).view(-1, 1, 1)
    own = cur_masks >= 0.5
    areas = torch.stack([cur_classes, visible.sum((1, 2)), own.sum((1, 2)), (visible & own).sum((1, 2))])
    classes, mask_area, original_area, overlap_area = areas.tolist()
    segment_of = [0] * n  # segment id of every kept query (0 = dropped); stuff of one class shares one
    stuff_segment: dict[int, int] = {}
    stuff_queries: list[int] = []
    current = 0
    for k in range(n):
        cls = int(classes[k])
        if mask_area[k] == 0 or original_area[k] == 0 or overlap_area[k] == 0:
            continue
        if mask_area[k] / original_area[k] < overlap_threshold:
            continue
        is_thing = cls in things
        if not is_thing:
            stuff_queries.append(k)
            if cls in stuff_segment:
                segment_of[k] = stuff_segment[cls]
                continue
            stuff_segment[cls] = current + 1
        current += 1
        segment_of[k] = current
        segments.append({"id": current, "isthing": bool(is_thing), "category_id": cls})
    lut = torch.tensor(segment_of, dtype=torch.int32, device=device)
    winner = mask_ids[None]
    segment = lut[mask_ids]
    assigned = own.gather(0, winner)[0] & (segment > 0)  # the winner's own pixel (sigmoid >= 0.5) of a kept segment
    panoptic_seg = torch.where(assigned, segment, panoptic_seg)
    winner_class = cur_classes[mask_ids]
    winner_prob = prob_masks.gather(0, winner)[0]
    flat = semantic_probs.view(num_classes, -1)
    flat.scatter_(0, winner_class.view(1, -1), torch.where(assigned, winner_prob, 0.0).view(1, -1))
    if fill_void_with_stuff and stuff_queries:
        ids = torch.tensor(stuff_queries, dtype=torch.long, device=device)
        best = ids[prob_masks[ids].argmax(0)]  # [h, w]: the best kept stuff query of every pixel
        void = panoptic_seg == 0
        panoptic_seg = torch.where(void, lut[best], panoptic_seg)
        best_class = cur_classes[best].view(1, -1)
        fill = torch.where(void, prob_masks.gather(0, best[None])[0], flat.gather(0, best_class).view(h, w))
        flat.scatter_(0, best_class, fill.view(1, -1))
    return PanopticResult(panoptic_seg, segments, semantic_probs)


def instance_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    *,
    num_classes: int,
    topk: int = 100,
    thing_ids: Iterable[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Top-``topk`` (query, class) pairs over all queries and classes (sorted by class score).

    With ``thing_ids`` only thing classes are kept (the reference does this when panoptic
    output is on as well). Returns ``pred_masks`` (float 0/1 ``[n, H, W]``), ``scores``,
    ``pred_classes`` and ``query_indices``.
    """
    num_queries = mask_cls.shape[0]
    scores = F.softmax(mask_cls, dim=-1)[:, :-1]
    labels = torch.arange(num_classes, device=mask_cls.device).unsqueeze(0).repeat(num_queries, 1).flatten(0, 1)
    k = min(topk, scores.numel())
    top_scores, top_idx = scores.flatten(0, 1).topk(k, sorted=True)
    top_labels = labels[top_idx]
    query_idx = torch.div(top_idx, num_classes, rounding_mode="floor")
    if thing_ids is not None:
        things = torch.tensor(sorted({int(t) for t in thing_ids}), device=mask_cls.device, dtype=top_labels.dtype)
        keep = torch.isin(top_labels, things)
        top_scores, top_labels, query_idx = top_scores[keep], top_labels[keep], query_idx[keep]
    masks = mask_pred[query_idx]
    binary = (masks > 0).to(masks.dtype)
    mask_scores = (masks.sigmoid().flatten(1) * binary.flatten(1)).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return {
        "pred_masks": binary,
        "scores": top_scores * mask_scores,
        "pred_classes": top_labels,
        "query_indices": query_idx,
    }


class PostProcessor:
    """Batch post-processing selected by ``mode`` ("panoptic" | "instance" | "semantic").

    ``__call__(outputs, padded_size, image_sizes, output_sizes=None)`` returns one dict per
    image with ``sem_seg`` ([K, H, W] scores, every mode), plus ``panoptic_seg`` =
    (map, segments_info) and ``semantic_probs`` in panoptic mode, or ``instances`` in
    instance mode. ``output_sizes`` defaults to ``image_sizes``. If ``outputs`` holds
    ``pred_depths [B, 1, h, w]``, ``depth [H, W]`` is resized the same way as the masks and,
    with ``depth_scale``, clamped to [0, depth_scale] (the toolkit's behaviour).
    """

    def __init__(
        self,
        num_classes: int,
        thing_ids: Iterable[int],
        mode: str = "panoptic",
        object_mask_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        test_topk_per_image: int = 100,
        fill_void_with_stuff: bool = False,
        depth_scale: float | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        self.num_classes = num_classes
        self.thing_ids = sorted({int(t) for t in thing_ids})
        self.mode = mode
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.test_topk_per_image = test_topk_per_image
        self.fill_void_with_stuff = fill_void_with_stuff
        self.depth_scale = depth_scale

    def __call__(
        self,
        outputs: dict,
        padded_size: tuple[int, int],
        image_sizes: Sequence[tuple[int, int]],
        output_sizes: Sequence[tuple[int, int]] | None = None,
        flipped: dict | None = None,
    ) -> list[dict]:
        """Per image: ``sem_seg``, and by mode ``panoptic_seg`` / ``instances``, plus ``depth`` when the outputs
        hold ``pred_depths``. ``flipped``: the same network's outputs on the horizontally flipped images (each image
        flipped within its own size, padded as the originals), merged in by `merge_flipped` (depth: the mean)."""
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        if len(image_sizes) != logits.shape[0]:
            raise ValueError(f"{len(image_sizes)} image sizes for a batch of {logits.shape[0]}")
        output_sizes = image_sizes if output_sizes is None else output_sizes
        results = []
        for b in range(logits.shape[0]):
            mask_pred = resize_mask_logits(masks[b], padded_size, image_sizes[b], output_sizes[b])
            mask_cls = logits[b].to(mask_pred)
            if flipped is not None:
                mask_cls, mask_pred = merge_flipped(
                    mask_cls, mask_pred, flipped["pred_logits"][b].to(mask_pred),
                    resize_mask_logits(flipped["pred_masks"][b], padded_size, image_sizes[b], output_sizes[b]))
            result: dict = {"sem_seg": semantic_inference(mask_cls, mask_pred)}
            if self.mode == "panoptic":
                pan = panoptic_inference(
                    mask_cls, mask_pred, num_classes=self.num_classes, thing_ids=self.thing_ids,
                    object_mask_threshold=self.object_mask_threshold, overlap_threshold=self.overlap_threshold,
                    fill_void_with_stuff=self.fill_void_with_stuff,
                )
                result["panoptic_seg"] = (pan.panoptic_seg, pan.segments_info)
                result["semantic_probs"] = pan.semantic_probs
            if outputs.get("pred_depths") is not None:
                depth = resize_mask_logits(outputs["pred_depths"][b], padded_size, image_sizes[b], output_sizes[b])[0]
                if flipped is not None and flipped.get("pred_depths") is not None:
                    depth_f = resize_mask_logits(flipped["pred_depths"][b], padded_size, image_sizes[b],
                                                 output_sizes[b])[0]
                    depth = (depth + depth_f.flip(-1)) * 0.5
                if self.depth_scale is not None:
                    depth = depth.clamp(min=0, max=self.depth_scale)
                result["depth"] = depth
            if self.mode == "instance":
                result["instances"] = instance_inference(
                    mask_cls, mask_pred, num_classes=self.num_classes, topk=self.test_topk_per_image
                )
            results.append(result)
        return results
