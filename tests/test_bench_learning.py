"""Smoke test of ``tools/bench_learning.py`` on CPU with a tiny budget: held-out scenes are whole scenes,
both stages train and are evaluated, and the JSON and the PNG plot are written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


def _load_tool(repo_root: Path, monkeypatch):
    # a regular import (tools/ on sys.path) so that the spawned data-generation processes can import it too
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    return importlib.import_module("bench_learning")


def test_bench_learning_cpu_smoke(repo_root: Path, tmp_path: Path, monkeypatch) -> None:
    tool = _load_tool(repo_root, monkeypatch)
    torch.set_num_threads(1)
    out = tmp_path / "bench"
    rc = tool.main([
        "--out", str(out), "--cpu", "--scenes", "3", "--held-out", "1", "--frames-per-scene", "2",
        "--image", "64x48", "--grid", "32", "--gen-processes", "2", "--epochs-2d", "1", "--epochs-3d", "1", "--budget-2d", "60",
        "--budget-3d", "60", "--set2d", "model.preset=tiny", "--set2d", "train.precision=fp32",
        "--set2d", "train.validation_interval=1", "--set2d", "train.iters_per_epoch=4",  # 2 passes of 2 batches
        "--set2d", "dataset.train.batch_size=2", "--set3d", "dataset.train.batch_size=2",
        "--set3d", "model.frustum3d.unet_features=8", "--set3d", "model.frustum3d.unet_output_channels=8",
        "--set3d", "train.validation_interval=1",
        "--eval-3d", "plain:model.frustum3d.coarse_mask_weight=0", "--eval-3d", "c50:model.frustum3d.coarse_mask_weight=0.5",
        "--eval-3d", "every_query:model.frustum3d.things_of_2d=false",
    ])
    assert rc == 0
    result = json.loads((out / "bench_learning.json").read_text())
    meta = out / "data" / "meta"
    train_scenes = {e["scene_id"] for e in json.loads((meta / "train.json").read_text())}
    test_scenes = {e["scene_id"] for e in json.loads((meta / "test.json").read_text())}
    assert len(train_scenes) == 2 and len(test_scenes) == 1 and not train_scenes & test_scenes
    assert result["data"]["train_frames"] == 4 and result["data"]["test_frames"] == 2
    s2, s3 = result["stages"]["2d"], result["stages"]["3d"]
    assert s2["steps"] == 4 and len(s2["curves"]["heldout"]) == 2 and "PQ_th" in s2["kpi"]
    # the curve's last row is the final evaluation: its depth-aware PQ is the evaluation's test_dpq_0.1
    last = s2["curves"]["heldout"][-1]
    assert last["final"] and last["val_dpq_0.1"] == pytest.approx(s2["kpi"]["test_dpq_0.1"])
    # ... and its depth error; every in-run validation records the held-out depth error too (a depth curve)
    assert last["val_depth_mae"] == pytest.approx(s2["kpi"]["test_depth_mae"]) and last["val_depth_mae"] > 0.0
    assert all(row["val_depth_mae"] > 0.0 and row["val_depth_abs_rel"] > 0.0 for row in s2["curves"]["heldout"])
    # the seen-scene evaluation (all 4 training frames here) and the per-term losses of the first step
    seen = s2["train_frames"]
    assert seen["frames"] == 4 and {"PQ", "PQ_th", "PQ_st"} <= set(seen)  # NaN (null) at 64x48: no segments
    assert seen["PQ"] is None or 0.0 <= seen["PQ"] <= 100.0
    assert seen["test_depth_mae"] > 0.0 and seen["test_depth_abs_rel"] > 0.0  # the training frames' depth error
    step, terms = s2["curves"]["terms"][0]
    assert step == 1 and {"loss_ce", "loss_mask", "loss_dice"} <= set(terms)
    assert all(v >= 0.0 for v in terms.values())
    assert s3["steps"] == 2 and {"PRQ", "RSQ", "RRQ"} <= set(s3["kpi"])
    assert {r["name"] for r in s3["per_class"]} >= {"wall", "floor"}
    # --cpu loads every split in the main process (the recipes ask for 10 / 4 workers)
    for stage in (s2, s3):
        assert {stage["spec"]["dataset"][split]["num_workers"] for split in ("train", "val", "test")} == {0}
    assert s3["things"]["gt_things"] == sum(r["TP"] + r["FN"] for r in s3["per_class"] if r["isthing"])
    seen3 = s3["train_frames"]  # the 3D stage on the same training frames
    assert seen3["frames"] == 4 and {"PRQ", "RSQ", "RRQ"} <= set(seen3)
    assert all(0.0 <= seen3[k] <= 100.0 for k in ("PRQ", "RSQ", "RRQ"))
    # --eval-3d: the recipe's own setting (0) evaluated again gives the stage's scores; 0.5 is a second reading
    evals = s3["evals"]
    assert evals["plain"]["set"] == ["model.frustum3d.coarse_mask_weight=0"]
    assert all(evals["plain"][k] == pytest.approx(s3["kpi"][k]) for k in ("PRQ", "RSQ", "RRQ"))
    assert all(0.0 <= evals["c50"][k] <= 100.0 for k in ("PRQ", "RSQ", "RRQ"))
    png = out / "bench_learning.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000

    # tools/diagnose_3d.py on the same run: its plain PRQ is the bench's 3D evaluation of the same checkpoint fusing
    # every query (the recipe's things_of_2d off), its "things of the 2D result" row the recipe's own fusion; the
    # geometry oracle and the visibility bound are reported
    assert s3["spec"]["model"]["frustum3d"]["things_of_2d"] is True
    diagnose = importlib.import_module("diagnose_3d")
    assert diagnose.main(["--bench", str(out)]) == 0
    report = json.loads((out / "diagnose_3d.json").read_text())
    assert report["frames"] == 2
    assert report["plain"]["PRQ"] == pytest.approx(evals["every_query"]["PRQ"], abs=1e-6)
    assert report["fusion_sweep"]["things of the 2D result"]["PRQ"] == pytest.approx(s3["kpi"]["PRQ"], abs=1e-6)
    assert 0.0 <= report["geometry_oracle"]["PRQ"] <= 100.0
    assert 0.0 <= report["gt_depth_lifting"]["PRQ"] <= 100.0  # the same checkpoint lifted at the GT depth
    assert 0.0 <= report["label_oracle"]["PRQ"] <= 100.0  # GT labels on the predicted geometry
    # every evaluated GT thing has one outcome, once over all of them and once over the 2D targets
    assert report["things"]["gt_things"] == report["visibility"]["gt_things"]
    assert report["things_2d_targets"]["gt_things"] == report["visibility"]["gt_things_in_2d"]
    assert report["things_2d_targets"]["pred_things"] == report["things"]["pred_things"]
    sweep = report["fusion_sweep"]  # the recipe's own thresholds reproduce the plain fusion
    own = sweep[f"omt {s3['spec']['model']['object_mask_threshold']:g}, mask 0.5"] if "spec" in s3 else None
    assert len(sweep) >= 4 and all(0.0 <= k["PRQ"] <= 100.0 for k in sweep.values())
    if own is not None:
        assert own["PRQ"] == pytest.approx(report["plain"]["PRQ"], abs=1e-6)
    # the network's own labels_2d_bands path (a second evaluation) and the sweep's re-fusion of the kept raw outputs
    # label the same voxels with the same 2D logits: the same PRQ
    assert report["labels_2d_bands"]["PRQ"] == pytest.approx(sweep["2D labels in band"]["PRQ"], abs=1e-6)
    assert all(k["things"]["gt_things"] == report["things"]["gt_things"] for k in sweep.values())
    assert {"2D in band + nearest 2", "2D labels in 2 bands"} <= set(sweep)
    vis = report["visibility"]
    assert 0 <= vis["gt_things_in_2d"] <= vis["gt_things"] <= vis["gt_segments"]
    assert vis["gt_segments_in_2d"] <= vis["gt_segments"] and vis["gt_segments"] > 0
    assert 0.0 <= report["surface"]["iou"] <= 1.0
    depth = report["depth"]  # the 2D stage's plane depth against the GT depth of the same frames
    assert depth["pixels"] > 0 and depth["median_abs_m"] >= 0.0
    assert 0.0 <= depth["within_half_voxel"] <= depth["within_1_voxel"] <= 1.0
    # the same on the run's 4 training frames (its training split, read without augmentation)
    # how much of the GT surface the lifting reaches: a wider band reaches at least as much, in more voxels
    lifting = report["lifting"]
    band = [lifting[f"projective +-{b}"] for b in (3, 5, 8)]
    assert all(0.0 <= r["surface_reached"] <= 1.0 for r in lifting.values())
    assert band[0]["surface_reached"] <= band[1]["surface_reached"] <= band[2]["surface_reached"]
    assert 0 < band[0]["lifted_per_frame"] < band[2]["lifted_per_frame"]
    assert "projective +-3 at the GT depth" in lifting
    train_depth = report["depth_train"]
    assert train_depth["pixels"] > 0 and 0.0 <= train_depth["within_1_voxel"] <= 1.0
    assert train_depth["pixels"] != depth["pixels"] or train_depth["mean_m"] != depth["mean_m"]

    # tools/profile_training_3d.py on the same 2D stage: real 3D steps through the Lightning loop, each split into
    # forward + loss, backward and the rest; one step under torch.profiler
    profile = importlib.import_module("profile_training_3d")
    rows_file = tmp_path / "profile_rows.json"
    assert profile.main(["--bench", str(out), "--steps", "3", "--profile-from", "1", "--profile-steps", "1",
                         "--top", "5", "--out", str(rows_file), "--set3d", "dataset.train.num_workers=0",
                         "--set3d", "dataset.train.batch_size=2", "--set3d", "model.frustum3d.unet_features=8"]) == 0
    rows = json.loads(rows_file.read_text())
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["batch"] == 2 for r in rows)
    assert all(0.0 < r["forward_loss"] and 0.0 < r["backward"] and r["rest_s"] >= 0.0 for r in rows)
    assert all(r["forward_loss"] + r["backward"] <= r["in_step_s"] + 1e-9 for r in rows)

    # two 3D variants side by side on the same 2D stage (--from-2d): each trains in its own process and folder
    three_d = ["--set3d", "dataset.train.batch_size=2", "--set3d", "dataset.train.num_workers=0",
               "--set3d", "dataset.val.num_workers=0", "--set3d", "dataset.test.num_workers=0",
               "--set3d", "model.frustum3d.unet_output_channels=8", "--set3d", "train.validation_interval=1",
               "--set3d", "train.optim.warmup_iters=1"]
    ab = tmp_path / "ab"
    # a step budget (--steps-3d 3): one epoch is 2 steps here, so the budget, not the epoch count, ends the fit
    rc = tool.main(["--out", str(ab), "--from-2d", str(out), "--cpu", "--threads", "1", "--image", "64x48",
                    "--grid", "32", "--epochs-3d", "1", "--budget-3d", "60", "--steps-3d", "3", "--eval-train", "2",
                    *three_d, "--deadline", "3600", "--eval-3d", "every_query:model.frustum3d.things_of_2d=false",
                    "--variant-3d", "narrow:model.frustum3d.unet_features=4",
                    "--variant-3d", "wide:model.frustum3d.unet_features=8"])
    assert rc == 0
    parent = json.loads((ab / "bench_learning.json").read_text())
    variants = parent["variants_3d"]
    assert set(variants) == {"narrow", "wide"}
    for name, width in (("narrow", 4), ("wide", 8)):
        v = variants[name]
        assert v["set3d"] == [f"model.frustum3d.unet_features={width}"] and v["steps"] == 3
        assert {"PRQ", "RSQ", "RRQ"} <= set(v["kpi"]) and v["train_frames"]["frames"] == 2
        run = json.loads((ab / f"variant3d_{name}" / "bench_learning.json").read_text())
        # the variant ends when the parent does (the same wall-clock end, its own start-up counted) and runs the
        # parent's --eval-3d too
        assert run["args"]["deadline_at"] == pytest.approx(parent["args"]["deadline_at"])
        assert 0 < run["args"]["deadline"] < parent["args"]["deadline"]
        stage = run["stages"]["3d"]
        assert stage["evals"]["every_query"]["set"] == ["model.frustum3d.things_of_2d=false"]
        spec = stage["spec"]
        assert spec["model"]["frustum3d"]["unet_features"] == width  # the variant's own setting was trained
        # the schedule ends at the step budget and the clock did not move it
        assert spec["train"]["optim"]["max_steps"] == 3 and stage["curves"]["max_steps"] == []
    with pytest.raises(SystemExit, match="NAME:key=value"):
        tool.parse_variant("no colon")
    with pytest.raises(SystemExit, match="warmup_iters"):  # a budget inside the warmup would never decay
        tool.main(["--out", str(tmp_path / "bad"), "--from-2d", str(out), "--cpu", "--image", "64x48", "--grid", "32",
                   "--steps-3d", "3", *three_d[:-2]])


def test_clock_schedule_ends_the_poly_decay_with_the_budget(repo_root: Path, monkeypatch) -> None:
    """At 2 steps/s with 100 s of budget, step 40 (t = 20 s) projects 40 + 80 s x 2 = 200 steps; the scheduler's
    lr then follows the poly decay over 200 steps; ``clock_schedule=False`` leaves the recipe's value."""
    from types import SimpleNamespace

    from nvp3d.training.optim import WarmupPolyLR, warmup_poly_factor
    from nvp3d.training.step_limit import StepLimit

    tool = _load_tool(repo_root, monkeypatch)
    clock = {"t": 0.0}
    monkeypatch.setattr(tool.time, "perf_counter", lambda: clock["t"])
    for follow, expected in ((True, 200), (False, 1000)):
        clock["t"] = 0.0
        rec, curves = tool.make_callbacks(100.0, ("PQ",), clock_schedule=follow)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = WarmupPolyLR(opt, max_steps=1000, warmup_iters=5, warmup_factor=0.1)
        limit = StepLimit(1000)
        trainer = SimpleNamespace(global_step=0, lr_scheduler_configs=[SimpleNamespace(scheduler=sched)],
                                  should_stop=False, callbacks=[limit])
        rec.on_train_start(trainer, None)
        # the time budget, not the recipe's first estimate, stops a clock-scheduled run
        assert limit.max_steps == (0 if follow else 1000)
        for step in range(41):
            trainer.global_step = step
            clock["t"] = step / 2.0
            rec.on_train_batch_start(trainer, None, None, step)
            opt.step()
            sched.step()
        assert sched.max_steps == expected
        assert opt.param_groups[0]["lr"] == pytest.approx(warmup_poly_factor(41, expected, 5, 0.1, 0.9))
        assert bool(curves["max_steps"]) == follow


