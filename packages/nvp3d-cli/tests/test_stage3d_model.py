"""3D-stage composition at tiny sizes (32^3 grid, random 2D weights): plane resampling against a dense
reference, forward/backward with gradients only in the 3D parts, the 2D/3D checkpoint key split, the
toolkit loss terms with the 2D Hungarian assignment, and the 3D fusion against the dense fusion path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets3d import collate_samples
from frustum3d.losses import fusion_log_scores, panoptic_ownership_loss_dense
from frustum3d.panoptic import panoptic_fusion
from nvp3d.config.presets import projected_feature_dim
from nvp3d.data.datamodule import NVP3DDataModule
from nvp3d.data.targets import gt_occupancy, targets_3d
from nvp3d.demo.specs import demo_spec, spec_3d_from_2d
from nvp3d.model.build import build_net3d
from nvp3d.model.checkpoint import is_3d_key, load_stage_weights
from nvp3d.model.fusion import dense_tdf, fuse_sample
from nvp3d.model.plane import crop_resize
from nvp3d.training.hidden_things import hidden_thing_voxels, upweight_hidden_things
from nvp3d.training.losses import Stage3DCriterion

IMAGE = (64, 48)


@pytest.fixture(scope="module")
def data_dir(synthetic_data) -> Path:
    return synthetic_data("nvp3d_synth_s3d_model", seed=7, image_size=IMAGE)


def tiny_3d_spec(data: Path, out: Path):
    spec = demo_spec(data, out, image_size=IMAGE, voxel_size=0.24, num_gpus=0, min_instance_pixels=8, batch_size=1)
    spec = spec_3d_from_2d(spec, "", grid=32, unet_features=4)
    spec.model.mask_former.train_num_points = 128
    return spec


@pytest.fixture(scope="module")
def setup(data_dir: Path, tmp_path_factory):
    spec = tiny_3d_spec(data_dir, tmp_path_factory.mktemp("s3d"))
    dm = NVP3DDataModule(spec, splits=("train",))
    dm.setup()
    torch.manual_seed(0)
    model = build_net3d(spec, dm.thing_ids, dm.stuff_ids)
    # speed on a loaded CPU: prune harder than 0.5 so the random decoder keeps few voxels (the GT union in
    # training and the top-k fallback in evaluation still give every level voxels)
    model.completion.threshold = 0.95
    batch = collate_samples([dm.datasets["train"][0]])
    return spec, dm, model, batch


def test_crop_resize_matches_resize_crop_resize() -> None:
    x = torch.randn(2, 3, 16, 20, dtype=torch.float64)
    padded, image, out = (64, 80), (60, 80), (30, 40)
    ref = F.interpolate(x, size=padded, mode="bilinear", align_corners=False)[..., :60, :80]
    ref = F.interpolate(ref, size=out, mode="bilinear", align_corners=False)
    got = crop_resize(x, padded, image, out)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=0.05 * x.abs().max().item(), rtol=0)
    # no padding and the output at the map's own size: identity
    torch.testing.assert_close(crop_resize(x, (64, 80), (64, 80), (16, 20)), x)


def test_forward_backward_trains_only_3d_parts(setup) -> None:
    spec, dm, model, batch = setup
    model = copy.deepcopy(model)  # the optimizer step below must not change the shared fixture
    assert model.projector.out.out_channels == projected_feature_dim(spec.model) == spec.model.sem_seg_head.mask_dim
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if not is_3d_key(k)}
    model.train()
    out = model(batch["image"], batch["intrinsic_reduced"], batch["frustum_mask"], gt_occupancy(batch, torch.device("cpu")))
    crit = Stage3DCriterion(spec)
    total, terms, indices = crit(out, batch)
    assert set(terms) == {"loss_geometry", "loss_occupancy_64", "loss_occupancy_128", "loss_occupancy_256",
                          "loss_panoptic_64", "loss_panoptic_128", "loss_panoptic_256"}
    assert torch.isfinite(total) and total.item() > 0
    torch.testing.assert_close(total, torch.stack(list(terms.values())).sum())
    # matched pairs cover every GT segment of the frame, in the 2D target order
    assert sorted(indices[0][1].tolist()) == list(range(len(batch["labels"][0])))
    total.backward()
    with_grad = {n.split(".", 1)[0] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"projector", "completion"}
    assert all(not p.requires_grad for n, p in model.named_parameters() if not is_3d_key(n))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    for k, v in model.state_dict().items():
        if k in frozen_before:
            torch.testing.assert_close(v, frozen_before[k], msg=k)
    # the 2D network stays in eval mode inside a training 3D model
    assert not model.sem_seg_head.training and model.completion.training


def _variant_after_one_backward(setup, key: str, value) -> Any:
    """The network of the fixture's spec with ``model.frustum3d.<key>`` set, built afresh (seed 0), after one
    3D-loss backward pass in training mode, so its parameters hold gradients."""
    spec, dm, _, batch = setup
    spec = spec.model_copy(deep=True)
    setattr(spec.model.frustum3d, key, value)
    torch.manual_seed(0)
    model = build_net3d(spec, dm.thing_ids, dm.stuff_ids)
    model.completion.threshold = 0.95
    model.train()
    out = model(batch["image"], batch["intrinsic_reduced"], batch["frustum_mask"], gt_occupancy(batch, torch.device("cpu")))
    total, _, _ = Stage3DCriterion(spec)(out, batch)
    total.backward()
    return model


def test_fine_skip_key_builds_a_trained_skip_that_starts_at_zero(setup) -> None:
    """``model.frustum3d.fine_skip``: the decoder gets the zero-started projection; the 3D loss trains it."""
    net = _variant_after_one_backward(setup, "fine_skip", True)
    skip = net.completion.skip_256
    assert skip is not None and setup[2].completion.skip_256 is None
    assert float(skip.linear.weight.abs().sum()) == 0.0  # the step above computed gradients, changed nothing
    assert "completion.skip_256.linear.weight" in net.trainable_state_dict()
    assert float(skip.linear.weight.grad.abs().sum()) > 0


def test_query_refine_key_builds_a_trained_refiner_that_starts_as_the_identity(setup) -> None:
    """``model.frustum3d.query_refine_layers``: the decoder gets that many zero-started refinement layers (frustum3d's
    tests show that they start as the identity), and the 3D loss trains them."""
    net = _variant_after_one_backward(setup, "query_refine_layers", 2)
    refiner = net.completion.query_refiner
    assert refiner is not None and len(refiner.layers) == 2 and setup[2].completion.query_refiner is None
    assert any(k.startswith("completion.query_refiner.layers.1.") for k in net.trainable_state_dict())
    for layer in refiner.layers:
        assert float(layer.out.weight.abs().sum()) == 0.0 and float(layer.out.weight.grad.abs().sum()) > 0


def test_ownership_term_uses_the_2d_class_scores(setup) -> None:
    """``model.frustum3d.panoptic_ce_weight`` adds ``loss_panoptic_*_ce`` per level, computed with the frozen 2D
    queries' class logits (as the 3D fusion scores them) and the same matched pairs as the BCE."""
    spec, _, model, batch = setup
    spec = spec.model_copy(deep=True)
    spec.model.frustum3d.panoptic_ce_weight = 2.0
    model = copy.deepcopy(model)
    model.train()
    out = model(batch["image"], batch["intrinsic_reduced"], batch["frustum_mask"], gt_occupancy(batch, torch.device("cpu")))
    total, terms, indices = Stage3DCriterion(spec)(out, batch)
    assert {"loss_panoptic_64_ce", "loss_panoptic_128_ce", "loss_panoptic_256_ce"} <= set(terms)
    n = Stage3DCriterion.num_masks(batch, torch.device("cpu"))
    valid = torch.isfinite(out["occupancy_64"][:, 0] if out["occupancy_64"].dim() == 5 else out["occupancy_64"])
    want = 2.0 * panoptic_ownership_loss_dense(out["panoptic_64"], targets_3d(batch, torch.device("cpu"))["masks_64"],
                                               indices, fusion_log_scores(out["out2d"]["pred_logits"]), valid, n)
    torch.testing.assert_close(terms["loss_panoptic_64_ce"], want)
    assert terms["loss_panoptic_64_ce"].item() > 0
    total.backward()
    assert all(p.grad is not None for p in model.completion.parameters() if p.requires_grad)


