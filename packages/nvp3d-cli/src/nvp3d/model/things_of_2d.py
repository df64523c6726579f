"""Only the thing queries that the 2D panoptic result shows enter the 3D fusion (``model.frustum3d.things_of_2d``;
not in the toolkit).

The 3D panoptic fusion keeps every query whose class score passes ``object_mask_threshold`` and gives each voxel to
the arg-max of score x sigmoid(3D mask logit). The 2D post-processing of the same queries does more: it drops a
query whose mask keeps too little of its pixels against the others (duplicates, queries hidden behind others),
so the 2D result has fewer things than the kept queries. In 3D those extra queries become spurious thing segments
(about half of the predicted things on the benchmark). With the setting on, out of training, a query whose class
is a thing and that wins no pixel of a thing segment of the 2D result is turned into "no object" before the 3D
fusion; stuff queries are unchanged.

Measured on the GPU benchmark (one H100, stop 55; ``tools/diagnose_3d.py``, the same checkpoints fused again):
held-out PRQ 14.0 -> 15.1 (things 10.0 -> 11.6) and 14.8 -> 16.7 (11.3 -> 14.0) on two 3D stages of one 2D
stage. On five CPU demo runs it changed nothing on average (8.2 -> 8.2, per seed -0.7 to +0.6; stop 54).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["as_no_object", "drop_things_not_in_2d", "thing_queries_of_2d", "winning_query"]


def winning_query(scores: torch.Tensor, kept: torch.Tensor, mask_logits: torch.Tensor, query_dim: int) -> torch.Tensor:
    """The kept query that wins each site, as the fusions take it: arg-max of score x sigmoid(mask logit) over the
    kept queries (``mask_logits`` has its queries along ``query_dim``; the result drops that dimension)."""
    shape = [1] * mask_logits.dim()
    shape[query_dim] = -1
    bid = torch.where(kept.view(shape), scores.view(shape) * torch.sigmoid(mask_logits),
                      torch.full_like(mask_logits, -1.0))
    return bid.argmax(query_dim)


def as_no_object(class_logits: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """``class_logits`` ``[Q, K+1]`` with the ``drop`` queries (bool ``[Q]``) turned into "no object", so that no
    fusion keeps them; a new tensor."""
    out = class_logits.clone()
    out[drop] = -30.0
    out[drop, -1] = 30.0
    return out


def thing_queries_of_2d(class_logits: torch.Tensor, mask_logits_2d: torch.Tensor, panoptic_2d: torch.Tensor,
                        segments: list[dict], object_mask_threshold: float) -> torch.Tensor:
    """bool ``[Q]``: the queries that own a thing segment of one frame's 2D panoptic result (``panoptic_2d`` on the
    plane, from :func:`maskformer_head.postprocess.panoptic_inference` with ``mask_logits_2d`` ``[Q, h, w]``): a
    thing pixel of that map belongs to the kept query that wins it (score x sigmoid, as the post-processing takes
    it)."""
    scores, labels = torch.softmax(class_logits.float(), -1).max(-1)
    kept = labels.ne(class_logits.shape[-1] - 1) & (scores > object_mask_threshold)
    out = torch.zeros(class_logits.shape[0], dtype=torch.bool, device=class_logits.device)
    thing_ids = [int(sg["id"]) for sg in segments if sg.get("isthing")]
    if not bool(kept.any()) or not thing_ids:
        return out
    winner = winning_query(scores, kept, mask_logits_2d.float().to(scores.device), 0)
    pan = panoptic_2d.to(scores.device).long()
    on_thing = torch.isin(pan, torch.tensor(thing_ids, dtype=torch.long, device=pan.device))
    out[winner[on_thing].unique()] = True
    return out


def drop_things_not_in_2d(plane: Any, stuff_ids: Sequence[int], object_mask_threshold: float) -> Any:
    """``plane`` (a :class:`nvp3d.model.plane.PlaneInputs`) with ``class_logits`` turned into "no object" for every
    query whose class is a thing and that owns no thing segment of its frame's 2D result; a new object."""
    logits = plane.class_logits
    no_object = logits.shape[-1] - 1
    stuff = torch.tensor([int(s) for s in stuff_ids], dtype=torch.long, device=logits.device)
    frames = []
    for b, (pan, segments) in enumerate(plane.panoptic_2d):
        labels = logits[b].argmax(-1)
        thing_class = labels.ne(no_object) & labels.ne(0) & ~torch.isin(labels, stuff)
        drop = thing_class & ~thing_queries_of_2d(logits[b], plane.mask_logits[b], pan, segments,
                                                  object_mask_threshold)
        frames.append(as_no_object(logits[b], drop))
    return dataclasses.replace(plane, class_logits=torch.stack(frames) if frames else logits.clone())