def test_diagnose_gt_depth_lifting_replaces_the_plane_depth(repo_root, monkeypatch) -> None:
    """The depth oracle of tools/diagnose_3d.py: the plane's depth becomes the batch's GT depth where that is
    valid (> 0, resized to the plane when needed) and stays the 2D network's elsewhere; other fields are kept."""
    import dataclasses
    import types

    import torch

    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    diagnose = importlib.import_module("diagnose_3d")

    @dataclasses.dataclass
    class Plane:
        depth: torch.Tensor
        queries: torch.Tensor

    predicted = torch.full((1, 2, 4), 3.0)
    model = types.SimpleNamespace(plane=lambda out2d, hw: Plane(depth=predicted.clone(), queries=torch.ones(2)))
    module = types.SimpleNamespace(model=model)
    module.forward = lambda batch: module.model.plane(None, (2, 4))
    diagnose.use_gt_depth(module)

    gt = torch.tensor([[[1.0, 0.0, 2.0, 0.0], [0.0, 5.0, 0.0, 7.0]]])
    p = module.forward({"depth_reduced": gt})
    assert p.depth.tolist() == [[[1.0, 3.0, 2.0, 3.0], [3.0, 5.0, 3.0, 7.0]]]
    assert torch.equal(p.queries, torch.ones(2))
    coarse = torch.tensor([[[4.0, 0.0]]])  # [1, 1, 2]: resized (nearest) to the plane's 2 x 4
    assert module.forward({"depth_reduced": coarse}).depth.tolist() == [[[4.0, 4.0, 3.0, 3.0], [4.0, 4.0, 3.0, 3.0]]]


