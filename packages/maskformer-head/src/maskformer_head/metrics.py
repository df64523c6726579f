"""2D panoptic quality (PQ) and depth-aware PQ, accumulable across batches and processes.

A segment is a (class, instance) pair for thing classes and one segment per class for stuff
classes (instance ids ignored); pixels whose class is in neither set are void. A prediction
matches a ground-truth segment of the same class when IoU > 0.5. Void is handled in one of two
ways (``void_mode``):

* ``"symmetric"`` (default; torchmetrics' ``PanopticQuality``, which the NVPanoptix3D toolkit
  uses): the union leaves out the prediction's pixels on ground-truth void *and* the ground
  truth's pixels on predicted void; unmatched predictions more than half on ground-truth void
  are not false positives, and unmatched ground truth more than half predicted void is not a
  false negative;
* ``"coco"`` (panopticapi): only ground-truth void is discounted (union and false positives).

Depth-aware PQ (NVPanoptix3D / Uni-3D): for a threshold t > 0, predicted pixels whose relative
depth error ``|d_pred - d_gt| / d_gt`` exceeds t (where ``d_gt > 0``) become void before
matching; t = -1 is plain PQ. Statistics live in one float64 tensor ``[T, num_classes, 4]``
(IoU sum, TP, FP, FN), so batches add up and processes can ``all_reduce`` it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

DEFAULT_THRESHOLDS = (-1.0, 0.5, 0.25, 0.1)
VOID_MODES = ("symmetric", "coco")


def segment_ids(
    sem: torch.Tensor, inst: torch.Tensor, things: torch.Tensor, stuffs: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Per-pixel segment key (``class * stride + instance``; stuff instance 0; -1 = void) and stride."""
    sem = sem.long()
    inst = inst.long()
    if inst.numel() and int(inst.min()) < 0:
        raise ValueError("instance ids must be non-negative")
    stride = int(inst.max().item()) + 1 if inst.numel() else 1
    is_thing = torch.isin(sem, things)
    is_stuff = torch.isin(sem, stuffs)
    key = torch.where(is_thing, sem * stride + inst, sem * stride)
    return torch.where(is_thing | is_stuff, key, torch.full_like(key, -1)), stride


def image_segment_matching(
    pred_sem: torch.Tensor,
    pred_inst: torch.Tensor,
    gt_sem: torch.Tensor,
    gt_inst: torch.Tensor,
    things: torch.Tensor,
    stuffs: torch.Tensor,
    iou_threshold: float = 0.5,
    void_mode: str = "symmetric",
) -> dict[str, torch.Tensor]:
    """The segments of one image and how they overlap: what :func:`image_pq_stats` counts, kept per segment
    so that a caller can ask *why* a segment was not matched (e.g. nvp3d's thing outcomes).

    Returns (G ground-truth and P predicted segments, host tensors): ``iou`` [G, P] float64 (the PQ IoU with
    void discounted per ``void_mode``; 0 where they do not overlap), ``gt_labels`` [G] / ``pred_labels`` [P]
    (class ids), ``match`` [G, P] bool (same class and IoU > ``iou_threshold``: at most one per row and
    column), ``gt_on_void`` / ``pred_on_void`` (fraction of each segment's area on the other side's void).
    """
    if void_mode not in VOID_MODES:
        raise ValueError(f"void_mode {void_mode!r} is not one of {VOID_MODES}")
    if pred_sem.shape != gt_sem.shape or pred_inst.shape != pred_sem.shape or gt_inst.shape != gt_sem.shape:
        raise ValueError(f"shape mismatch: pred {tuple(pred_sem.shape)} / gt {tuple(gt_sem.shape)}")
    pk, ps = segment_ids(pred_sem.flatten(), pred_inst.flatten(), things, stuffs)
    gk, gs = segment_ids(gt_sem.flatten(), gt_inst.flatten(), things, stuffs)
    pk, gk = pk.cpu(), gk.cpu()
    p_valid, g_valid = pk >= 0, gk >= 0
    p_ids, p_inv = torch.unique(pk[p_valid], return_inverse=True)
    g_ids, g_inv = torch.unique(gk[g_valid], return_inverse=True)
    n_p, n_g = len(p_ids), len(g_ids)
    p_area = torch.bincount(p_inv, minlength=n_p).double()
    g_area = torch.bincount(g_inv, minlength=n_g).double()
    p_cls = torch.div(p_ids, ps, rounding_mode="floor")
    g_cls = torch.div(g_ids, gs, rounding_mode="floor")
    p_full = torch.full_like(pk, -1)
    p_full[p_valid] = p_inv
    g_full = torch.full_like(gk, -1)
    g_full[g_valid] = g_inv
    both = p_valid & g_valid
    inter = torch.bincount(g_full[both] * max(n_p, 1) + p_full[both], minlength=n_g * n_p).double()
    inter = inter.view(n_g, n_p)
    on_void = torch.bincount(p_full[p_valid & ~g_valid], minlength=n_p).double()
    union = g_area[:, None] + p_area[None, :] - inter - on_void[None, :]
    g_on_void = torch.bincount(g_full[g_valid & ~p_valid], minlength=n_g).double()
    if void_mode == "symmetric":
        union = union - g_on_void[:, None]
    iou = torch.where(inter > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))
    match = (g_cls[:, None] == p_cls[None, :]) & (iou > iou_threshold)
    return {"iou": iou, "gt_labels": g_cls, "pred_labels": p_cls, "match": match,
            "gt_on_void": g_on_void / g_area.clamp_min(1), "pred_on_void": on_void / p_area.clamp_min(1)}


