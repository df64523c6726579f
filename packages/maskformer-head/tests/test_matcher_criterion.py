"""Matcher and criterion: golden parity (rand tape and seed protocols) and brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from maskformer_head import HungarianMatcher, SetCriterion, TapeRandom
from maskformer_head.matcher import batch_dice_cost, batch_sigmoid_ce_cost
from maskformer_head.point_sampling import point_sample, uncertain_point_coords_with_randomness, uncertainty


def _criterion(golden, losses=None):
    L = golden["loss"]
    matcher = HungarianMatcher(**L["matcher_kwargs"])
    kw = dict(L["criterion_kwargs"])
    if losses is not None:
        kw["losses"] = losses
    crit = SetCriterion(L["num_classes"], matcher, L["weight_dict"], **kw)
    crit.load_state_dict(L["criterion_state_dict"], strict=True)
    return crit


@pytest.mark.parametrize("protocol", ["tape", "seed"])
def test_losses_match_golden(golden, protocol):
    L = golden["loss"]
    crit = _criterion(golden)
    outputs = golden["predictor"]["out_fp32"]
    if protocol == "tape":
        tape = TapeRandom(L["rand_tape"])
        losses = crit(outputs, L["targets"], rand=tape)
        assert tape.exhausted, "criterion drew fewer random tensors than the reference"
    else:
        torch.manual_seed(L["seed"])
        losses = crit(outputs, L["targets"])
    assert set(losses) == set(L["losses"])
    for k, v in L["losses"].items():
        assert losses[k].item() == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert crit.weighted_total(losses).item() == pytest.approx(L["weighted_total"], rel=1e-6)


def test_matches_equal_golden_exactly(golden):
    L = golden["loss"]
    matcher = HungarianMatcher(**L["matcher_kwargs"])
    outputs = golden["predictor"]["out_fp32"]
    tape = TapeRandom(L["rand_tape"])
    for stage, out in enumerate([outputs] + list(outputs["aux_outputs"])):
        indices = matcher(out, L["targets"], rand=tape)
        tape.position += 2  # skip the mask-loss draws of this stage
        for b, (rows, cols) in enumerate(indices):
            ref_rows, ref_cols = L["matches"][stage][b]
            assert torch.equal(rows, ref_rows) and torch.equal(cols, ref_cols), (stage, b)
    assert tape.exhausted


def test_cost_terms_against_dense_formulas():
    torch.manual_seed(0)
    x = torch.randn(4, 30, dtype=torch.float64)
    t = (torch.rand(3, 30, dtype=torch.float64) > 0.5).to(torch.float64)
    ce = batch_sigmoid_ce_cost(x, t)
    dice = batch_dice_cost(x, t)
    for i in range(4):
        for j in range(3):
            ref_ce = F.binary_cross_entropy_with_logits(x[i], t[j])
            p = x[i].sigmoid()
            ref_dice = 1 - (2 * (p * t[j]).sum() + 1) / (p.sum() + t[j].sum() + 1)
            assert ce[i, j].item() == pytest.approx(ref_ce.item(), abs=1e-12)
            assert dice[i, j].item() == pytest.approx(ref_dice.item(), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_matcher_is_optimal_by_enumeration(seed):
    """The assignment's total cost equals the minimum over all injective maps."""
    g = torch.Generator().manual_seed(seed)
    q, n, k = 5, 1 + seed % 4, 3
    logits = torch.randn(1, q, k + 1, generator=g, dtype=torch.float64)
    masks = torch.randn(1, q, 6, 7, generator=g, dtype=torch.float64)
    tgt = {"labels": torch.randint(0, k, (n,), generator=g), "masks": torch.rand(n, 12, 14, generator=g) > 0.5}
    coords = torch.rand(1, 40, 2, generator=g, dtype=torch.float64)
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=40)
    rows, cols = matcher({"pred_logits": logits, "pred_masks": masks}, [tgt], rand=TapeRandom([coords]))[0]
    cost = matcher.cost_matrix(logits[0], masks[0], tgt["labels"], tgt["masks"], coords)
    best = min(sum(cost[p[j], j].item() for j in range(n)) for p in itertools.permutations(range(q), n))
    assert len(rows) == n and len(set(rows.tolist())) == n and sorted(cols.tolist()) == list(range(n))
    assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_batched_matching_equals_per_image_optimum(seed):
    """A batch is matched at once (one cost tensor, one host copy); each image's block must equal its own
    cost matrix at its own points, and each assignment must be optimal by enumeration (an image without
    targets gets empty indices)."""
    g = torch.Generator().manual_seed(100 + seed)
    q, k, sizes = 4, 3, [(1 + seed) % 4, 2, 0, 3][: 2 + seed % 3]
    bs = len(sizes)
    logits = torch.randn(bs, q, k + 1, generator=g, dtype=torch.float64)
    masks = torch.randn(bs, q, 6, 7, generator=g, dtype=torch.float64)
    targets = [{"labels": torch.randint(0, k, (n,), generator=g), "masks": torch.rand(n, 12, 14, generator=g) > 0.5}
               for n in sizes]
    draws = [torch.rand(1, 30, 2, generator=g, dtype=torch.float64) for _ in range(bs)]
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=30)
    result = matcher({"pred_logits": logits, "pred_masks": masks}, targets, rand=TapeRandom(draws))
    assert len(result) == bs
    for b, ((rows, cols), t) in enumerate(zip(result, targets)):
        n = len(t["labels"])
        assert len(rows) == len(cols) == n
        if n == 0:
            continue
        cost = matcher.cost_matrix(logits[b], masks[b], t["labels"], t["masks"], draws[b])
        best = min(sum(cost[p[j], j].item() for j in range(n)) for p in itertools.permutations(range(q), n))
        assert sorted(cols.tolist()) == list(range(n))
        assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-12)
    if sum(sizes):
        full = matcher.batch_costs(logits, masks, targets, torch.cat(draws))
        start = 0
        for b, t in enumerate(targets):
            n = len(t["labels"])
            if n:
                block = full[b * q:(b + 1) * q, start:start + n]
                ref = matcher.cost_matrix(logits[b], masks[b], t["labels"], t["masks"], draws[b])
                assert torch.allclose(block, ref, rtol=0, atol=1e-12)
            start += n