def test_diagnose_gt_scale_lifting_rescales_the_plane_depth(repo_root, monkeypatch) -> None:
    """The scale oracle: the plane's depth times one factor per image, the median of GT / predicted depth over
    the valid pixels (1 where an image has none); the depth's shape is the 2D network's."""
    import dataclasses
    import types

    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    diagnose = importlib.import_module("diagnose_3d")

    @dataclasses.dataclass
    class Plane:
        depth: torch.Tensor

    predicted = torch.tensor([[[1.0, 2.0, 4.0]], [[2.0, 2.0, 2.0]]])  # [2, 1, 3]
    model = types.SimpleNamespace(plane=lambda out2d, hw: Plane(depth=predicted.clone()))
    module = types.SimpleNamespace(model=model)
    module.forward = lambda batch: module.model.plane(None, (1, 3))
    diagnose.use_gt_depth(module, scale_only=True)
    gt = torch.tensor([[[2.0, 6.0, 0.0]], [[0.0, 0.0, 0.0]]])  # ratios 2 and 3 (median of two: lower, torch), none
    assert diagnose.image_scales(predicted, gt).tolist() == [2.0, 1.0]
    assert module.forward({"depth_reduced": gt}).depth.tolist() == [[[2.0, 4.0, 8.0]], [[2.0, 2.0, 2.0]]]