def image_pq_stats(
    pred_sem: torch.Tensor,
    pred_inst: torch.Tensor,
    gt_sem: torch.Tensor,
    gt_inst: torch.Tensor,
    num_classes: int,
    things: torch.Tensor,
    stuffs: torch.Tensor,
    iou_threshold: float = 0.5,
    void_mode: str = "symmetric",
) -> torch.Tensor:
    """``[num_classes, 4]`` (IoU sum, TP, FP, FN) of one image; inputs are ``[H, W]`` integer maps."""
    m = image_segment_matching(pred_sem, pred_inst, gt_sem, gt_inst, things, stuffs, iou_threshold, void_mode)
    return stats_from_matching(m, num_classes, void_mode)


def stats_from_matching(m: dict[str, torch.Tensor], num_classes: int, void_mode: str = "symmetric") -> torch.Tensor:
    """``[num_classes, 4]`` (IoU sum, TP, FP, FN) of one image from :func:`image_segment_matching`: unmatched
    predictions more than half on GT void are not false positives, and (symmetric void) unmatched GT more than
    half on predicted void is not a false negative."""
    stats = torch.zeros((num_classes, 4), dtype=torch.float64)
    iou, match, g_cls, p_cls = m["iou"], m["match"], m["gt_labels"], m["pred_labels"]
    g_matched = match.any(1)
    p_matched = match.any(0)
    for c, v in zip(g_cls[g_matched].tolist(), iou[match].tolist()):
        stats[c, 0] += v
        stats[c, 1] += 1
    fn = ~g_matched
    if void_mode == "symmetric":
        fn = fn & (m["gt_on_void"] <= 0.5)
    for c in g_cls[fn].tolist():
        stats[c, 3] += 1
    fp = ~p_matched & (m["pred_on_void"] <= 0.5)
    for c in p_cls[fp].tolist():
        stats[c, 2] += 1
    return stats


def pq_from_stats(stats: torch.Tensor, classes: Iterable[int]) -> dict[str, float]:
    """Mean PQ / SQ / RQ over ``classes`` with TP + FP/2 + FN/2 > 0 (NaN if none)."""
    idx = torch.tensor(sorted(set(classes)), dtype=torch.long)
    s = stats[idx]
    iou, tp, fp, fn = s.unbind(-1)
    den = tp + 0.5 * fp + 0.5 * fn
    sq = torch.where(tp > 0, iou / tp.clamp_min(1), torch.zeros_like(iou))
    rq = torch.where(den > 0, tp / den.clamp_min(1e-12), torch.zeros_like(iou))
    pq = sq * rq
    present = den > 0
    if not bool(present.any()):
        return {"pq": math.nan, "sq": math.nan, "rq": math.nan, "n": 0}
    return {
        "pq": pq[present].mean().item(),
        "sq": sq[present].mean().item(),
        "rq": rq[present].mean().item(),
        "n": int(present.sum()),
    }


def sum_over_ranks(stats: torch.Tensor) -> torch.Tensor:
    """``stats`` summed over all ``torch.distributed`` ranks, on the CPU (``stats`` itself outside a process
    group). NCCL reduces on the GPU, so the tensor travels there and back."""
    if not (dist.is_available() and dist.is_initialized()):
        return stats
    t = stats.to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.cpu()


