"""Post-processing: golden semantic/panoptic maps, crafted branch cases, all three modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from maskformer_head import (
    PostProcessor,
    instance_inference,
    merge_flipped,
    panoptic_inference,
    resize_mask_logits,
    semantic_inference,
)
from torch.testing import assert_close


def _cfg(golden):
    P = golden["postprocess"]
    return dict(num_classes=5, thing_ids=P["thing_ids"], object_mask_threshold=P["object_mask_threshold"],
                overlap_threshold=P["overlap_threshold"])


def test_golden_per_image(golden):
    P = golden["postprocess"]
    out = golden["predictor"]["out_fp32"]
    for b, ref in enumerate(P["per_image"]):
        masks = resize_mask_logits(out["pred_masks"][b], P["padded_hw"], P["image_size"], P["output_hw"])
        assert_close(masks, ref["mask_pred_postprocessed"], rtol=1e-4, atol=1e-4)
        assert_close(semantic_inference(out["pred_logits"][b], masks), ref["semseg"], rtol=1e-4, atol=1e-4)
        pan = panoptic_inference(out["pred_logits"][b], masks, **_cfg(golden))
        assert torch.equal(pan.panoptic_seg, ref["panoptic_seg"])
        assert pan.segments_info == ref.get("segments_info", [])


def test_golden_crafted_cases(golden):
    for case in golden["postprocess"]["crafted"]:
        pan = panoptic_inference(case["mask_cls"], case["mask_pred"], **_cfg(golden))
        assert torch.equal(pan.panoptic_seg, case["panoptic_seg"])
        assert pan.segments_info == case["segments_info"]
        assert_close(semantic_inference(case["mask_cls"], case["mask_pred"]), case["semseg"], rtol=1e-5, atol=1e-6)


def test_postprocessor_panoptic_mode_matches_golden(golden):
    P = golden["postprocess"]
    pp = PostProcessor(mode="panoptic", **_cfg(golden))
    results = pp(golden["predictor"]["out_fp32"], P["padded_hw"], [P["image_size"]] * 2, [P["output_hw"]] * 2)
    for res, ref in zip(results, P["per_image"]):
        assert torch.equal(res["panoptic_seg"][0], ref["panoptic_seg"])
        assert_close(res["sem_seg"], ref["semseg"], rtol=1e-4, atol=1e-4)


def _brute_panoptic(mask_cls, mask_pred, num_classes, thing_ids, obj_t, ovl_t):
    """Pixel-by-pixel restatement of the panoptic rules."""
    probs = F.softmax(mask_cls, -1)
    q, h, w = mask_pred.shape
    sig = mask_pred.sigmoid()
    kept = [i for i in range(q) if probs[i].argmax() != num_classes and probs[i].max() > obj_t]
    owner = {}
    for y in range(h):
        for x in range(w):
            vals = [probs[i].max().item() * sig[i, y, x].item() for i in kept]
            if vals:
                owner[(y, x)] = kept[max(range(len(vals)), key=lambda j: (vals[j], -j))]
    seg = torch.zeros(h, w, dtype=torch.int32)
    info, stuff_ids, nxt = [], {}, 0
    for i in kept:
        cls = int(probs[i].argmax())
        visible = [(y, x) for (y, x), o in owner.items() if o == i]
        own = int((sig[i] >= 0.5).sum())
        pix = [(y, x) for (y, x) in visible if sig[i, y, x] >= 0.5]
        if not visible or own == 0 or not pix or len(visible) / own < ovl_t:
            continue
        if cls not in thing_ids and cls in stuff_ids:
            sid = stuff_ids[cls]
        else:
            nxt += 1
            sid = nxt
            if cls not in thing_ids:
                stuff_ids[cls] = sid
            info.append({"id": sid, "isthing": cls in thing_ids, "category_id": cls})
        for y, x in pix:
            seg[y, x] = sid
    return seg, info


@pytest.mark.parametrize("seed", range(4))
def test_panoptic_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, h, w = 6, 4, 7, 9
    mask_cls = torch.randn(q, k + 1, generator=g, dtype=torch.float64) * 4
    mask_pred = torch.randn(q, h, w, generator=g, dtype=torch.float64) * 3
    pan = panoptic_inference(mask_cls, mask_pred, num_classes=k, thing_ids=[0, 1], object_mask_threshold=0.3,
                             overlap_threshold=0.6)
    seg, info = _brute_panoptic(mask_cls, mask_pred, k, {0, 1}, 0.3, 0.6)
    assert torch.equal(pan.panoptic_seg, seg)
    assert pan.segments_info == info


def test_fill_void_with_stuff_covers_void_pixels():
    # query 0: stuff class 2 everywhere but weak on the right; query 1: thing dropped by overlap
    h, w = 4, 6
    mask_cls = torch.tensor([[-9.0, -9.0, 9.0, -9.0], [9.0, -9.0, -9.0, -9.0]])
    mask_pred = torch.full((2, h, w), -5.0)
    mask_pred[0, :, :3] = 5.0
    pan = panoptic_inference(mask_cls, mask_pred, num_classes=3, thing_ids=[0], object_mask_threshold=0.5,
                             overlap_threshold=0.5)
    assert (pan.panoptic_seg[:, 3:] == 0).all()
    filled = panoptic_inference(mask_cls, mask_pred, num_classes=3, thing_ids=[0], object_mask_threshold=0.5,
                                overlap_threshold=0.5, fill_void_with_stuff=True)
    assert (filled.panoptic_seg == 1).all()
    assert filled.segments_info == [{"id": 1, "isthing": False, "category_id": 2}]


def test_instance_inference_against_brute_force():
    g = torch.Generator().manual_seed(1)
    q, k, h, w = 4, 3, 5, 6
    mask_cls = torch.randn(q, k + 1, generator=g, dtype=torch.float64)
    mask_pred = torch.randn(q, h, w, generator=g, dtype=torch.float64)
    res = instance_inference(mask_cls, mask_pred, num_classes=k, topk=5)
    probs = F.softmax(mask_cls, -1)[:, :-1]
    pairs = sorted(((probs[i, c].item(), i, c) for i in range(q) for c in range(k)), reverse=True)[:5]
    assert res["query_indices"].tolist() == [p[1] for p in pairs]
    assert res["pred_classes"].tolist() == [p[2] for p in pairs]
    for j, (s, i, _) in enumerate(pairs):
        binary = mask_pred[i] > 0
        mean_in = mask_pred[i].sigmoid()[binary].sum() / (int(binary.sum()) + 1e-6)
        assert res["scores"][j].item() == pytest.approx(s * mean_in.item(), rel=1e-12)
        assert torch.equal(res["pred_masks"][j].bool(), binary)
    things_only = instance_inference(mask_cls, mask_pred, num_classes=k, topk=12, thing_ids=[1])
    assert set(things_only["pred_classes"].tolist()) == {1}


@pytest.mark.parametrize("mode", ["panoptic", "instance", "semantic"])
def test_postprocessor_modes(mode):
    g = torch.Generator().manual_seed(0)
    out = {"pred_logits": torch.randn(2, 5, 4, generator=g) * 3, "pred_masks": torch.randn(2, 5, 8, 10, generator=g)}
    pp = PostProcessor(num_classes=3, thing_ids=[0], mode=mode, object_mask_threshold=0.2, overlap_threshold=0.5)
    res = pp(out, (32, 40), [(30, 37), (28, 40)], [(15, 18), (14, 20)])
    assert len(res) == 2
    assert res[0]["sem_seg"].shape == (3, 15, 18) and res[1]["sem_seg"].shape == (3, 14, 20)
    masks = resize_mask_logits(out["pred_masks"][0], (32, 40), (30, 37), (15, 18))
    assert_close(res[0]["sem_seg"], semantic_inference(out["pred_logits"][0], masks))
    if mode == "panoptic":
        assert res[0]["panoptic_seg"][0].shape == (15, 18)
        assert "instances" not in res[0]
    elif mode == "instance":
        assert res[0]["instances"]["pred_masks"].shape[1:] == (15, 18)
        assert "panoptic_seg" not in res[0]
    else:
        assert set(res[0]) == {"sem_seg"}


def test_postprocessor_resizes_and_clamps_depth():
    g = torch.Generator().manual_seed(0)
    out = {"pred_logits": torch.randn(1, 5, 4, generator=g), "pred_masks": torch.randn(1, 5, 8, 10, generator=g),
           "pred_depths": torch.rand(1, 1, 16, 20, generator=g) * 10 - 1}
    res = PostProcessor(num_classes=3, thing_ids=[0], depth_scale=6.0)(out, (32, 40), [(30, 37)], [(15, 18)])
    ref = resize_mask_logits(out["pred_depths"][0], (32, 40), (30, 37), (15, 18))[0].clamp(0, 6.0)
    assert_close(res[0]["depth"], ref)
    assert res[0]["depth"].min() >= 0 and res[0]["depth"].max() <= 6.0


def test_merge_flipped_averages_the_probabilities_of_each_query():
    g = torch.Generator().manual_seed(3)
    cls, cls_f = torch.randn(6, 4, generator=g) * 3, torch.randn(6, 4, generator=g) * 3
    masks, masks_f = torch.randn(6, 9, 11, generator=g) * 4, torch.randn(6, 9, 11, generator=g) * 4
    merged_cls, merged_masks = merge_flipped(cls.double(), masks.double(), cls_f.double(), masks_f.double())
    for q in range(6):  # brute force, query by query and pixel by pixel
        want = [(torch.softmax(cls[q].double(), 0)[k] + torch.softmax(cls_f[q].double(), 0)[k]) / 2 for k in range(4)]
        assert_close(torch.softmax(merged_cls[q], 0), torch.stack(want))
        for y in range(9):
            for x in range(11):
                want = (torch.sigmoid(masks[q, y, x].double()) + torch.sigmoid(masks_f[q, y, 10 - x].double())) / 2
                assert_close(torch.sigmoid(merged_masks[q, y, x]), want)
    with pytest.raises(ValueError, match="do not match"):
        merge_flipped(cls, masks, cls_f[:5], masks_f)


def test_test_time_flip_of_a_flip_equivariant_network_changes_nothing():
    # mask and depth logits proportional to the zero-padded image: the flipped pass, flipped back inside the image,
    # equals the plain pass, so the merged maps equal the plain ones (padding on the right in both passes)
    g = torch.Generator().manual_seed(4)
    h, w, padded = 30, 37, (32, 40)
    image = torch.rand(h, w, generator=g)
    scale = torch.randn(5, 1, 1, generator=g) * 4

    def network(img):
        pad = F.pad(img, (0, padded[1] - w, 0, padded[0] - h))
        return {"pred_logits": logits, "pred_masks": (scale * (pad - 0.5))[None],
                "pred_depths": (pad * 5)[None, None]}

    logits = torch.randn(1, 5, 4, generator=g) * 3
    pp = PostProcessor(num_classes=3, thing_ids=[0], object_mask_threshold=0.2, overlap_threshold=0.5)
    plain = pp(network(image), padded, [(h, w)])[0]
    merged = pp(network(image), padded, [(h, w)], flipped=network(image.flip(-1)))[0]
    assert_close(merged["sem_seg"], plain["sem_seg"])
    assert_close(merged["depth"], plain["depth"])
    assert torch.equal(merged["panoptic_seg"][0], plain["panoptic_seg"][0])
    assert merged["panoptic_seg"][1] == plain["panoptic_seg"][1]


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        PostProcessor(num_classes=3, thing_ids=[0], mode="depth")


def _loop_panoptic(mask_cls, mask_pred, num_classes, thing_ids, obj_t, ovl_t, fill):
    """The per-query loop this package used before 0.1.5 (one boolean write per kept query): the reference for
    the vectorised version's panoptic map, segments and the toolkit's per-class score map."""
    things = set(thing_ids)
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    masks = mask_pred.sigmoid()
    keep = labels.ne(num_classes) & (scores > obj_t)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], masks[keep]
    prob = cur_scores.view(-1, 1, 1) * cur_masks
    h, w = masks.shape[-2:]
    seg = torch.zeros((h, w), dtype=torch.int32)
    sem = torch.zeros((num_classes, h, w), dtype=masks.dtype)
    info, stuff_seg, stuff_q, cur = [], {}, [], 0
    if cur_masks.shape[0] == 0:
        return seg, info, sem
    ids = prob.argmax(0)
    for k in range(cur_classes.shape[0]):
        cls = int(cur_classes[k])
        visible, own = ids == k, cur_masks[k] >= 0.5
        m = visible & own
        if int(visible.sum()) == 0 or int(own.sum()) == 0 or int(m.sum()) == 0:
            continue
        if int(visible.sum()) / int(own.sum()) < ovl_t:
            continue
        if cls not in things:
            stuff_q.append(k)
            if cls in stuff_seg:
                seg[m] = stuff_seg[cls]
                sem[cls][m] = prob[k][m]
                continue
            stuff_seg[cls] = cur + 1
        cur += 1
        seg[m] = cur
        sem[cls][m] = prob[k][m]
        info.append({"id": cur, "isthing": cls in things, "category_id": cls})
    if fill and stuff_q:
        t = torch.tensor(stuff_q)
        best = t[prob[t].argmax(0)]
        void = seg == 0
        for k in stuff_q:
            cls = int(cur_classes[k])
            m = void & (best == k)
            seg[m] = stuff_seg[cls]
            sem[cls][m] = prob[k][m]
    return seg, info, sem


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fill", [False, True])
def test_panoptic_matches_the_per_query_loop_with_scores_and_fill(seed, fill):
    """Random queries with several stuff queries of one class (merged), dropped segments and void pixels: the
    vectorised post-processing gives the loop's map, segments and per-class score map exactly."""
    g = torch.Generator().manual_seed(seed)
    q, k, h, w = 12, 5, 9, 11
    mask_cls = torch.randn(q, k + 1, generator=g) * 3
    mask_cls[:4, 3] += 6.0  # four queries of stuff class 3: merged into one segment
    mask_pred = torch.randn(q, h, w, generator=g) * 3 - 1.0
    for thr, ovl in ((0.3, 0.6), (0.5, 0.8), (0.0, 0.0)):
        pan = panoptic_inference(mask_cls, mask_pred, num_classes=k, thing_ids=[0, 1], object_mask_threshold=thr,
                                 overlap_threshold=ovl, fill_void_with_stuff=fill)
        seg, info, sem = _loop_panoptic(mask_cls, mask_pred, k, [0, 1], thr, ovl, fill)
        assert torch.equal(pan.panoptic_seg, seg)
        assert pan.segments_info == info
        assert torch.equal(pan.semantic_probs, sem)


def test_panoptic_reads_the_device_a_fixed_number_of_times():
    """However many queries are kept, the post-processing waits for the device only in the keep selection (the
    areas come back with one ``.tolist()``, which a CPU run does not see as an op): no per-query ``.item()``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Syncs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if name.startswith(("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero")):
                self.n += 1
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    for q in (3, 30):
        mask_cls = torch.randn(q, 6, generator=g) * 4
        mask_cls[:, 5] = -10.0  # every query kept
        with Syncs() as counter:
            pan = panoptic_inference(mask_cls, torch.randn(q, 8, 8, generator=g) * 3, num_classes=5,
                                     thing_ids=[0, 1], object_mask_threshold=0.0, overlap_threshold=0.0,
                                     fill_void_with_stuff=True)
        assert pan.segments_info
        assert counter.n == 1, counter.n