def test_diagnose_connected_components_match_scipy(repo_root, monkeypatch) -> None:
    """The fusion sweep's split rows label 26-connected pieces of equal segment id: the same partition as
    ``scipy.ndimage.label`` with a full 3x3x3 structure, per label, on random volumes."""
    from scipy import ndimage

    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    diagnose = importlib.import_module("diagnose_3d")
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        vol = (torch.rand(9, 7, 6, generator=gen) < 0.35).long() * torch.randint(1, 3, (9, 7, 6), generator=gen)
        voxels = torch.nonzero(vol.reshape(-1)).flatten()
        coords = torch.stack(torch.unravel_index(voxels, vol.shape), 1)
        labels = vol.reshape(-1)[voxels]
        comp = diagnose.connected_components(coords, labels, tuple(vol.shape))
        n_ref = 0
        for lab in (1, 2):
            ref, n = ndimage.label((vol == lab).numpy(), ndimage.generate_binary_structure(3, 3))
            n_ref += n
            mine = labels == lab
            pairs = set(zip(comp[mine].tolist(), ref.reshape(-1)[voxels[mine].numpy()].tolist()))
            assert len(pairs) == len(set(comp[mine].tolist())) == n  # one-to-one with scipy's components
        assert len(set(comp.tolist())) == n_ref


def test_diagnose_split_disconnected_things(repo_root, monkeypatch) -> None:
    """A thing segment in two separate pieces: the larger keeps its id, the other becomes a new segment of the
    same class when it has at least ``min_voxels`` voxels; stuff segments and diagonal contacts stay whole."""
    from frustum3d.panoptic import PanopticVolume

    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    diagnose = importlib.import_module("diagnose_3d")
    pan = torch.zeros(6, 4, 4, dtype=torch.int32)
    pan[0:2, 0, 0] = 1      # chair: 2 voxels ...
    pan[4:5, 0:2, 0] = 1    # ... and 2 voxels apart from them, then grown to 3 below
    pan[5, 0, 0] = 1
    pan[0, 3, 3] = 2        # wall (stuff) in two pieces
    pan[5, 3, 3] = 2
    pan[2, 2, 2] = 3        # table: two voxels touching diagonally only (26-connected)
    pan[3, 3, 3] = 3
    mapping = {1: 3, 2: 10, 3: 5}
    vol = PanopticVolume(panoptic=pan, semantic=torch.zeros_like(pan), mapping=mapping, mapping_tensor=torch.zeros(0, 2),
                         segment_queries={}, scores=torch.zeros(0), labels=torch.zeros(0))
    split = diagnose.split_disconnected_things(vol, (10, 11, 12), min_voxels=2)
    out, new = split.panoptic, split.mapping
    assert new == {1: 3, 2: 10, 3: 5, 4: 3}
    assert out[4:6, 0, 0].tolist() == [1, 1] and out[4, 1, 0].item() == 1   # the larger piece (3 voxels) keeps 1
    assert out[0:2, 0, 0].tolist() == [4, 4]
    assert out[0, 3, 3].item() == out[5, 3, 3].item() == 2
    assert out[2, 2, 2].item() == out[3, 3, 3].item() == 3
    kept = diagnose.split_disconnected_things(vol, (10, 11, 12), min_voxels=3)
    assert kept.mapping == mapping and torch.equal(kept.panoptic, pan)  # the 2-voxel piece is under min_voxels


def test_diagnose_drop_small_things(repo_root, monkeypatch) -> None:
    """The sweep's small-thing rows: thing segments under ``min_voxels`` become void and leave the mapping; stuff
    segments stay whatever their size; through :func:`refuse` the semantic volume is void there too."""
    from frustum3d.panoptic import PanopticVolume

    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    diagnose = importlib.import_module("diagnose_3d")
    pan = torch.tensor([[[1, 1, 1, 2, 3, 3]]], dtype=torch.int32)
    mapping = {1: 3, 2: 5, 3: 10}  # chair of 3 voxels, table of 1, wall of 2
    assert diagnose.small_things(pan, mapping, (10, 11, 12), min_voxels=2) == [2]
    assert diagnose.small_things(pan, mapping, (10, 11, 12), min_voxels=4) == [1, 2]
    vol = PanopticVolume(panoptic=pan, semantic=torch.tensor([[[3, 3, 3, 5, 10, 10]]]), mapping=mapping,
                         mapping_tensor=torch.zeros(0, 2), segment_queries={}, scores=torch.zeros(0),
                         labels=torch.zeros(0))
    vol = diagnose.drop_segments(vol, [1, 2])
    assert vol.panoptic.tolist() == [[[0, 0, 0, 0, 3, 3]]] and vol.semantic.tolist() == [[[0, 0, 0, 0, 10, 10]]]
    assert vol.mapping == {3: 10}
    raw = _two_chairs_and_a_wall()  # chair 1 wins voxels 0-2, chair 2 voxel 3, the wall 4-5
    vol = diagnose.refuse(raw, (10, 11, 12), 0.5, min_thing_voxels=2)
    assert vol.semantic[0, 0].tolist() == [3, 3, 3, 0, 10, 10]
    assert sorted(vol.mapping.values()) == [3, 10]


def test_diagnose_drop_weak_things(repo_root, monkeypatch) -> None:
    """The sweep's score rows: a thing segment whose class score times its query's mean mask probability over the
    segment is under the threshold becomes void; a confident one stays."""
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    diagnose = importlib.import_module("diagnose_3d")
    raw = _two_chairs_and_a_wall()
    raw["mask_logits"][3, 2] = 0.5  # chair 2 still wins voxel 3, with probability 0.62
    plain = diagnose.refuse(raw, (10, 11, 12), 0.5)
    assert plain.semantic[0, 0].tolist() == [3, 3, 3, 3, 10, 10] and len(plain.mapping) == 3
    weak = diagnose.weak_things(plain, raw["mask_logits"], raw["coords"], (10, 11, 12), 0.7)
    assert [plain.segment_queries[sid] for sid in weak] == [[2]]
    vol = diagnose.refuse(raw, (10, 11, 12), 0.5, min_thing_score=0.7)
    assert vol.semantic[0, 0].tolist() == [3, 3, 3, 0, 10, 10] and sorted(vol.mapping.values()) == [3, 10]
    assert diagnose.refuse(raw, (10, 11, 12), 0.5, min_thing_score=0.5).semantic[0, 0].tolist() == [3, 3, 3, 3, 10, 10]