def _hidden_by_brute_force(batch: dict[str, Any], geometry) -> torch.Tensor:
    """The hidden thing voxels of the batch's first frame, one voxel at a time (the plane's masks by nearest
    resize of each 2D mask, each voxel's pixel by its own projection)."""
    masks_3d, masks_2d, is_thing = batch["masks_3d_256"][0], batch["masks"][0], batch["is_thing"][0]
    pw, ph = geometry.plane_size
    k = batch["intrinsic_reduced"][0].double()
    hidden = torch.zeros(masks_3d.shape[1:], dtype=torch.bool)
    for j in range(masks_3d.shape[0]):
        if not bool(is_thing[j]):
            continue
        plane = F.interpolate(masks_2d[j][None, None].float(), size=(ph, pw), mode="nearest")[0, 0] > 0.5
        for x, y, z in masks_3d[j].nonzero().tolist():
            u, v, d = geometry.project_voxels(torch.tensor([[x, y, z]], dtype=torch.float64), k, sampling="center")
            if not bool(geometry.inside_image(u, v, d, sampling="center")[0]):
                continue
            col, row = min(max(round(float(u[0])), 0), pw - 1), min(max(round(float(v[0])), 0), ph - 1)
            if not bool(plane[row, col]):
                hidden[x, y, z] = True
    return hidden


def test_hidden_thing_voxels_against_brute_force(setup) -> None:
    """The GT thing voxels whose plane pixel lies outside their own 2D mask, against a voxel-by-voxel loop; stuff
    voxels are never flagged; a thing whose 2D mask covers the image hides nothing."""
    _, _, model, batch = setup
    geo = model.geometry
    masks_3d, masks_2d, is_thing = batch["masks_3d_256"][0], batch["masks"][0], batch["is_thing"][0]
    k = batch["intrinsic_reduced"][0]
    got = hidden_thing_voxels(masks_3d, masks_2d, is_thing, k, geo)
    want = _hidden_by_brute_force(batch, geo)
    assert torch.equal(got, want)
    things = masks_3d[is_thing.bool()].any(0)
    assert 0 < int(got.sum()) < int(things.sum())  # the frame has both hidden and shown thing voxels
    assert not bool((got & ~things).any())  # only thing voxels
    full = masks_2d.clone()
    full[is_thing.bool()] = True
    assert not bool(hidden_thing_voxels(masks_3d, full, is_thing, k, geo).any())
    assert not bool(hidden_thing_voxels(masks_3d, masks_2d, torch.zeros_like(is_thing), k, geo).any())


