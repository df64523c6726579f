"""``inference.images_dir`` as an ``s3://`` URL, against a real S3-compatible server (moto on 127.0.0.1).

The folder is mirrored into the dataset cache and reconstructed: the same files and volumes as the local
folder, the URL recorded in ``index.json``; a second run downloads nothing; a missing prefix is a one-line error
naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from nvp3d.inference.predictor import Predictor
from nvp3d.inference.run import INDEX_FILENAME, run_inference

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
pytestmark = pytest.mark.usefixtures("one_thread")

BUCKET = "nvp3d-inference-test"
IMAGE = (64, 48)


def _quiet(*args) -> None:
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory, s3_server, inference_setup):
    """3 images in a local folder and under ``s3://BUCKET/shots/``, a random-weight 3D checkpoint (tiny, 32^3)."""
    spec, images = inference_setup(tmp_path_factory.mktemp("remote_synth"), tmp_path_factory.mktemp("remote_inference"),
                                   frames=3, seed=7, batch_size=1, image_size=IMAGE)
    spec.inference.write_workers = 0
    with s3_server(tmp_path_factory, BUCKET) as fs:
        fs.put(str(images) + "/", f"{BUCKET}/shots", recursive=True)
        yield {"spec": spec, "images": images}


def _run(spec, images_dir: str, out: Path) -> dict:
    spec = spec.model_copy(deep=True)
    spec.inference.images_dir = images_dir
    predictor = Predictor(spec, spec.inference.checkpoint, say=_quiet)
    predictor.model.completion.threshold = 0.95  # random decoder: prune hard (speed on a loaded CPU)
    run_inference(spec, out, None, say=_quiet, enable_progress_bar=False, predictor=predictor)
    return json.loads((out / INDEX_FILENAME).read_text())


def test_s3_images_dir_reconstructs_like_the_local_folder(setup, tmp_path: Path) -> None:
    url = f"s3://{BUCKET}/shots"
    local = _run(setup["spec"], str(setup["images"]), tmp_path / "local")
    remote = _run(setup["spec"], url, tmp_path / "remote")
    assert remote["images_dir"] == url and Path(remote["images_cache"]).is_dir()
    assert [e["name"] for e in remote["images"]] == [e["name"] for e in local["images"]] == ["img0", "img1", "img2"]
    for e in local["images"]:
        a = np.load(tmp_path / "local" / e["outputs"]["volumes"])
        b = np.load(tmp_path / "remote" / e["outputs"]["volumes"])
        for key in ("panoptic", "semantic", "geometry"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{e['name']}: {key}")
    # a second run finds the mirror current: nothing is downloaded again
    cached = {p: p.stat().st_mtime_ns for p in Path(remote["images_cache"]).rglob("*.png")}
    _run(setup["spec"], url, tmp_path / "again")
    assert {p: p.stat().st_mtime_ns for p in Path(remote["images_cache"]).rglob("*.png")} == cached


def test_missing_s3_prefix_is_one_line_naming_the_key(setup, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        _run(setup["spec"], f"s3://{BUCKET}/no-such-prefix", tmp_path / "out")
    text = str(exc.value)
    assert "\n" not in text and text.startswith("inference.images_dir: ") and "no-such-prefix" in text


def test_empty_images_dir_is_one_line_naming_the_key(setup, tmp_path: Path) -> None:
    spec = setup["spec"].model_copy(deep=True)
    spec.inference.images_dir = ""
    with pytest.raises(FileNotFoundError, match=r"^inference.images_dir is empty: set it to a folder"):
        run_inference(spec, tmp_path / "out", None, say=_quiet, enable_progress_bar=False)