def test_diagnose_no_spurious_things_oracle(repo_root, monkeypatch) -> None:
    """The perfect-thing-filter oracle: thing classes lose their false positives, stuff keeps them, and PRQ is the
    plain formula over what is left."""
    from frustum3d.metrics import STATS_COLUMNS

    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    diagnose = importlib.import_module("diagnose_3d")
    stats = torch.zeros(13, len(STATS_COLUMNS), dtype=torch.float64)
    stats[3] = torch.tensor([0.6, 1, 3, 1, 2])   # chair: one match at IoU 0.6, three spurious, one missed
    stats[10] = torch.tensor([0.8, 1, 2, 0, 1])  # wall: one match, two false positives
    out = diagnose.without_thing_fp(stats, (10, 11, 12))
    fp = STATS_COLUMNS.index("fp")
    assert out[3, fp] == 0 and out[10, fp] == 2 and torch.equal(out[:, :fp], stats[:, :fp])
    assert stats[3, fp] == 3  # the input is not changed


def test_diagnose_2d_labels_on_the_predicted_surface(repo_root, monkeypatch) -> None:
    """The fusion sweep's ``labels_2d_surface`` rows: the voxels near the predicted geometry's visible surface
    (``surface_gap`` within the band) take the 2D mask logits, whatever the 2D depth says; with
    ``things_only_2d`` only where the 2D masks' winner is a thing query."""
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    diagnose = importlib.import_module("diagnose_3d")
    # queries: 0 = wall (class 10), 1 = chair (class 3)
    class_logits = torch.full((2, 14), -10.0)
    class_logits[0, 10] = 10.0
    class_logits[1, 3] = 10.0
    coords = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3]])
    mask = torch.tensor([[6.0, 6.0, 6.0, -6.0], [-6.0, -6.0, -6.0, 6.0]]).T  # 3D: wall, wall, wall, chair
    # 2D: the chair's pixel at voxels 0 and 1, the wall's at voxels 2 and 3
    prior = torch.tensor([[-9.0, -9.0, 9.0, 9.0], [9.0, 9.0, -9.0, -9.0]]).T
    raw = {"class_logits": class_logits, "mask_logits": mask, "coords": coords, "tdf": torch.zeros(1, 1, 4),
           "prior_any": prior, "band_m": 0.36,
           # the 2D depth is far off everywhere: the depth-band rows change nothing
           "depth_gap": torch.full((4,), 5.0, dtype=torch.float64),
           # voxels 0, 2 and 3 lie on the predicted surface of their pixel; voxel 1 far behind it
           "surface_gap": torch.tensor([0.0, 1.0, 0.2, 0.0], dtype=torch.float64)}
    stuff = (10, 11, 12)
    assert diagnose.refuse(raw, stuff, 0.5).semantic[0, 0].tolist() == [10, 10, 10, 3]
    assert diagnose.refuse(raw, stuff, 0.5, labels_2d=1.0).semantic[0, 0].tolist() == [10, 10, 10, 3]
    assert diagnose.refuse(raw, stuff, 0.5, labels_2d_surface=1.0).semantic[0, 0].tolist() == [3, 10, 10, 10]
    assert diagnose.refuse(raw, stuff, 0.5, labels_2d_surface=3.0).semantic[0, 0].tolist() == [3, 3, 10, 10]
    # things only: the wall's 2D pixels (voxels 2, 3) keep their 3D masks
    assert diagnose.refuse(raw, stuff, 0.5, labels_2d_surface=1.0, things_only_2d=True
                           ).semantic[0, 0].tolist() == [3, 10, 10, 3]


def test_diagnose_label_oracle_is_exact_on_the_gt_geometry(repo_root, monkeypatch) -> None:
    """The label oracle of tools/diagnose_3d.py: GT segments carried onto a predicted geometry. On the GT geometry
    itself every segment is matched at IoU 1; on a geometry one voxel off they are still labelled (IoU > 0),
    and predicted surface far from every GT segment stays unlabelled."""
    from frustum3d.metrics import frame_statistics, prediction_segments, segment_masks

    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    diagnose = importlib.import_module("diagnose_3d")

    shape = (12, 12, 12)
    pan0 = torch.zeros(shape, dtype=torch.int32)
    tdf = torch.full(shape, 3.0)
    pan0[2:5, 2:5, 6] = 7  # a thing (class 3)
    pan0[:, :, 10] = 9  # a wall (class 10)
    tdf[pan0 > 0] = 0.0
    mapping0 = {7: 3, 9: 10}
    kw = dict(num_classes=13, iso_value=1.0, truncation=3.0)
    gt_masks = segment_masks(prediction_segments(pan0, mapping0), tdf, None, iso_value=1.0, truncation=3.0)
    gt_labels = torch.tensor([3, 10])
    pan, mapping = diagnose.gt_panoptic(gt_masks, gt_labels)
    assert mapping == {1: 3, 2: 10} and set(np.unique(pan).tolist()) == {0, 1, 2}

    filled = torch.from_numpy(diagnose._nearest_fill(pan))
    st, _ = frame_statistics(gt_masks, gt_labels, filled, mapping, tdf, None, **kw)
    assert st[3].tolist() == [1.0, 1.0, 0.0, 0.0, 1.0] and st[10].tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]

    shifted = torch.full(shape, 3.0)
    shifted[2:5, 2:5, 7] = 0.0  # the thing one voxel behind
    shifted[:, :, 10] = 0.0
    shifted[9:, 0:2, 2] = 0.0  # spurious surface far from every GT segment
    st, details = frame_statistics(gt_masks, gt_labels, filled, mapping, shifted, None, **kw)
    assert 0.0 < st[3, 0] < 1.0 and st[3, 1] == 1.0 and st[10].tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert st[:, 2].sum() == 0  # the spurious surface is no false segment