def test_importance_sampling_against_brute_force():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 1, 8, 9, generator=g)
    draws = [torch.rand(2, 30, 2, generator=g), torch.rand(2, 3, 2, generator=g)]
    coords = uncertain_point_coords_with_randomness(logits, uncertainty, 10, 3.0, 0.75, TapeRandom(draws))
    assert coords.shape == (2, 10, 2)
    for r in range(2):
        vals = point_sample(logits[r : r + 1], draws[0][r : r + 1], align_corners=False)[0, 0]
        order = sorted(range(30), key=lambda i: abs(vals[i].item()))[:7]
        assert {tuple(draws[0][r, i].tolist()) for i in order} == {tuple(c) for c in coords[r, :7].tolist()}
        assert torch.equal(coords[r, 7:], draws[1][r])


def test_point_sample_matches_manual_bilinear():
    img = torch.arange(12.0).view(1, 1, 3, 4)
    # pixel centre (col 1, row 2) is at x = 1.5/4, y = 2.5/3
    pts = torch.tensor([[[1.5 / 4, 2.5 / 3], [2.0 / 4, 2.5 / 3]]])
    out = point_sample(img, pts, align_corners=False)[0, 0]
    assert out[0].item() == pytest.approx(9.0)
    assert out[1].item() == pytest.approx(9.5)  # halfway between columns 1 and 2