def test_hidden_thing_weight_multiplies_the_weighting_there(setup) -> None:
    """``model.frustum3d.hidden_thing_weight``: the criterion's loss equals FrustumLoss on targets whose
    weighting is x factor at the hidden voxels (max-pooled like the segment masks on the coarse levels)."""
    spec, _, model, batch = setup
    cpu = torch.device("cpu")
    base = targets_3d(batch, cpu)
    up = upweight_hidden_things(base, batch, 4.0, model.geometry)
    hidden = _hidden_by_brute_force(batch, model.geometry)[None]
    torch.testing.assert_close(up["weighting_256"], torch.where(hidden, 4.0 * base["weighting_256"], base["weighting_256"]))
    for lvl, (kernel, stride, pad) in (("128", (4, 2, 1)), ("64", (8, 4, 2))):
        pooled = F.max_pool3d(hidden[:, None].float(), kernel, stride, pad)[:, 0] > 0
        assert pooled.any() and not pooled.all()
        torch.testing.assert_close(up[f"weighting_{lvl}"], torch.where(pooled, 4.0 * base[f"weighting_{lvl}"],
                                                                        base[f"weighting_{lvl}"]))
    spec4 = spec.model_copy(deep=True)
    spec4.model.frustum3d.hidden_thing_weight = 4.0
    net = copy.deepcopy(model)
    net.train()
    torch.manual_seed(0)
    out = net(batch["image"], batch["intrinsic_reduced"], batch["frustum_mask"], gt_occupancy(batch, cpu))
    crit1, crit4 = Stage3DCriterion(spec), Stage3DCriterion(spec4)
    assert crit1.geometry is None  # off: no projection at all
    torch.manual_seed(1)  # the matcher samples random points: the same points give both calls the same pairs
    _, terms1, _ = crit1(out, batch)
    torch.manual_seed(1)
    _, terms4, indices = crit4(out, batch)
    want = crit4.loss(out, up, indices, Stage3DCriterion.num_masks(batch, cpu))
    for key, value in want.items():
        torch.testing.assert_close(terms4[key], value, msg=key)
    assert terms4["loss_occupancy_64"] > terms1["loss_occupancy_64"]
    assert terms4["loss_panoptic_64"] > terms1["loss_panoptic_64"]


def test_things_of_2d_leaves_out_the_thing_queries_the_2d_result_does_not_show(setup) -> None:
    """``model.frustum3d.things_of_2d`` (evaluation only): a thing-class query that wins no pixel of a thing
    segment of the 2D result (brute force over the plane's pixels) becomes "no object" for the 3D fusion; every
    other query and every 3D output is unchanged, and training ignores the setting."""
    _, _, model, batch = setup
    net = copy.deepcopy(model).eval()
    net.object_mask_threshold = 0.0  # random 2D weights: keep every query with a class so that there are things
    args = (batch["image"], batch["intrinsic_reduced"], batch["frustum_mask"])
    with torch.no_grad():
        plain = net(*args)
        net.things_of_2d = True
        only = net(*args)
    torch.testing.assert_close(only["panoptic_256"].feats, plain["panoptic_256"].feats)
    logits = plain["plane"].class_logits[0]
    no_object = logits.shape[-1] - 1
    scores, labels = torch.softmax(logits, -1).max(-1)
    pan, segments = plain["plane"].panoptic_2d[0]
    thing_segments = {int(sg["id"]) for sg in segments if sg["isthing"]}
    mask_logits = plain["plane"].mask_logits[0]
    owners = set()
    for y in range(pan.shape[0]):
        for x in range(pan.shape[1]):
            if int(pan[y, x]) in thing_segments:
                bid = torch.where(labels.ne(no_object), scores * torch.sigmoid(mask_logits[:, y, x]), -1.0)
                owners.add(int(bid.argmax()))
    stuff = set(net.stuff_ids)
    things = {q for q in range(len(labels)) if int(labels[q]) not in stuff | {0, no_object}}
    dropped = things - owners
    assert owners and dropped  # both kinds occur in this frame
    after = only["plane"].class_logits[0]
    for q in range(len(labels)):
        if q in dropped:
            assert int(after[q].argmax()) == no_object
        else:
            torch.testing.assert_close(after[q], logits[q])
    net.train()
    out = net(*args, gt_occupancy(batch, torch.device("cpu")))
    torch.testing.assert_close(out["plane"].class_logits, plain["plane"].class_logits)


def test_test_time_flip_averages_the_mirrored_pass_on_the_plane(setup) -> None:
    """``model.frustum3d.test_time_flip`` (evaluation only): the plane's depth and occupancy probabilities are the means
    of the plain pass and the mirrored pass flipped back (each pass computed alone for the reference); the queries'
    class and mask logits, the 2D panoptic result and the features stay the plain pass's; the averaged depth is
    mirror-equivariant (the mirrored image gives the mirrored depth); training ignores the setting."""
    _, _, model, batch = setup
    net = copy.deepcopy(model).eval()
    images, k, fr = batch["image"], batch["intrinsic_reduced"], batch["frustum_mask"]
    hw = images.shape[-2:]
    with torch.no_grad():
        plain = net(images, k, fr)["plane"]
        mirrored = net.plane(net.infer_2d(images.flip(-1)), hw)
        net.test_time_flip = True
        tta = net(images, k, fr)["plane"]
        tta_of_mirror = net(images.flip(-1), k, fr)["plane"]

    torch.testing.assert_close(tta.depth, (plain.depth + mirrored.depth.flip(-1)) / 2)
    torch.testing.assert_close(tta.occupancy.sigmoid(), (plain.occupancy.sigmoid() + mirrored.occupancy.sigmoid().flip(-1)) / 2,
                               atol=2e-6, rtol=0)
    for name in ("mask_logits", "class_logits", "semantic", "mask_features", "queries"):
        torch.testing.assert_close(getattr(tta, name), getattr(plain, name))
    assert torch.equal(tta.panoptic_2d[0][0], plain.panoptic_2d[0][0])
    assert not torch.equal(tta.depth, plain.depth)  # the mirrored pass did change something
    torch.testing.assert_close(tta_of_mirror.depth, tta.depth.flip(-1))
    net.train()
    assert "flipped" not in net.infer_2d(images)