def test_diagnose_things_first_fusion_gives_claimed_voxels_to_the_thing(repo_root, monkeypatch) -> None:
    """The fusion sweep's ``things first`` rule: voxels a kept thing query claims (sigmoid >= 0.5) go to it even
    where a stuff query bids more; unclaimed voxels and the plain rule are unchanged; ``prior`` adds the prior."""
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    diagnose = importlib.import_module("diagnose_3d")
    # queries: 0 = wall (class 10), 1 = chair (class 3); 4 classes of logits + no-object (column 13)
    class_logits = torch.full((2, 14), -10.0)
    class_logits[0, 10] = 10.0
    class_logits[1, 3] = 10.0
    coords = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 0, 2]])
    mask = torch.tensor([[6.0, 6.0, 6.0],    # wall: confident everywhere
                         [1.0, -3.0, 3.0]]).T  # chair: claims voxels 0 and 2 (sigmoid >= 0.5), not voxel 1
    raw = {"class_logits": class_logits, "mask_logits": mask, "coords": coords, "tdf": torch.zeros(2, 2, 3),
           # the chair's 2D logits 9, 9 at voxels 0 and 1, all three within the band: the prior the network adds
           "prior_any": torch.tensor([[0.0, 0.0, 0.0], [9.0, 9.0, 0.0]]).T, "depth_gap": torch.zeros(3, dtype=torch.float64),
           "band_m": 0.36}
    plain = diagnose.refuse(raw, (10, 11, 12), 0.5)
    assert plain.semantic[0, 0].tolist() == [10, 10, 10]  # the wall out-bids the chair everywhere
    first = diagnose.refuse(raw, (10, 11, 12), 0.5, things_first=True)
    assert first.semantic[0, 0].tolist() == [3, 10, 3]
    with_prior = diagnose.refuse(raw, (10, 11, 12), 0.5, prior=True)  # chair logits 10, 6, 3 against 6, 6, 6
    assert with_prior.semantic[0, 0].tolist() == [3, 10, 10]
    two_d = {"2D labels in band", "2D labels in 2 bands", "2D in band, things first", "2D in band + nearest 2",
             "2D in band + nearest 4", "2D on 3D surface", "2D on 3D surface, 2 bands", "2D on 3D surface + nearest 2",
             "2D things on 3D surface"}
    queries = {"3D overlap 0.5 (things)", "3D overlap 0.8 (things)", "things of the 2D result",
               "2D things + 3D overlap 0.5", "2D things through 0.5 m", "2D things through 1 m", "2D things through 2 m",
               "things grow 1 voxel into stuff", "things grow 2 voxels into stuff",
               "things split, pieces >= 8", "things split, pieces >= 32", "things under 32 voxels dropped",
               "things under 128 voxels dropped", "2D things + under 128 dropped", "things scored under 0.2 dropped",
               "things scored under 0.4 dropped",
               "oracle: GT class gate", "oracle: GT thing/stuff gate"}
    assert set(diagnose.fusion_variants(0.5, prior_trained=True)) == {
        "omt 0.5, mask 0.5", "omt 0.3, mask 0.5", "omt 0.7, mask 0.5", "omt 0.5, mask 0.3", "omt 0.5, mask 0.7",
        "things first"} | two_d | queries


def _two_chairs_and_a_wall():
    """Raw fusion inputs of 6 voxels in a row: query 0 a wall (class 10), queries 1 and 2 chairs (class 3)."""
    class_logits = torch.full((3, 14), -10.0)
    class_logits[0, 10] = 10.0
    class_logits[1, 3] = 10.0
    class_logits[2, 3] = 9.0  # a slightly less confident duplicate
    mask = torch.tensor([[-6.0, -6.0, -6.0, -6.0, 6.0, 6.0],   # wall: voxels 4, 5
                         [6.0, 6.0, 6.0, -6.0, -6.0, -6.0],    # chair 1: voxels 0-2
                         [-6.0, 5.0, 5.0, 6.0, -6.0, -6.0]]).T  # chair 2 claims 1-3, wins only voxel 3
    return {"class_logits": class_logits, "mask_logits": mask, "coords": torch.tensor([[0, 0, z] for z in range(6)]),
            "tdf": torch.zeros(1, 1, 6)}


def test_diagnose_3d_overlap_rule_drops_a_thing_that_keeps_little_of_its_mask(repo_root, monkeypatch) -> None:
    """``overlap_3d``: chair 2 wins one of the three voxels its mask claims (1/3): at 0.5 it is dropped and its voxel
    goes to the next bidder; at 0.3 it stays; stuff is never dropped."""
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    diagnose = importlib.import_module("diagnose_3d")
    raw = _two_chairs_and_a_wall()
    plain = diagnose.refuse(raw, (10, 11, 12), 0.5)
    assert len(plain.mapping) == 3 and plain.semantic[0, 0].tolist() == [3, 3, 3, 3, 10, 10]
    kept = diagnose.refuse(raw, (10, 11, 12), 0.5, overlap_3d=0.3)
    assert torch.equal(kept.panoptic, plain.panoptic)
    dropped = diagnose.refuse(raw, (10, 11, 12), 0.5, overlap_3d=0.5)
    assert sorted(dropped.mapping.values()) == [3, 10]
    chair = dropped.panoptic[0, 0, 0].item()
    # voxel 3: no kept query's mask reaches 0.5 any more, so it is filled from its arg-max (the wall or chair 1)
    assert dropped.panoptic[0, 0, :3].tolist() == [chair] * 3 and dropped.semantic[0, 0, 4:].tolist() == [10, 10]