def test_depth_and_occupancy_losses_against_manual():
    torch.manual_seed(0)
    b, bins, h, w = 2, 4, 6, 8
    pred_depth = torch.rand(b, 1, h, w) * 5
    gt = [torch.rand(1, h, w) * 5 for _ in range(b)]
    gt[0][0, :3] = 0  # invalid pixels
    occ_logits = torch.randn(b, bins, h, w)
    occ_t = [(torch.rand(bins, h, w) > 0.5).float() for _ in range(b)]
    dmap = [torch.rand(h, w) for _ in range(b)]
    dmap[1][2:, :] = 0
    targets = [
        {"labels": torch.tensor([0]), "masks": torch.zeros(1, h, w, dtype=torch.bool), "depths": gt[i],
         "occupancy": occ_t[i], "depth_map": dmap[i]}
        for i in range(b)
    ]
    crit = SetCriterion(3, HungarianMatcher(1, 1, 1, 10), {}, 0.1, ["depths", "mp_occ"], 10, 3.0, 0.75)
    out = {"pred_logits": torch.randn(b, 5, 4), "pred_masks": torch.randn(b, 5, h, w), "pred_depths": pred_depth,
           "occupancy_logits": occ_logits}
    losses = crit(out, targets)
    per = []
    for i in range(b):
        valid = gt[i][0] > 0
        per.append((pred_depth[i, 0][valid] - gt[i][0][valid]).abs().mean())
    assert losses["loss_depth"].item() == pytest.approx(torch.stack(per).mean().item(), rel=1e-6)
    num, den = 0.0, 0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                if dmap[i][y, x] != 0:
                    den += 1
                    num += F.binary_cross_entropy_with_logits(occ_logits[i, :, y, x], occ_t[i][:, y, x],
                                                              reduction="sum").item()
    assert losses["loss_mp_occ"].item() == pytest.approx(num / den, rel=1e-5)
    assert "loss_ce" not in losses


def test_log_l1_depth_loss_against_manual():
    """``depth_loss="log_l1"``: per image, mean |log gt - log pred| over valid pixels, then the mean over images;
    an image without valid pixels adds 0 (as the L1 form), and the gradient stays finite."""
    torch.manual_seed(1)
    b, h, w = 3, 5, 7
    pred = (torch.rand(b, 1, h, w, dtype=torch.float64) * 5 + 0.1).requires_grad_(True)
    gt = [torch.rand(1, h, w, dtype=torch.float64) * 5 for _ in range(b)]
    gt[0][0, :2] = 0
    gt[2].zero_()  # no valid pixel
    targets = [{"labels": torch.tensor([0]), "masks": torch.zeros(1, h, w, dtype=torch.bool), "depths": gt[i]}
               for i in range(b)]
    crit = SetCriterion(3, HungarianMatcher(1, 1, 1, 10), {}, 0.1, ["depths"], 10, 3.0, 0.75, depth_loss="log_l1")
    out = {"pred_logits": torch.randn(b, 5, 4), "pred_masks": torch.randn(b, 5, h, w), "pred_depths": pred}
    loss = crit(out, targets)["loss_depth"]
    per = []
    for i in range(b):
        terms = [abs(math.log(gt[i][0, y, x].item()) - math.log(pred[i, 0, y, x].item()))
                 for y in range(h) for x in range(w) if gt[i][0, y, x] > 0]
        per.append(sum(terms) / len(terms) if terms else 0.0)
    assert loss.item() == pytest.approx(sum(per) / b, rel=1e-12)
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[2].abs().sum() == 0


def test_unknown_depth_loss_form_is_rejected():
    with pytest.raises(ValueError, match="depth_loss"):
        SetCriterion(3, HungarianMatcher(1, 1, 1, 10), {}, 0.1, ["depths"], 10, 3.0, 0.75, depth_loss="l2")


def test_unknown_loss_name_is_rejected():
    with pytest.raises(ValueError, match="unknown losses"):
        SetCriterion(3, HungarianMatcher(1, 1, 1, 10), {}, 0.1, ["labels", "boxes"], 10, 3.0, 0.75)


def test_deep_supervision_keys_and_backward(golden):
    L = golden["loss"]
    crit = _criterion(golden)
    out = golden["predictor"]["out_fp32"]
    leaf = {k: v.clone().requires_grad_(True) for k, v in out.items() if k != "aux_outputs"}
    leaf["aux_outputs"] = [{k: v.clone().requires_grad_(True) for k, v in a.items()} for a in out["aux_outputs"]]
    torch.manual_seed(0)
    losses = crit(leaf, L["targets"])
    assert len(losses) == 12
    crit.weighted_total(losses).backward()
    assert leaf["pred_masks"].grad.abs().sum() > 0
    assert all(a["pred_logits"].grad is not None for a in leaf["aux_outputs"])


