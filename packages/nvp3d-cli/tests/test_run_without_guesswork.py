"""Issue "From template to trained model without guesswork", bullet 4: training without ``dataset.val``,
``model.mode``, and the camera of the images given to ``nvp3d inference``."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from nvp3d.runner import run_action
from nvp3d.status import read_status

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["model.preset=tiny", "model.mask_former.train_num_points=256", "train.num_gpus=0", "train.num_epochs=1",
         "dataset.target_size=[64,48]", "dataset.reduced_target_size=[32,24]", "dataset.depth_size=[24,32]",
         "dataset.min_instance_pixels=8", "dataset.name=synthetic"]


@pytest.fixture(scope="module")
def data64(tmp_path_factory) -> Path:
    from datasets3d.synth import generate

    root = tmp_path_factory.mktemp("synth64b") / "data"
    generate(root, scenes=2, frames_per_scene=1, grid=64, image_size=(64, 48), seed=6, check=False)
    return root


def _run(action: str, spec: Path, overrides: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_action(action, spec, overrides, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_training_without_a_validation_split(repo_root, data64, tmp_path, capsys):
    template = repo_root / "references" / "spec_template_train.yaml"
    code, _, err = _run("train", template, [*SMALL, f"results_dir={tmp_path}", f"dataset.train.base_dir={data64}",
                                            "dataset.train.json_path=meta/train.json"])
    assert code == 0, err
    assert (tmp_path / "train" / "panoptic_recon_3d_model_latest.pth").is_file()
    said = capsys.readouterr().out
    assert said.count("training without validation") == 1
    records = read_status(tmp_path / "train" / "status.json")
    assert sum("training without validation" in r["message"] for r in records) == 1
    assert records[-1]["status"] == "SUCCESS"
    assert not any("PQ" in r.get("kpi", {}) for r in records)  # no validation ran


def _record_spec(spec, results_dir, status):
    _record_spec.seen.append(spec)  # type: ignore[attr-defined]


@pytest.fixture
def seen_specs(restore_actions) -> list:
    """Replace every action by one that records the spec it is given (after the runner resolved it)."""
    _record_spec.seen = []  # type: ignore[attr-defined]
    for action in list(restore_actions):
        restore_actions[action] = f"{__name__}:_record_spec"
    return _record_spec.seen  # type: ignore[attr-defined]


def test_model_mode_is_the_default_of_inference_mode(repo_root, tmp_path, seen_specs):
    template = repo_root / "references" / "spec_template_inference.yaml"
    code, _, err = _run("inference", template, [f"results_dir={tmp_path}", "model.mode=instance"])
    assert code == 0, err
    assert seen_specs[-1].inference.mode == "instance"
    code, _, err = _run("inference", template, [f"results_dir={tmp_path}", "model.mode=instance",
                                                "inference.mode=semantic"])
    assert code == 0, err
    assert seen_specs[-1].inference.mode == "semantic"  # the inference key, when set, wins


@pytest.mark.parametrize("action", ["train", "evaluate"])
def test_non_panoptic_model_mode_is_refused_where_it_cannot_act(repo_root, tmp_path, seen_specs, action):
    template = repo_root / "references" / f"spec_template_{action}.yaml"
    code, _, err = _run(action, template, [f"results_dir={tmp_path}", "model.mode=semantic"])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"model.mode=semantic: {action} implements the panoptic post-processing only" in lines[0]
    assert seen_specs == []


def test_folder_camera_sources(tmp_path):
    from nvp3d.inference.inputs import folder_camera, image_intrinsic
    from PIL import Image

    images = tmp_path / "data"
    images.mkdir()
    Image.new("RGB", (64, 48)).save(images / "a.png")
    assert folder_camera(images) is None
    assert image_intrinsic(images / "a.png", None) == (None, "default")
    (tmp_path / "meta").mkdir()  # images_dir is a dataset's data folder: its meta/camera.json applies
    (tmp_path / "meta" / "camera.json").write_text('{"intrinsic": [50, 50, 31.5, 23.5], "image_size": [64, 48]}')
    k, size, source = folder_camera(images)
    assert source == str(tmp_path / "meta" / "camera.json") and size == (64, 48) and k[0, 0] == 50
    (images / "camera.json").write_text('{"intrinsic": [100, 100, 63.5, 47.5], "image_size": [128, 96]}')
    camera = folder_camera(images)
    assert camera[2] == str(images / "camera.json")
    k, _ = image_intrinsic(images / "a.png", camera)  # given for 128x96, rescaled to the 64x48 image
    assert k[0, 0] == pytest.approx(50) and k[0, 2] == pytest.approx(31.5)
    spec_camera = folder_camera(images, [40, 40, 32, 24, 64, 48])
    assert spec_camera[2] == "inference.intrinsic" and spec_camera[0][1, 1] == 40


@pytest.mark.slow
def test_inference_uses_the_camera_of_the_image_folder(repo_root, data64, tmp_path):
    """2D then 3D stage from the templates (the 3D stage takes the preset from the 2D checkpoint), then
    inference on a folder with a camera.json: the images are lifted with that camera, not the 3D-FRONT one."""
    import json
    import shutil

    import numpy as np

    train = repo_root / "references" / "spec_template_train.yaml"
    data = [f"dataset.train.base_dir={data64}", "dataset.train.json_path=meta/train.json"]
    code, _, err = _run("train", train, [*SMALL, f"results_dir={tmp_path}/r2", *data])
    assert code == 0, err
    ckpt2d = tmp_path / "r2" / "train" / "panoptic_recon_3d_model_latest.pth"
    three_d = [o for o in SMALL if not o.startswith("model.")]
    code, _, err = _run("train", train, [*three_d, f"results_dir={tmp_path}/r3", *data, "dataset.enable_3d=true",
                                         f"train.checkpoint_2d={ckpt2d}", "model.frustum3d.unet_features=8"])
    assert code == 0, err
    ckpt3d = tmp_path / "r3" / "train" / "nvpanoptix3d_model_latest.pth"
    # evaluate from its template: the stage (dataset.enable_3d) and the sizes come from the checkpoint
    evaluate = repo_root / "references" / "spec_template_evaluate.yaml"
    code, _, err = _run("evaluate", evaluate, [f"evaluate.checkpoint={ckpt3d}", "evaluate.num_gpus=0",
                                               "dataset.name=synthetic", f"dataset.test.base_dir={data64}",
                                               "dataset.test.json_path=meta/test.json", f"results_dir={tmp_path}/ev"])
    assert code == 0, err
    assert (tmp_path / "ev" / "evaluate" / "metrics_3d.json").is_file()

    images = tmp_path / "images"
    images.mkdir()
    for i, rgb in enumerate(sorted((data64 / "data").rglob("rgb_*.png"))[:1]):
        shutil.copy(rgb, images / f"frame{i}.png")
    shutil.copy(data64 / "meta" / "camera.json", images / "camera.json")
    infer = repo_root / "references" / "spec_template_inference.yaml"
    common = [f"inference.checkpoint={ckpt3d}", f"inference.images_dir={images}", "inference.num_gpus=0"]
    code, out, err = _run("inference", infer, [*common, f"results_dir={tmp_path}/i1"])
    assert code == 0, err
    index = json.loads((tmp_path / "i1" / "inference" / "index.json").read_text())
    assert index["images"][0]["intrinsic"] == str(images / "camera.json")
    assert index["grid"]["dims"] == [64, 64, 64]  # from the checkpoint: no model key repeated
    fx = json.loads((images / "camera.json").read_text())["intrinsic"][0]
    with np.load(tmp_path / "i1" / "inference" / "frame0_panoptic3d.npz") as npz:
        plane = npz["plane_intrinsic"]
    assert plane[0, 0] == pytest.approx(fx * 32 / 64)  # the data's camera on the 32x24 lifting plane
    code, _, err = _run("inference", infer, [*common, f"results_dir={tmp_path}/i2",
                                             "inference.intrinsic=[56,56,31.5,23.5,64,48]"])
    assert code == 0, err
    index = json.loads((tmp_path / "i2" / "inference" / "index.json").read_text())
    assert index["images"][0]["intrinsic"] == "inference.intrinsic"

    # Python: a checkpoint alone (no experiment.yaml beside it) is enough for predict()
    from nvp3d import predict

    alone = tmp_path / "alone" / "model.pth"
    alone.parent.mkdir()
    shutil.copy(ckpt3d, alone)
    rec = predict(images / "frame0.png", checkpoint=alone, device="cpu")
    assert rec.meta["grid_dims"] == [64, 64, 64] and rec.meta["voxel_size"] == pytest.approx(0.12)