def test_diagnose_gt_class_gate_oracle(repo_root, monkeypatch) -> None:
    """The 3D-semantics oracles: with ``gt_gate="class"`` a voxel goes only to a kept query of its GT class (when
    one exists and the voxel has a GT class); ``"thing_stuff"`` only separates things from stuff; the GT class of a
    voxel is that of the nearest GT segment voxel within 1.5 voxels."""
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    diagnose = importlib.import_module("diagnose_3d")
    raw = _two_chairs_and_a_wall()
    raw["class_logits"][2, 3], raw["class_logits"][2, 5] = -10.0, 9.0  # query 2: a lamp (class 5) now
    # GT: voxels 0-1 a chair, 2 a lamp, 3 a bed (no query of that class), 4 a wall, 5 unlabelled
    raw["gt_class"] = torch.tensor([3, 3, 5, 7, 10, 0])
    raw["mask_logits"][5, 0] = -7.0  # voxel 5: the chair out-bids the wall (no GT class there: not gated)
    raw["mask_logits"][5, 1] = 7.0
    plain = diagnose.refuse(raw, (10, 11, 12), 0.5)
    assert plain.semantic[0, 0].tolist() == [3, 3, 3, 5, 10, 3]
    gated = diagnose.refuse(raw, (10, 11, 12), 0.5, gt_gate="class")
    # voxel 2 goes to the lamp, voxel 3 (a bed: no query qualifies) and voxel 5 (no GT class) stay as they were
    assert gated.semantic[0, 0].tolist() == [3, 3, 5, 5, 10, 3]
    raw["gt_class"] = torch.tensor([10, 3, 3, 3, 3, 0])  # voxel 0 GT stuff, voxels 1-4 GT things
    raw["mask_logits"][0, 0] = 2.0  # the wall claims voxel 0 too, out-bid by the chair
    assert diagnose.refuse(raw, (10, 11, 12), 0.5).semantic[0, 0, 0] == 3
    ts = diagnose.refuse(raw, (10, 11, 12), 0.5, gt_gate="thing_stuff")
    assert ts.semantic[0, 0].tolist() == [10, 3, 3, 5, 3, 3]  # voxel 4: the best thing bidder (the lamp at -6 ties
    # the chair at -6: the first of them); voxel 0 to the wall
    eval_masks = torch.zeros(2, 1, 1, 6, dtype=torch.bool)
    eval_masks[0, 0, 0, 0] = True  # segment 1 (class 3) at voxel 0
    eval_masks[1, 0, 0, 4] = True  # segment 2 (class 10) at voxel 4
    got = diagnose.gt_class_at(raw["coords"], eval_masks, torch.tensor([3, 10]))
    assert got.tolist() == [3, 3, 0, 10, 10, 10]  # within 1.5 voxels of a segment voxel, else 0


def test_diagnose_things_of_the_2d_result(repo_root, monkeypatch) -> None:
    """``thing_queries_of_2d`` marks the queries that own a thing segment of the 2D panoptic map (against a brute
    force over the pixels); ``things_of_2d`` fuses without the other thing queries."""
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    diagnose = importlib.import_module("diagnose_3d")
    raw = _two_chairs_and_a_wall()
    logits_2d = torch.full((3, 2, 3), -6.0)
    logits_2d[0, 1] = 6.0  # the wall: the bottom row
    logits_2d[1, 0] = 6.0  # chair 1: the top row; chair 2 nowhere
    pan2d = torch.tensor([[1, 1, 1], [2, 2, 2]], dtype=torch.int32)
    segments = [{"id": 1, "isthing": True, "category_id": 3}, {"id": 2, "isthing": False, "category_id": 10}]
    got = diagnose.thing_queries_of_2d(raw["class_logits"], logits_2d, pan2d, segments, 0.5)
    scores = torch.softmax(raw["class_logits"], -1).max(-1).values
    brute = torch.zeros(3, dtype=torch.bool)
    for y in range(2):
        for x in range(3):
            if int(pan2d[y, x]) == 1:
                brute[int((scores * torch.sigmoid(logits_2d[:, y, x])).argmax())] = True
    assert got.tolist() == brute.tolist() == [False, True, False]
    raw["thing_queries_2d"] = got
    only = diagnose.refuse(raw, (10, 11, 12), 0.5, things_of_2d=True)
    assert sorted(only.mapping.values()) == [3, 10] and only.semantic[0, 0, :3].tolist() == [3, 3, 3]


def test_diagnose_things_through_and_the_gt_2d_oracle(repo_root, monkeypatch) -> None:
    """``things_through_2d``: from one band in front of the predicted first surface to that far behind it, the
    voxels of a thing pixel take the 2D logits; ``gt_2d_things_through`` relabels the same range by the GT 2D
    thing at the voxel's pixel, one new segment per GT thing."""
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    diagnose = importlib.import_module("diagnose_3d")
    class_logits = torch.full((2, 14), -10.0)
    class_logits[0, 10] = 10.0  # wall
    class_logits[1, 3] = 10.0  # chair
    gap = torch.tensor([-1.0, -0.2, 0.0, 0.4, 0.9, 1.5], dtype=torch.float64)  # metres behind the first surface
    raw = {"class_logits": class_logits, "mask_logits": torch.tensor([[6.0] * 6, [-6.0] * 6]).T,
           "coords": torch.tensor([[0, 0, z] for z in range(6)]), "tdf": torch.zeros(1, 1, 6),
           "prior_any": torch.tensor([[-9.0] * 6, [9.0] * 6]).T, "surface_gap": gap, "band_m": 0.36}
    through = diagnose.refuse(raw, (10, 11, 12), 0.5, things_through_2d=1.0)
    assert through.semantic[0, 0].tolist() == [10, 3, 3, 3, 3, 10]
    # the oracle: all six voxels project to pixel (0, 0), which the GT 2D chair (labels[0] = 3) covers
    raw["pixels"] = (torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.bool))
    raw["plane_hw"] = (2, 2)
    sample = {"masks": torch.tensor([[[1, 0], [0, 0]], [[0, 1], [1, 1]]], dtype=torch.uint8),
              "is_thing": torch.tensor([True, False]), "labels": torch.tensor([3, 10])}
    pan = torch.full((1, 1, 6), 5, dtype=torch.int32)
    out, mapping = diagnose.gt_2d_things_through(raw, sample, pan, {5: 10}, 1.0)
    assert out[0, 0].tolist() == [5, 6, 6, 6, 6, 5] and mapping == {5: 10, 6: 3}
    # grow_things: stuff voxels within that distance of a thing voxel take its segment (voxel 0 is 1 voxel away)
    grown = diagnose.refuse(raw, (10, 11, 12), 0.5, things_through_2d=1.0, grow_things=1.0)
    assert grown.semantic[0, 0].tolist() == [10, 3, 3, 3, 3, 10]  # semantic is the fusion's; panoptic grows
    chair = through.panoptic[0, 0, 1].item()
    assert grown.panoptic[0, 0].tolist() == [chair] * 6
    surface_only, _ = diagnose.gt_2d_things_through(raw, sample, pan, {5: 10}, 0.0)
    assert surface_only[0, 0].tolist() == [5, 6, 6, 5, 5, 5]  # within one band (0.36 m) of the surface