def test_semantic_head_targets_loss_and_fusion_gate(data_dir: Path, tmp_path: Path) -> None:
    """``model.frustum3d.semantic_weight``: the 3D stage's training batches carry the GT ``semantic_3d`` volume (every
    voxel of a 3D segment mask has its segment's class there), the criterion adds the weighted cross-entropy and
    trains the head; out of training the fusion gate (brute force per voxel and query) keeps a voxel where the head
    predicts a thing class from the kept queries of other classes, when a kept query of that class exists."""
    from frustum3d.panoptic import kept_query_mask
    from nvp3d.model.semantic_gate import GATED_LOGIT, gate_by_semantics

    spec = tiny_3d_spec(data_dir, tmp_path)
    spec.model.frustum3d.semantic_weight = 2.0
    dm = NVP3DDataModule(spec, splits=("train",))
    dm.setup()
    batch = collate_samples([dm.datasets["train"][i] for i in range(2)])
    sem = batch["semantic_3d"]
    assert sem.dtype == torch.uint8 and sem.shape == batch["occupancy_256"].shape
    for b in range(2):
        for label, mask in zip(batch["labels"][b].tolist(), batch["masks_3d_256"][b], strict=True):
            assert bool((sem[b][mask] == label).all())
    torch.manual_seed(0)
    model = build_net3d(spec, dm.thing_ids, dm.stuff_ids)
    model.completion.threshold = 0.95
    assert model.completion.semantic_256 is not None
    model.train()
    out = model(batch["image"], batch["intrinsic_reduced"], batch["frustum_mask"], gt_occupancy(batch, torch.device("cpu")))
    total, terms, _ = Stage3DCriterion(spec)(out, batch)
    assert float(terms["loss_semantic"].detach()) > 0
    total.backward()
    assert float(model.completion.semantic_256[3].weight.grad.abs().sum()) > 0
    model.eval()
    model.object_mask_threshold = 0.0  # random 2D weights: keep every query with a class
    with torch.no_grad():
        model.semantic_gate = False
        plain = model(batch["image"], batch["intrinsic_reduced"], batch["frustum_mask"])
        model.semantic_gate = True
        gated = model(batch["image"], batch["intrinsic_reduced"], batch["frustum_mask"])
    assert torch.equal(gate_by_semantics(plain, plain["plane"].class_logits, 0.0, model.stuff_ids)["panoptic_256"].feats,
                       gated["panoptic_256"].feats)
    before, after = plain["panoptic_256"], gated["panoptic_256"].feats
    changed = 0
    for row, (b, *_) in enumerate(before.coords.tolist()):
        _, labels, kept = kept_query_mask(plain["plane"].class_logits[b], 0.0)
        cls = int(plain["semantic_256"].feats[row, 1:].argmax()) + 1
        exists = any(int(labels[q]) == cls and bool(kept[q]) for q in range(len(labels)))
        for q in range(len(labels)):
            blocked = exists and cls not in model.stuff_ids and bool(kept[q]) and int(labels[q]) != cls
            expect = GATED_LOGIT if blocked else float(before.feats[row, q])
            assert float(after[row, q]) == expect
            changed += blocked
    assert changed > 0


def test_checkpoint_keys_split_by_stage(setup, tmp_path: Path) -> None:
    spec, dm, model, _ = setup
    keys = list(model.state_dict())
    assert any(k.startswith("backbone.") for k in keys) and any(k.startswith("completion.") for k in keys)
    assert set(model.trainable_state_dict()) == {k for k in keys if is_3d_key(k)}
    path = tmp_path / "m.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    torch.manual_seed(123)
    other = build_net3d(spec, dm.thing_ids, dm.stuff_ids)
    r2 = load_stage_weights(other, str(path), "2d", "train.checkpoint_2d")
    r3 = load_stage_weights(other, str(path), "3d", "train.checkpoint_3d")
    assert not r2.missing and not r3.missing and r2.loaded + r3.loaded == len(keys)
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k], msg=k)


