"""End to end on synthetic data (slow): train the tiny 2D stage, then the 3D stage on top of it, and show
that the held-out PRQ (a test scene never seen in training) rises clearly above the same network with an
untrained 3D stage; the 3D run writes toolkit-named checkpoints, the 3D latest pointer and PRQ KPIs in
status.json; evaluate writes metrics_3d.json; inference on the held-out frames writes parseable outputs that
agree with evaluate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from nvp3d.data.datamodule import NVP3DDataModule
from nvp3d.demo.run import generate_demo_data
from nvp3d.demo.specs import DEMO_CLASS_TINT, demo_spec, spec_3d_from_2d
from nvp3d.evaluation.evaluate import METRICS_FILENAME_3D, evaluate, evaluate_module
from nvp3d.status import StatusLogger, read_status
from nvp3d.training.fit import build_module, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # one thread: the same numbers on a busy machine

IMAGE = (64, 48)
EPOCHS_2D = 30
EPOCHS_3D = 6
#: measured on the shared 2-core machine, one held-out scene of 2 frames (until round 2, stop 42): untrained 3D stage
#: PRQ 0.0, trained PRQ 4.94 / RSQ 8.48 / RRQ 19.4; float rounding alone (the CPU sparse convolution's gather form,
#: frustum3d 0.3.12, or AdamW's fused CPU kernel) moved that to 2.32-2.38 on the same scene. Measured now on
#: 1 + EXTRA_TEST_SCENES held-out scenes with the demo's class-tinted colours: trained PRQ 3.06 (RSQ 8.04, RRQ 10.2)
#: with frustum3d 0.3.11, 3.12 (8.07, 9.7) with 0.3.12 and the fused optimizer; the floors leave margin
PRQ_FLOOR = 2.5
PRQ_MARGIN = 2.0
EXTRA_TEST_SCENES = 4


def _quiet(*args) -> None:
    pass


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    data = tmp_path_factory.getbasetemp() / "nvp3d_synth_s3d_e2e"
    generate_demo_data(data, scenes=5, frames_per_scene=2, grid=32, image_size=IMAGE, seed=3,
                       extra_test_scenes=EXTRA_TEST_SCENES, class_tint=DEMO_CLASS_TINT)  # test = 1 + EXTRA_TEST_SCENES scenes
    out = tmp_path_factory.mktemp("s3d_e2e")
    spec = demo_spec(data, out, image_size=IMAGE, voxel_size=0.24, epochs=EPOCHS_2D, batch_size=2, lr=2e-3,
                     num_gpus=0, min_instance_pixels=8, checkpoint_interval=EPOCHS_2D)
    spec.train.validation_interval = EPOCHS_2D
    spec.model.mask_former.train_num_points = 256
    spec.model.backbone.freeze = True  # the recipe these floors were measured with (frozen aggregator, iso 1.0)
    train(spec, out / "train2d", None, say=_quiet, enable_progress_bar=False, cache_data=True)

    s3 = spec_3d_from_2d(spec, out / "train2d" / "panoptic_recon_3d_model_latest.pth", grid=32, epochs=EPOCHS_3D,
                         iso_recon_value=1.0)
    s3.evaluate.num_gpus = s3.inference.num_gpus = 0

    dm = NVP3DDataModule(s3, splits=("test",))
    dm.setup()
    untrained = evaluate_module(s3, build_module(s3, dm, say=_quiet), dm)["kpi"]
    status = StatusLogger(out / "train3d" / "status.json")
    train_kpi = train(s3, out / "train3d", status, say=_quiet, enable_progress_bar=False, cache_data=True)
    s3.evaluate.checkpoint = str(out / "train3d" / "nvpanoptix3d_model_latest.pth")
    kept = {}

    def hook(module) -> None:
        module.keep_predictions = True
        kept["module"] = module

    trained = evaluate(s3, out / "eval3d", StatusLogger(out / "eval3d" / "status.json"), say=_quiet,
                          module_hook=hook)
    return {"spec": s3, "spec_2d": spec, "data": data, "out": out, "untrained": untrained, "trained": trained,
            "train_kpi": train_kpi, "predictions": kept["module"].predictions, "dm": dm}


def test_prq_rises_above_untrained(pipeline) -> None:
    before, after = pipeline["untrained"], pipeline["trained"]
    print("PRQ untrained", before, "trained", after)
    assert after["PRQ"] >= PRQ_FLOOR, after
    assert after["PRQ"] >= before["PRQ"] + PRQ_MARGIN, (before, after)
    assert after["RRQ"] > 0 and after["RSQ"] > 0


def test_frozen_2d_network_is_unchanged_by_3d_training(pipeline) -> None:
    """Every 2D tensor of the 3D checkpoint, batch-norm running statistics included, equals the 2D checkpoint's:
    the frozen 2D network ran in eval mode through the whole 3D fit (Lightning never calls ``train()`` itself)."""
    import torch
    from nvp3d.model.checkpoint import THREE_D_MODULES

    out = pipeline["out"]
    sd2 = torch.load(out / "train2d" / "panoptic_recon_3d_model_latest.pth", map_location="cpu", weights_only=True)
    sd3 = torch.load(out / "train3d" / "nvpanoptix3d_model_latest.pth", map_location="cpu", weights_only=True)
    sd2, sd3 = sd2["state_dict"], sd3["state_dict"]
    keys_2d = [k for k in sd3 if k.removeprefix("model.").split(".", 1)[0] not in THREE_D_MODULES]
    running = [k for k in keys_2d if "running_mean" in k]
    assert running, "the 2D network has batch-norm layers (the case this test guards)"
    changed = [k for k in keys_2d if k in sd2 and not torch.equal(sd2[k], sd3[k])]
    assert len(keys_2d) > 100 and all(k in sd2 for k in keys_2d)
    assert changed == [], changed[:5]


def test_checkpoints_status_and_metrics(pipeline) -> None:
    out = pipeline["out"]
    names = sorted(p.name for p in (out / "train3d").glob("model_epoch_*.pth"))
    assert len(names) == 2 and names[-1].startswith(f"model_epoch_{EPOCHS_3D - 1:03d}_step_")
    latest = out / "train3d" / "nvpanoptix3d_model_latest.pth"
    assert latest.is_symlink() and latest.resolve().name == names[-1]
    records = read_status(out / "train3d" / "status.json")
    epochs = [r for r in records if "epoch" in r]
    assert [r["epoch"] for r in epochs] == list(range(EPOCHS_3D))
    assert {"PRQ", "RSQ", "RRQ"} <= set(records[-1]["kpi"])
    metrics = json.loads((out / "eval3d" / METRICS_FILENAME_3D).read_text())
    assert metrics["kpi"]["PRQ"] == pytest.approx(pipeline["trained"]["PRQ"])
    counted = [r for r in metrics["per_class"] if r["counted"]]
    assert counted and metrics["kpi"]["PRQ"] == pytest.approx(sum(r["PRQ"] for r in counted) / len(counted))
    assert metrics["settings"]["downsample_factor"] == 1 and metrics["settings"]["eval_grid"] == 32
    # where the GT things went: the matched ones are the thing classes' true positives, all of them TP + FN, and
    # the predicted thing segments TP + FP
    things = metrics["things"]
    rows = [r for r in metrics["per_class"] if r["isthing"]]
    assert things["matched"] == sum(r["TP"] for r in rows)
    assert things["gt_things"] == sum(r["TP"] + r["FN"] for r in rows)
    assert things["pred_things"] == sum(r["TP"] + r["FP"] for r in rows)
    ev = read_status(out / "eval3d" / "status.json")[-1]
    assert ev["message"] == "Evaluation metrics generated." and ev["kpi"]["PRQ"] == pytest.approx(metrics["kpi"]["PRQ"])
    assert all(math.isfinite(v) for v in pipeline["train_kpi"].values())


def test_inference_agrees_with_evaluate(pipeline, tmp_path: Path) -> None:
    import shutil

    from nvp3d.inference.predictor import Predictor
    from nvp3d.inference.run import run_inference

    spec = pipeline["spec"].model_copy(deep=True)
    spec.inference.checkpoint = spec.evaluate.checkpoint
    images = tmp_path / "images"
    images.mkdir()
    ds = pipeline["dm"].datasets["test"].base
    frusta = {}
    for i in range(len(ds)):
        s = ds[i]
        key = s["meta"]["key"]
        shutil.copy(pipeline["data"] / "data" / s["meta"]["scene_id"] / f"rgb_{s['meta']['image_id']}.png",
                    images / f"{key}.png")
        frusta[key] = s["frustum_mask"]
    spec.inference.images_dir = str(images)
    predictor = Predictor(spec, spec.inference.checkpoint, say=_quiet)
    kpi = run_inference(spec, tmp_path / "inf", None, say=_quiet, enable_progress_bar=False, predictor=predictor,
                        frustum_masks=frusta)
    assert kpi["images"] == len(ds)
    ref = {p["key"]: p["fused"] for p in pipeline["predictions"]}
    index = json.loads((tmp_path / "inf" / "index.json").read_text())
    for entry in index["images"]:
        with np.load(tmp_path / "inf" / entry["outputs"]["volumes"]) as z:
            f = ref[entry["name"]]
            assert (z["panoptic"] == f.panoptic.numpy()).mean() > 0.98
            assert (z["semantic"] == f.semantic.numpy()).mean() > 0.98
            assert np.isclose(z["geometry"], f.tdf.numpy(), atol=1e-3).mean() > 0.98
        assert (tmp_path / "inf" / entry["outputs"]["mesh"]).stat().st_size > 0


def test_demo_3d_writes_everything(pipeline, tmp_path: Path) -> None:
    from nvp3d.config import load_spec
    from nvp3d.demo.run3d import SPEC_3D_NAME, demo_3d
    from nvp3d.evaluation.evaluate import evaluate

    spec_2d = pipeline["spec"].model_copy(deep=True)
    spec_2d.dataset.enable_3d = False
    ckpt = pipeline["out"] / "train2d" / "panoptic_recon_3d_model_latest.pth"
    lines = []
    summary = demo_3d(spec_2d, tmp_path, ckpt, grid=32, epochs=1, say=lines.append)
    assert (tmp_path / "train3d" / "nvpanoptix3d_model_latest.pth").is_symlink()
    assert json.loads((tmp_path / "evaluate3d" / METRICS_FILENAME_3D).read_text())["frames"] == 2 * (1 + EXTRA_TEST_SCENES)
    index = json.loads((tmp_path / "inference" / "index.json").read_text())
    assert index["num_images"] == 2 and summary["inference"]["images"] == 2
    assert all((tmp_path / "inference" / e["outputs"]["mesh"]).is_file() for e in index["images"])
    assert json.loads((tmp_path / "demo_3d.json").read_text())["prq_after"]["PRQ"] == summary["prq_after"]["PRQ"]
    assert any("3D held-out PRQ" in line for line in lines)
    # the spec it trained, re-evaluated as written: the same held-out PRQ
    spec_3d = load_spec(tmp_path / SPEC_3D_NAME)
    assert spec_3d.dataset.enable_3d and Path(spec_3d.evaluate.checkpoint).is_file()
    again = evaluate(spec_3d, tmp_path / "again", None, say=lambda *_: None)
    assert again["PRQ"] == pytest.approx(summary["prq_after"]["PRQ"])


def test_two_process_evaluation_matches_one(pipeline, tmp_path: Path, run_cli) -> None:
    """``nvp3d evaluate`` of the trained checkpoints over an odd number of frames (ranks get 2 and 1): the 2D
    stage under ``torchrun --nproc_per_node 2``, the 3D stage with ``evaluate.num_gpus=2`` (Lightning spawns
    the second rank); the statistics gathered over both ranks equal one process's, written once."""
    from nvp3d.config import dump_spec

    frames = json.loads((pipeline["data"] / "meta" / "test.json").read_text())[:2]  # the first held-out scene
    frames += json.loads((pipeline["data"] / "meta" / "val.json").read_text())[:1]
    assert len(frames) == 3
    (tmp_path / "test3.json").write_text(json.dumps(frames))
    out = pipeline["out"]
    for stage, spec, ckpt, name in (
        ("2d", pipeline["spec_2d"], out / "train2d" / "panoptic_recon_3d_model_latest.pth", "metrics_2d.json"),
        ("3d", pipeline["spec"], out / "train3d" / "nvpanoptix3d_model_latest.pth", METRICS_FILENAME_3D),
    ):
        spec = spec.model_copy(deep=True)
        spec.dataset.test.json_path = str(tmp_path / "test3.json")
        spec.evaluate.checkpoint = str(ckpt)
        dump_spec(spec, tmp_path / f"{stage}.yaml")
        base = ("evaluate", "-e", str(tmp_path / f"{stage}.yaml"))
        one = run_cli(*base, "evaluate.num_gpus=1", f"evaluate.results_dir={tmp_path / (stage + '_1')}")
        assert one.returncode == 0, one.stderr[-3000:]
        if stage == "2d":
            two = run_cli(*base, "evaluate.num_gpus=1", f"evaluate.results_dir={tmp_path / (stage + '_2')}",
                          launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
        else:
            two = run_cli(*base, "evaluate.num_gpus=2", f"evaluate.results_dir={tmp_path / (stage + '_2')}")
        assert two.returncode == 0, two.stderr[-3000:]
        assert two.stdout.count("finished successfully") == 1
        assert [r["status"] for r in read_status(tmp_path / f"{stage}_2" / "status.json")].count("STARTED") == 1
        m1, m2 = (json.loads((tmp_path / f"{stage}_{n}" / name).read_text()) for n in (1, 2))
        assert m1["frames"] == m2["frames"] == 3
        if stage == "2d":
            rows = m1["per_class"]["-1.0"]
            assert sum(r["TP"] + r["FP"] + r["FN"] for r in rows) > 0, "nothing to compare: the 2D model predicts nothing"
            # counts exactly; PQ/SQ/RQ to 1e-9 like the 3D statistics below (IoU sums are added in rank order)
            assert m1["per_class"].keys() == m2["per_class"].keys()
            for t, rows1 in m1["per_class"].items():
                for r1, r2 in zip(rows1, m2["per_class"][t], strict=True):
                    assert {k: r1[k] for k in ("class_id", "TP", "FP", "FN")} == \
                        {k: r2[k] for k in ("class_id", "TP", "FP", "FN")}, (t, r1, r2)
                    for k in ("PQ", "SQ", "RQ"):
                        assert (r1[k] is None) == (r2[k] is None) and (
                            r1[k] is None or r2[k] == pytest.approx(r1[k], abs=1e-9)), (t, k, r1, r2)
        else:
            assert sum(sum(r[1:4]) for r in m1["stats"]["rows"]) > 0 and m1["kpi"]["PRQ"] > 0
            assert np.allclose(m1["stats"]["rows"], m2["stats"]["rows"], rtol=0, atol=1e-9)
        for key, value in m1["kpi"].items():
            if key == "test_loss" or value is None:  # the loss is a mean of per-rank means
                continue
            if key.startswith("test_depth_"):
                # pooled per-pixel errors of fp32 depth maps: the ranks' batches differ from the single process's,
                # so the convolutions' fp32 rounding differs (about 1e-7 per pixel); the pooling itself is exact
                assert m2["kpi"][key] == pytest.approx(value, rel=1e-6), (stage, key)
            else:
                assert m2["kpi"][key] == pytest.approx(value, abs=1e-9), (stage, key)