def test_diagnose_2d_labels_replace_the_3d_masks_in_the_band_and_spread_to_hidden_voxels(repo_root, monkeypatch):
    """``labels_2d``: voxels whose depth gap is within that many bands take the 2D logits instead of the 3D ones;
    ``nearest_2d``: labelled voxels outside the band then take the segment of the nearest in-band voxel within
    that distance (farther ones keep their own)."""
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    diagnose = importlib.import_module("diagnose_3d")
    class_logits = torch.full((2, 14), -10.0)
    class_logits[0, 10] = 10.0  # query 0: wall
    class_logits[1, 3] = 10.0  # query 1: chair
    coords = torch.tensor([[0, 0, z] for z in range(6)])
    mask = torch.tensor([[6.0] * 6, [-6.0] * 6]).T  # 3D: the wall owns every voxel
    prior_any = torch.tensor([[-9.0] * 6, [9.0] * 6]).T  # 2D: the chair's pixels everywhere
    gap = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.5, float("inf")])  # metres behind the visible surface
    raw = {"class_logits": class_logits, "mask_logits": mask, "coords": coords, "tdf": torch.zeros(1, 1, 6),
           "prior_any": prior_any, "depth_gap": gap, "band_m": 0.36}
    assert diagnose.refuse(raw, (10, 11, 12), 0.5).semantic[0, 0].tolist() == [10] * 6
    one = diagnose.refuse(raw, (10, 11, 12), 0.5, labels_2d=1.0)
    assert one.semantic[0, 0].tolist() == [3, 3, 10, 10, 10, 10]  # band 0.36 m: gaps 0 and 0.2
    assert diagnose.refuse(raw, (10, 11, 12), 0.5, labels_2d=2.0).semantic[0, 0].tolist() == [3, 3, 3, 10, 10, 10]
    spread = diagnose.refuse(raw, (10, 11, 12), 0.5, labels_2d=1.0, nearest_2d=2.0)
    chair = one.panoptic[0, 0, 0].item()
    assert spread.panoptic[0, 0].tolist() == [chair, chair, chair, chair] + one.panoptic[0, 0, 4:].tolist()


def test_deadline_shrinks_the_stage_budgets(repo_root: Path, tmp_path: Path, monkeypatch) -> None:
    """``--deadline``: a stage keeps its own budget while the whole run fits, is cut to what is left after its
    evaluation reserve and the later stages otherwise, and a run whose data already used the time stops with a
    one-line message before training."""
    tool = _load_tool(repo_root, monkeypatch)
    assert tool.stage_budget(240.0, 0.0, 500.0, 45.0, 100.0) == 240.0  # no deadline
    assert tool.stage_budget(240.0, 590.0, 25.0, 45.0, 55.0) == 240.0  # fits
    assert tool.stage_budget(240.0, 590.0, 300.0, 45.0, 55.0) == pytest.approx(190.0)
    assert tool.stage_budget(100.0, 590.0, 310.0, 45.0) == 100.0
    assert tool.stage_budget(100.0, 590.0, 560.0, 45.0) < 0  # nothing left
    # a stage keeps one reserve per evaluation: held-out, training frames, each of the 3D stage's --eval-3d
    assert tool.stage_reserve(45.0, False, 0) == 45.0 and tool.stage_reserve(45.0, True, 2) == 180.0
    assert tool.stage_reserve(45.0, True) == 90.0  # the 2D stage: held-out and training frames
    with pytest.raises(SystemExit, match="--deadline 0.5: no time is left for the 2D stage"):
        tool.main(["--out", str(tmp_path / "b"), "--cpu", "--scenes", "2", "--held-out", "1", "--frames-per-scene",
                   "1", "--image", "64x48", "--grid", "32", "--gen-processes", "1", "--deadline", "0.5"])


def test_diagnose_reads_a_demo_folders_3d_spec(repo_root, tmp_path: Path, monkeypatch) -> None:
    """``diagnose_3d --demo OUT`` takes the spec that ``nvp3d demo`` wrote (``spec_3d.yaml``); a folder without one
    (an older demo) or a bench folder without its JSON is refused in one line that names the file."""
    from nvp3d.config import dump_spec, spec_to_dict, validate_spec
    from nvp3d.demo.run3d import SPEC_3D_NAME

    _load_tool(repo_root, monkeypatch)
    diagnose = importlib.import_module("diagnose_3d")
    spec = validate_spec({"model": {"preset": "tiny", "frustum3d": {"iso_recon_value": 0.75}},
                          "dataset": {"enable_3d": True}, "results_dir": str(tmp_path / "r")})
    dump_spec(spec, tmp_path / SPEC_3D_NAME)
    assert spec_to_dict(diagnose.run_spec_3d(tmp_path, demo=True)) == spec_to_dict(spec)
    for demo, name in ((True, SPEC_3D_NAME), (False, "bench_learning.json")):
        with pytest.raises(SystemExit, match=name) as exc:
            diagnose.run_spec_3d(tmp_path / "empty", demo=demo)
        assert "\n" not in str(exc.value)
    with pytest.raises(SystemExit):  # --bench and --demo exclude each other
        diagnose.main(["--bench", str(tmp_path), "--demo", str(tmp_path)])