def test_fusion_matches_dense_reference(setup) -> None:
    spec, dm, model, batch = setup
    model.eval()
    with torch.no_grad():
        out = model(batch["image"], batch["intrinsic_reduced"], batch["frustum_mask"])
    # make the fusion non-trivial: half the voxels lie on the surface, two queries own some voxels
    geo = out["geometry"]
    feats = geo.feats.clone()
    feats[::2] = 0.5
    geo = out["geometry"] = geo.replace_feats(feats)
    pan = out["panoptic_256"]
    pf = pan.feats.clone()
    pf[: len(pf) // 3, 2] += 20.0
    pf[len(pf) // 3:, 5] += 20.0
    out["panoptic_256"] = pan.replace_feats(pf)
    tdf = dense_tdf(geo, 0, (32, 32, 32), 3.0)
    ref = torch.full((32, 32, 32), 3.0)
    for c, v in zip(geo.coords.tolist(), geo.feats[:, 0].tolist(), strict=True):
        ref[c[1], c[2], c[3]] = v
    torch.testing.assert_close(tdf, ref)
    fused = fuse_sample(out, 0, grid_dims=(32, 32, 32), truncation=3.0, stuff_ids=dm.stuff_ids,
                        object_mask_threshold=0.0)
    pan = out["panoptic_256"]
    q = pan.feats.shape[1]
    dense = torch.full((q, 32, 32, 32), -1e4)  # voxels without logits: sigmoid 0
    c = pan.coords
    dense[:, c[:, 1], c[:, 2], c[:, 3]] = pan.feats.T
    want = panoptic_fusion(out["plane"].class_logits[0], dense, tdf, stuff_classes=dm.stuff_ids,
                           object_mask_threshold=0.0)
    assert fused.mapping == want.mapping and len(fused.mapping) > 0
    torch.testing.assert_close(fused.panoptic, want.panoptic)
    torch.testing.assert_close(fused.semantic, want.semantic)
    # the Predictor's voxel form is the same frame: dense volumes rebuilt from it equal the dense fusion's, both
    # computed at the voxels (shared set) and read from the dense fusion (a geometry of another set)
    from nvp3d.inference.volumes import VoxelVolumes
    from nvp3d.model.fusion import fuse_voxels_batch

    kw = dict(grid_dims=(32, 32, 32), truncation=3.0, stuff_ids=dm.stuff_ids, object_mask_threshold=0.0)
    apart = {**out, "geometry": type(geo)(geo.coords.clone(), feats.clone(), stride=geo.stride,
                                          spatial_shape=geo.spatial_shape, batch_size=geo.batch_size)}
    assert out["geometry"].coordinate_set is out["panoptic_256"].coordinate_set
    assert apart["geometry"].coordinate_set is not out["panoptic_256"].coordinate_set
    for outputs in (out, apart):
        (vox,) = fuse_voxels_batch(outputs, **kw)
        assert vox.mapping == fused.mapping and vox.is_thing == fused.is_thing
        host = VoxelVolumes((32, 32, 32), 3.0, vox.index.numpy(), vox.tdf.numpy(), vox.semantic.numpy(),
                            vox.panoptic.numpy())
        assert np.array_equal(host.dense("geometry"), fused.tdf.numpy())
        assert np.array_equal(host.dense("panoptic"), fused.panoptic.numpy())
        assert np.array_equal(host.dense("semantic"), fused.semantic.numpy())


def test_fusion_takes_each_items_rows() -> None:
    """The fusion's per-item rows (a block from the set's counts, no device read at batch 1) are the rows whose
    batch index is the item's, for unsorted input, an empty item and batch 1."""
    from frustum3d.sparse import SparseVoxels
    from nvp3d.model.fusion import _rows

    coords = torch.tensor([[2, 1, 2, 3], [0, 0, 0, 1], [2, 0, 0, 0], [0, 5, 5, 5], [0, 1, 1, 1]])
    x = SparseVoxels(coords, torch.arange(5.0)[:, None], spatial_shape=(8, 8, 8), batch_size=4)
    for b in range(4):
        want = (x.coords[:, 0] == b).nonzero().flatten()
        got = torch.arange(x.num_voxels)[_rows(x, b)]
        assert torch.equal(got, want), b
        assert sorted(x.feats[_rows(x, b), 0].tolist()) == sorted(
            float(i) for i in range(5) if int(coords[i, 0]) == b)
    one = SparseVoxels(coords[:, :] * torch.tensor([0, 1, 1, 1]), torch.ones(5, 1), spatial_shape=(8, 8, 8))
    assert one.coordinate_set.batch_counts() == [5] and _rows(one, 0) == slice(0, 5)


def test_multi_scale_lifting_forward(setup) -> None:
    model = _variant_after_one_backward(setup, "use_multi_scale", True)
    adapters = model.completion.adapters
    assert adapters is not None and all(p.grad is not None for p in adapters.parameters())


def test_lifting_band_widens_the_projective_lifting(setup) -> None:
    """``model.frustum3d.lifting_band`` widens the projective lifting: the default lifts frustum3d's defaults
    (band = truncation, 3), a wider band a superset of voxels that holds all of ``lift_depth``'s at that band."""
    from frustum3d.lifting import lift_depth, occupancy_aware_lift

    spec, dm, model, batch = setup
    image, intrinsic, frustum = batch["image"], batch["intrinsic_reduced"], batch["frustum_mask"]
    with torch.no_grad():
        p = model.plane(model.infer_2d(image), image.shape[-2:])
        lifted, _ = model.lift(p, intrinsic, frustum)
        g = model.geometry
        want = torch.cat([lift_depth(p.depth, intrinsic, [p.mask_features, p.depth_features], p.semantic,
                                     geometry=g).coords,
                          occupancy_aware_lift(p.semantic, p.occupancy, p.depth, intrinsic, frustum,
                                               stuff_classes=model.stuff_ids, geometry=g).coords]).unique(dim=0)
    assert torch.equal(lifted.coords.unique(dim=0), want)

    def coords_with(**keys) -> set[tuple[int, ...]]:
        s = spec.model_copy(deep=True)
        for k, v in keys.items():
            setattr(s.model.frustum3d, k, v)
        torch.manual_seed(0)
        m = build_net3d(s, dm.thing_ids, dm.stuff_ids)
        m.load_state_dict(model.state_dict())
        m.eval()
        with torch.no_grad():
            out, _ = m.lift(m.plane(m.infer_2d(image), image.shape[-2:]), intrinsic, frustum)
        return {tuple(c) for c in out.coords.tolist()}

    base = coords_with()
    wide = coords_with(lifting_band=6)
    assert base < wide
    with torch.no_grad():
        band6 = lift_depth(p.depth, intrinsic, [p.mask_features, p.depth_features], p.semantic, geometry=g,
                           truncation=6)
    assert {tuple(c) for c in band6.coords.tolist()} <= wide
    assert build_net3d(spec, dm.thing_ids, dm.stuff_ids).lifting_band is None

def _eval_copy(model, batch):
    """A copy of the network in eval mode, its three inputs from ``batch`` and its plain output on them."""
    model = copy.deepcopy(model)
    model.eval()
    inputs = (batch["image"], batch["intrinsic_reduced"], batch["frustum_mask"])
    with torch.no_grad():
        plain = model(*inputs)
    return model, inputs, plain


def test_mask_prior_adds_the_2d_logit_of_each_voxels_pixel(setup) -> None:
    """``model.frustum3d.mask_prior_2d``: every level's 3D mask logits = the decoder's + the query's 2D mask logit at
    the pixel the voxel (cell centre) projects to; the prior is one gather on every level (dense 64 and sparse
    128/256 agree on the same cells), 0 outside the image, and gradients still reach the 3D parts only."""
    from frustum3d.sparse import SparseVoxels
    from nvp3d.model.mask_prior import add_mask_prior, mask_prior_at

    spec, _, model, batch = setup
    model, (img, k, fr), plain = _eval_copy(model, batch)
    g = model.geometry
    masks = plain["plane"].mask_logits
    assert masks is not None and masks.shape[:2] == plain["plane"].class_logits.shape[:2]
    # a synthetic 2D mask map: query q is +3 left of the image centre, -3 right of it
    bsz, q, h, w = masks.shape
    left = torch.where(torch.arange(w) < w // 2, 3.0, -3.0)
    synth = left.expand(bsz, q, h, w).clone()
    out = add_mask_prior({k2: plain[k2] for k2 in ("panoptic_64", "panoptic_128", "panoptic_256")}, synth, k, g)
    x256 = out["panoptic_256"]
    u, v, z = g.project_voxels(plain["panoptic_256"].coords[:, 1:].double(), k[0].double(), sampling="center")
    inside = g.inside_image(u, v, z, sampling="center")
    expect = torch.where(inside, torch.where(u.round() < w // 2, 3.0, -3.0), 0.0).float()
    diff = x256.feats - plain["panoptic_256"].feats
    assert torch.allclose(diff, expect[:, None].expand_as(diff), atol=1e-5)
    assert inside.any()
    # the projection inverts the lifting: lift the depth map with the pixel coordinates as features (one copy per
    # ray); each voxel's centre projects within its own pixel footprint of the mean pixel that landed in it
    from frustum3d.lifting import lift_depth

    depth = batch["depth_reduced"][:1].float()
    uu, vv = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="xy")
    lifted = lift_depth(depth, k[:1], [torch.stack([uu, vv])[None]], torch.zeros(1, 0, h, w), geometry=g, copies=1,
                        include_distance=False)
    pu, pv, pz = g.project_voxels(lifted.coords[:, 1:].double(), k[0].double(), sampling="center")
    footprint = k[0, 0, 0].double() * g.voxel_size / pz  # pixels per voxel at that depth
    assert ((pu - lifted.feats[:, 0].double()).abs() <= footprint).all()
    assert ((pv - lifted.feats[:, 1].double()).abs() <= footprint).all()
    # dense 64 and a sparse set of the same cells get the same prior
    d64 = out["panoptic_64"] - plain["panoptic_64"]
    s = g.grid_dims[0] // d64.shape[-1]
    cells = torch.nonzero(torch.isfinite(plain["panoptic_64"][0, 0]))[:50]
    sv = SparseVoxels(torch.cat([torch.zeros(len(cells), 1, dtype=torch.long), cells * s], 1),
                      torch.zeros(len(cells), q), stride=s, spatial_shape=g.grid_dims, batch_size=1)
    sp = add_mask_prior({"panoptic_128": sv}, synth, k, g)["panoptic_128"].feats
    assert torch.allclose(sp, d64[0][:, cells[:, 0], cells[:, 1], cells[:, 2]].T, atol=1e-5)
    # outside the image: 0
    far = torch.tensor([[-1000.0, -1000.0, 5.0]], dtype=torch.float64)
    assert mask_prior_at(far, torch.zeros(1, dtype=torch.long), synth, k, g).abs().max() == 0
    # with the plane depth: only voxels within the truncation band of their pixel's depth keep the prior
    depth = plain["plane"].depth
    banded = add_mask_prior({"panoptic_256": plain["panoptic_256"]}, synth, k, g, depth)["panoptic_256"]
    bd = (banded.feats - plain["panoptic_256"].feats)[:, 0]
    ui, vi = u.round().long().clamp(0, w - 1), v.round().long().clamp(0, h - 1)
    near = inside & ((z - depth[0][vi, ui].double()).abs() <= g.truncation * g.voxel_size)
    assert near.any() and (inside & ~near).any()
    assert torch.allclose(bd, torch.where(near, expect, 0.0), atol=1e-5)

    # the switch in the network: forward differs by exactly the prior of the real 2D masks, backward reaches 3D only
    model.mask_prior_2d = True
    with torch.no_grad():
        with_prior = model(img, k, fr)
    ref = add_mask_prior({"panoptic_256": plain["panoptic_256"]}, masks, k, g, plain["plane"].depth)["panoptic_256"]
    assert torch.equal(with_prior["panoptic_256"].coords, ref.coords)
    assert torch.allclose(with_prior["panoptic_256"].feats, ref.feats, atol=1e-5)
    model.train()
    out = model(img, k, fr, gt_occupancy=gt_occupancy(batch, torch.device("cpu")))
    total, _, _ = Stage3DCriterion(spec)(out, batch)
    total.backward()
    assert all(p.grad is None for m in model.modules_2d() for p in m.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.completion.parameters())


def _assert_training_untouched(model, batch, switch: str, off: float) -> None:
    """In training mode the network's level-256 mask logits are the same with the evaluation-only ``switch`` as
    set and with it at ``off``."""
    img, k, fr = batch["image"], batch["intrinsic_reduced"], batch["frustum_mask"]
    occupancy = gt_occupancy(batch, torch.device("cpu"))
    model.train()
    with torch.no_grad():
        trained = model(img, k, fr, gt_occupancy=occupancy)
    setattr(model, switch, off)
    with torch.no_grad():
        reference = model(img, k, fr, gt_occupancy=occupancy)
    assert torch.equal(trained["panoptic_256"].feats, reference["panoptic_256"].feats)


def test_2d_labels_replace_the_3d_logits_near_each_pixels_depth_out_of_training(setup) -> None:
    """``model.frustum3d.labels_2d_bands``: in evaluation the level-256 mask logits of the voxels within that many
    truncation bands of their pixel's predicted depth become the 2D mask logits (clamped), brute force per voxel;
    the other voxels and the coarser levels keep the 3D logits, and training is untouched."""
    from nvp3d.model.mask_prior import PRIOR_CLAMP

    _, _, model, batch = setup
    model, (img, k, fr), plain = _eval_copy(model, batch)
    model.labels_2d_bands = 1.5
    with torch.no_grad():
        labelled = model(img, k, fr)
    g = model.geometry
    p0, p1 = plain["panoptic_256"], labelled["panoptic_256"]
    assert torch.equal(p0.coords, p1.coords)
    assert torch.equal(plain["panoptic_128"].feats, labelled["panoptic_128"].feats)
    masks, depth = plain["plane"].mask_logits, plain["plane"].depth
    _, _, h, w = masks.shape
    replaced = 0
    for i in range(p0.num_voxels):
        b, c = int(p0.coords[i, 0]), p0.coords[i, 1:].double()[None]
        u, v, z = g.project_voxels(c, k[b].double(), sampling="center")
        ui, vi = int(u.round().clamp(0, w - 1)), int(v.round().clamp(0, h - 1))
        near = bool(g.inside_image(u, v, z, sampling="center")[0]) and \
            abs(float(z[0]) - float(depth[b, vi, ui])) <= 1.5 * g.truncation * g.voxel_size
        want = masks[b, :, vi, ui].clamp(-PRIOR_CLAMP, PRIOR_CLAMP) if near else p0.feats[i]
        assert torch.allclose(p1.feats[i], want.to(p1.feats.dtype), atol=1e-5), i
        replaced += near
    assert 0 < replaced < p0.num_voxels
    _assert_training_untouched(model, batch, "labels_2d_bands", 0.0)


def test_coarse_mask_logits_add_the_level_128_parents_out_of_training(setup) -> None:
    """``model.frustum3d.coarse_mask_weight``: in evaluation each level-256 voxel's mask logits gain the weight times
    those of the level-128 voxel containing it (brute force per voxel; nothing where that voxel was pruned); the
    coarser levels and training are untouched."""
    _, _, model, batch = setup
    model, (img, k, fr), plain = _eval_copy(model, batch)
    model.coarse_mask_weight = 0.5
    with torch.no_grad():
        mixed = model(img, k, fr)
    p0, p1, coarse = plain["panoptic_256"], mixed["panoptic_256"], plain["panoptic_128"]
    assert torch.equal(p0.coords, p1.coords) and torch.equal(coarse.feats, mixed["panoptic_128"].feats)
    parents = {tuple(c): i for i, c in enumerate(coarse.coords.tolist())}
    found = 0
    for i, (b, x, y, z) in enumerate(p0.coords.tolist()):
        j = parents.get((b, x // 2 * 2, y // 2 * 2, z // 2 * 2))
        want = p0.feats[i] + (0.5 * coarse.feats[j] if j is not None else 0.0)
        assert torch.allclose(p1.feats[i], want, atol=1e-6), i
        found += j is not None
    assert 0 < found
    _assert_training_untouched(model, batch, "coarse_mask_weight", 0.0)


def test_parent_rows_against_brute_force() -> None:
    """:func:`nvp3d.model.coarse_masks.parent_rows` on random sets of two batch items: the coarse row containing
    each fine voxel, -1 where the coarse set lacks it; an empty coarse set gives -1 everywhere."""
    from frustum3d.sparse import SparseVoxels
    from nvp3d.model.coarse_masks import parent_rows

    gen = torch.Generator().manual_seed(3)
    fine_c = torch.unique(torch.cat([torch.randint(0, 2, (200, 1), generator=gen),
                                     torch.randint(0, 16, (200, 3), generator=gen)], 1), dim=0)
    coarse_c = torch.unique(torch.cat([torch.randint(0, 2, (60, 1), generator=gen),
                                       torch.randint(0, 8, (60, 3), generator=gen) * 2], 1), dim=0)
    fine = SparseVoxels(fine_c, torch.zeros(len(fine_c), 1), stride=1, spatial_shape=(16, 16, 16), batch_size=2)
    coarse = SparseVoxels(coarse_c, torch.zeros(len(coarse_c), 1), stride=2, spatial_shape=(16, 16, 16),
                          batch_size=2)
    rows = parent_rows(fine, coarse).tolist()
    index = {tuple(c): i for i, c in enumerate(coarse.coords.tolist())}
    want = [index.get((b, x // 2 * 2, y // 2 * 2, z // 2 * 2), -1) for b, x, y, z in fine.coords.tolist()]
    assert rows == want and 0 < sum(r >= 0 for r in rows) < len(rows)
    empty = SparseVoxels(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 1), stride=2, spatial_shape=(16, 16, 16),
                         batch_size=2)
    assert parent_rows(fine, empty).tolist() == [-1] * fine.num_voxels


def test_train_depth_noise_moves_the_lifting_depth_in_training_only(setup) -> None:
    """``model.frustum3d.train_depth_noise``: in training mode the plane depth that is lifted (and returned) is the
    2D depth times a random factor, so other voxels are lifted; in eval mode the network is the plain one."""
    spec, dm, model, batch = setup
    noisy_spec = spec.model_copy(deep=True)
    noisy_spec.model.frustum3d.train_depth_noise = 0.3
    torch.manual_seed(0)
    noisy = build_net3d(noisy_spec, dm.thing_ids, dm.stuff_ids)
    noisy.load_state_dict(model.state_dict())
    noisy.completion.threshold = model.completion.threshold
    assert noisy.train_depth_noise == 0.3 and model.train_depth_noise == 0.0
    inputs = (batch["image"], batch["intrinsic_reduced"], batch["frustum_mask"])
    with torch.no_grad():
        clean = noisy.plane(noisy.infer_2d(inputs[0]), inputs[0].shape[-2:])
        clean_lifted, _ = noisy.lift(clean, inputs[1], inputs[2])
        noisy.train()
        trained = noisy(*inputs, gt_occupancy(batch, torch.device("cpu")))
        ratio = trained["plane"].depth / clean.depth
        assert not torch.allclose(ratio, torch.ones_like(ratio)) and bool((ratio > 0).all())
        lifted, _ = noisy.lift(trained["plane"], inputs[1], inputs[2])
        assert not torch.equal(lifted.coords, clean_lifted.coords)
        noisy.eval()
        plain = copy.deepcopy(model).eval()
        a, b = noisy(*inputs), plain(*inputs)
    assert torch.equal(a["plane"].depth, clean.depth)
    assert torch.equal(a["geometry"].coords, b["geometry"].coords)
    torch.testing.assert_close(a["geometry"].feats, b["geometry"].feats)


def test_semantic_voxel_confusion_brute_force() -> None:
    """The semantic head's evaluation (``nvp3d.evaluation.semantic_voxels``): counts of GT class x arg-max class
    (free space 0 excluded) over the predicted voxels whose GT class is labelled, and its summary, per voxel."""
    from frustum3d.sparse import SparseVoxels
    from nvp3d.evaluation.semantic_voxels import SemanticVoxelConfusion, format_semantic_summary

    g = torch.Generator().manual_seed(3)
    coords = torch.unique(torch.cat([torch.randint(0, 2, (60, 1), generator=g),
                                     torch.randint(0, 6, (60, 3), generator=g)], 1), dim=0)
    logits = torch.randn(coords.shape[0], 4, generator=g)
    logits[:5, 0] = 50.0  # free space wins the full arg-max here, but the head's class is the best of 1..3
    sv = SparseVoxels(coords, logits, stride=1, spatial_shape=(6, 6, 6), batch_size=2)
    sem = torch.randint(0, 5, (2, 6, 6, 6), generator=g, dtype=torch.uint8)  # 4: past the 4 classes
    conf = SemanticVoxelConfusion(4)
    conf.update(sv, sem)
    expect = torch.zeros(4, 4, dtype=torch.int64)
    for (b, x, y, z), row in zip(coords.tolist(), logits, strict=True):
        gt = int(sem[b, x, y, z])
        if 0 < gt < 4:
            expect[gt, int(row[1:].argmax()) + 1] += 1
    assert torch.equal(conf.counts, expect)
    classes = {1: ("chair", True), 2: ("table", True), 3: ("wall", False)}
    summary = conf.summary(conf.counts, classes)
    assert summary["voxels"] == int(expect.sum())
    assert summary["voxel_accuracy"] == pytest.approx(float(expect.diag().sum()) / float(expect.sum()))
    for r in summary["per_class"]:
        k = r["class_id"]
        assert r["recall"] == pytest.approx(float(expect[k, k]) / float(expect[k].sum()))
        assert r["iou"] == pytest.approx(float(expect[k, k]) / float(expect[k].sum() + expect[:, k].sum() - expect[k, k]))
    things = [r["recall"] for r in summary["per_class"] if r["isthing"]]
    assert summary["thing_recall_mean"] == pytest.approx(sum(things) / len(things))
    assert format_semantic_summary(summary).startswith("3D semantic head: ")
    assert conf.summary(torch.zeros(4, 4, dtype=torch.int64), classes) is None