def test_bf16_predictions_give_fp32_losses_close_to_golden(golden):
    """Half-precision outputs are sampled and scored in float32 (points drawn in float32)."""
    L = golden["loss"]
    out = golden["predictor"]["out_fp32"]
    low = {"pred_logits": out["pred_logits"].bfloat16(), "pred_masks": out["pred_masks"].bfloat16(),
           "aux_outputs": [{k: v.bfloat16() for k, v in a.items()} for a in out["aux_outputs"]]}
    losses = _criterion(golden)(low, L["targets"], rand=TapeRandom(L["rand_tape"]))
    for k, v in L["losses"].items():
        assert losses[k].dtype == torch.float32
        assert losses[k].item() == pytest.approx(v, abs=2e-2), k


def test_padded_target_sampling_equals_sampling_image_by_image():
    """The matcher samples every image's target masks at its own points in one call on the padded masks; the
    rows equal the image-by-image sampling exactly. Masks of different sizes take the image-by-image path."""
    from maskformer_head.batch_targets import BatchTargets

    g = torch.Generator().manual_seed(3)
    sizes = [2, 0, 3]
    targets = [{"labels": torch.randint(0, 4, (n,), generator=g), "masks": torch.rand(n, 12, 16, generator=g) > 0.5}
               for n in sizes]
    coords = torch.rand(3, 9, 2, generator=g)
    batch = BatchTargets(targets, "cpu")
    assert batch.same_size_masks() and batch.n_max == 3
    assert batch.mask_rows().tolist() == [0, 1, 6, 7, 8] and batch.labels().tolist() == torch.cat(
        [t["labels"] for t in targets]).tolist()
    sampled = point_sample(batch.padded_masks().float(), coords, align_corners=False).flatten(0, 1)[batch.mask_rows()]
    ref = torch.cat([point_sample(t["masks"].float()[:, None], coords[b:b + 1].expand(len(t["labels"]), -1, -1),
                                  align_corners=False).squeeze(1) for b, t in enumerate(targets)])
    assert torch.equal(sampled, ref)
    # masks of different sizes: the costs still equal each image's own cost matrix
    targets[2]["masks"] = torch.rand(3, 10, 14, generator=g) > 0.5
    assert not BatchTargets(targets, "cpu").same_size_masks()
    logits, masks = torch.randn(3, 5, 5, generator=g), torch.randn(3, 5, 6, 8, generator=g)
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=9)
    full = matcher.batch_costs(logits, masks, targets, coords)
    ref = matcher.cost_matrix(logits[2], masks[2], targets[2]["labels"], targets[2]["masks"], coords[2:3])
    torch.testing.assert_close(full[10:15, 2:5], ref, rtol=0, atol=1e-6)


def test_matched_pairs_on_device_give_image_query_target_and_batch_rows():
    """The criterion's one copy of the matched indices: per pair the image, the query, the target within its
    image, the target's row in the batch's label order and its row in the padded masks."""
    from maskformer_head.batch_targets import BatchTargets, MatchedPairs

    targets = [{"labels": torch.tensor([1, 2]), "masks": torch.zeros(2, 4, 4)},
               {"labels": torch.tensor([3, 0, 1]), "masks": torch.zeros(3, 4, 4)}]
    pairs = MatchedPairs([(torch.tensor([4, 0]), torch.tensor([1, 0])), (torch.tensor([2]), torch.tensor([2]))])
    image, query, target, label_row, padded_row = pairs.on_device(BatchTargets(targets, "cpu"))
    assert image.tolist() == [0, 0, 1] and query.tolist() == [4, 0, 2] and target.tolist() == [1, 0, 2]
    assert label_row.tolist() == [1, 0, 4] and padded_row.tolist() == [1, 0, 5]
    assert pairs.on_device(BatchTargets(targets, "cpu"))[0] is image  # built once
