"""``nvp3d train`` on an ``s3://`` dataset (issue "From template to trained model without guesswork", bullet 5).

A moto S3 server on 127.0.0.1 holds a synthetic set the way the toolkit ships one: ``meta/`` as files and the
scene folders packed as ``data/images.tar.gz``. The spec names only URLs; nvp3d mirrors them into the cache
(``$NVP3D_CACHE``), reads the grid from the remote ``meta/camera.json`` and trains.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import yaml
from nvp3d.runner import run_action

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

pytestmark = pytest.mark.usefixtures("one_thread")

BUCKET = "nvp3d-cli-remote"
SMALL = ["model.preset=tiny", "model.mask_former.train_num_points=256", "train.num_gpus=0", "train.num_epochs=1",
         "dataset.target_size=[64,48]", "dataset.reduced_target_size=[32,24]", "dataset.depth_size=[24,32]",
         "dataset.min_instance_pixels=8", "dataset.name=synthetic"]


@pytest.fixture(scope="module")
def s3_dataset(tmp_path_factory, s3_server) -> str:
    """``s3://<bucket>/synth64``: a 64^3 synthetic set (meta/ + data/images.tar.gz) on a moto server."""
    from datasets3d.synth import generate

    root = tmp_path_factory.mktemp("synth_remote") / "data"
    generate(root, scenes=2, frames_per_scene=1, grid=64, image_size=(64, 48), seed=7, check=False)
    archive = tmp_path_factory.mktemp("packed") / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for scene in sorted(p for p in (root / "data").iterdir() if p.is_dir()):
            tf.add(scene, arcname=scene.name)
    with s3_server(tmp_path_factory, BUCKET) as fs:
        fs.put(str(root / "meta") + "/", f"{BUCKET}/synth64/meta", recursive=True)
        fs.put(str(archive), f"{BUCKET}/synth64/data/images.tar.gz")
        yield f"s3://{BUCKET}/synth64"


def _run(action: str, spec: Path, overrides: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    return run_action(action, spec, overrides, out=io.StringIO(), err=err), err.getvalue()


@pytest.mark.slow
def test_train_on_an_s3_dataset(repo_root, s3_dataset, tmp_path):
    template = repo_root / "references" / "spec_template_train.yaml"
    code, err = _run("train", template, [
        *SMALL, f"results_dir={tmp_path}", f"dataset.train.base_dir={s3_dataset}", "dataset.train.json_path=meta/train.json",
        f"dataset.label_map={s3_dataset}/meta/colormap.json"])
    assert code == 0, err
    assert (tmp_path / "train" / "panoptic_recon_3d_model_latest.pth").is_file()
    resolved = yaml.safe_load((tmp_path / "train" / "experiment.yaml").read_text())
    assert resolved["dataset"]["train"]["base_dir"] == s3_dataset  # the spec keeps the URL
    assert resolved["model"]["frustum3d"]["grid_dimensions"] == 64  # read from the remote meta/camera.json
    assert resolved["model"]["projection"]["voxel_size"] == pytest.approx(0.12)


def test_missing_s3_dataset_is_a_data_error(repo_root, s3_dataset, tmp_path):
    template = repo_root / "references" / "spec_template_train.yaml"
    code, err = _run("train", template, [*SMALL, f"results_dir={tmp_path}", f"dataset.train.base_dir={s3_dataset}x",
                                         "dataset.train.json_path=meta/train.json"])
    assert code == 4
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"dataset.train.base_dir: {s3_dataset}x does not exist" in lines[0], err