class DepthAwarePanopticQuality:
    """Accumulates PQ statistics at several depth thresholds.

    Args:
        num_classes: size of the class axis of the statistics (class ids are 0..num_classes-1).
        thing_classes / stuff_classes: evaluated classes; every other id is void.
        thresholds: depth thresholds; values <= 0 mean plain PQ (no depth test).
        void_mode: "symmetric" (torchmetrics / toolkit) or "coco" (panopticapi), see above.

    ``update(pred_sem, pred_inst, gt_sem, gt_inst, pred_depth=None, gt_depth=None)`` takes
    ``[H, W]`` or ``[B, H, W]`` maps (depths needed when a positive threshold is configured);
    ``sync()`` sums the statistics over ``torch.distributed`` ranks; ``compute()`` returns
    ``{threshold: {"pq", "sq", "rq", "pq_th", "pq_st", ...}}`` plus ``"averages"`` over the
    positive thresholds.
    """

    def __init__(
        self,
        num_classes: int,
        thing_classes: Iterable[int],
        stuff_classes: Iterable[int],
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        iou_threshold: float = 0.5,
        void_mode: str = "symmetric",
    ) -> None:
        if void_mode not in VOID_MODES:
            raise ValueError(f"void_mode {void_mode!r} is not one of {VOID_MODES}")
        self.void_mode = void_mode
        self.num_classes = num_classes
        self.thing_classes = sorted({int(c) for c in thing_classes})
        self.stuff_classes = sorted({int(c) for c in stuff_classes})
        overlap = set(self.thing_classes) & set(self.stuff_classes)
        if overlap:
            raise ValueError(f"classes {sorted(overlap)} are both thing and stuff")
        bad = [c for c in self.thing_classes + self.stuff_classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"classes {bad} outside 0..{num_classes - 1}")
        self.thresholds = [float(t) for t in thresholds]
        self.iou_threshold = iou_threshold
        self._things = torch.tensor(self.thing_classes, dtype=torch.long)
        self._stuffs = torch.tensor(self.stuff_classes, dtype=torch.long)
        self.stats = torch.zeros((len(self.thresholds), num_classes, 4), dtype=torch.float64)

    def reset(self) -> None:
        self.stats.zero_()

    def void_label(self) -> int:
        """An id that is neither thing nor stuff (used to void pixels)."""
        used = set(self.thing_classes) | set(self.stuff_classes)
        return next(c for c in range(-1, -1000, -1) if c not in used)

    def update(self, pred_sem, pred_inst, gt_sem, gt_inst, pred_depth=None, gt_depth=None) -> list[dict]:
        """Add one image ([H, W] maps) or a batch ([B, H, W]) to the statistics. Returns, per image, the
        :func:`image_segment_matching` of plain PQ (thresholds <= 0; empty when there is none), for callers
        that ask why segments were not matched without matching them a second time."""
        if pred_sem.ndim == 2:
            args = [pred_sem, pred_inst, gt_sem, gt_inst, pred_depth, gt_depth]
            pred_sem, pred_inst, gt_sem, gt_inst, pred_depth, gt_depth = (
                None if a is None else a[None] for a in args
            )
        needs_depth = any(t > 0 for t in self.thresholds)
        if needs_depth and (pred_depth is None or gt_depth is None):
            raise ValueError("depth-aware thresholds > 0 need pred_depth and gt_depth")
        things, stuffs = self._things.to(pred_sem.device), self._stuffs.to(pred_sem.device)
        void = self.void_label()
        plain: list[dict] = []
        for b in range(pred_sem.shape[0]):
            for ti, t in enumerate(self.thresholds):
                ps, pi = pred_sem[b].long(), pred_inst[b].long()
                if t > 0:
                    gd, pd = gt_depth[b].to(torch.float64), pred_depth[b].to(torch.float64)
                    valid = gd > 0
                    rel = (pd - gd).abs() / torch.where(valid, gd, torch.ones_like(gd))
                    bad = valid & (rel > t)
                    ps = torch.where(bad, torch.full_like(ps, void), ps)
                    pi = torch.where(bad, torch.zeros_like(pi), pi)
                m = image_segment_matching(ps, pi, gt_sem[b], gt_inst[b], things, stuffs, self.iou_threshold,
                                           self.void_mode)
                self.stats[ti] += stats_from_matching(m, self.num_classes, self.void_mode)
                if t <= 0 and len(plain) == b:
                    plain.append(m)
        return plain

    def merge(self, other: DepthAwarePanopticQuality) -> None:
        """Add another accumulator's statistics (same configuration)."""
        if other.stats.shape != self.stats.shape or other.thresholds != self.thresholds:
            raise ValueError("cannot merge accumulators with different thresholds or class counts")
        self.stats += other.stats

    def sync(self) -> None:
        """Sum statistics over all ranks (no-op outside ``torch.distributed``)."""
        self.stats = sum_over_ranks(self.stats)

    def compute(self) -> dict:
        results: dict = {}
        for ti, t in enumerate(self.thresholds):
            s = self.stats[ti]
            all_ = pq_from_stats(s, self.thing_classes + self.stuff_classes)
            th = pq_from_stats(s, self.thing_classes) if self.thing_classes else {"pq": math.nan}
            st = pq_from_stats(s, self.stuff_classes) if self.stuff_classes else {"pq": math.nan}
            results[t] = {
                "pq": all_["pq"], "sq": all_["sq"], "rq": all_["rq"], "pq_th": th["pq"], "pq_st": st["pq"],
            }
        positive = [t for t in self.thresholds if t > 0]
        if positive:
            results["averages"] = {
                k: sum(results[t][k] for t in positive) / len(positive) for k in ("pq", "pq_th", "pq_st")
            }
        return results
