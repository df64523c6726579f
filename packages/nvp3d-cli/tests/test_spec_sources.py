"""Values the dataset and the checkpoint define are read from them unless the spec sets them (issue "From
template to trained model without guesswork", bullets 2 and 3)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from nvp3d.config import load_spec
from nvp3d.config.data_defaults import dataset_geometry
from nvp3d.runner import run_action
from nvp3d.status import read_status

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_IMAGES = ["dataset.target_size=[64,48]", "dataset.reduced_target_size=[32,24]", "dataset.depth_size=[24,32]",
                "dataset.min_instance_pixels=8"]


@pytest.fixture(scope="module")
def data64(tmp_path_factory) -> Path:
    """A synthetic set on a 64^3 grid (voxel 0.12 m), as `nvp3d dataset synth --grid 64` writes it."""
    from datasets3d.synth import generate

    root = tmp_path_factory.mktemp("synth64") / "data"
    generate(root, scenes=2, frames_per_scene=1, grid=64, image_size=(64, 48), seed=5, check=False)
    return root


def _data_keys(root: Path, split: str = "train") -> list[str]:
    return ["dataset.name=synthetic", f"dataset.{split}.base_dir={root}", f"dataset.{split}.json_path=meta/{split}.json"]


def _run(action: str, spec: Path, overrides: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_action(action, spec, overrides, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_grid_and_voxel_size_come_from_the_dataset(repo_root, data64, tmp_path, restore_actions):
    seen = {}
    restore_actions["train"] = f"{__name__}:_record_spec"
    _record_spec.seen = seen  # type: ignore[attr-defined]
    template = repo_root / "references" / "spec_template_train.yaml"
    code, _, err = _run("train", template, ["model.preset=tiny", f"results_dir={tmp_path}", *_data_keys(data64)])
    assert code == 0, err
    model = seen["spec"].model
    assert model.frustum3d.grid_dimensions == 64 and model.frustum3d.frustum_dims == 64
    assert model.projection.voxel_size == pytest.approx(0.12)
    recorded = load_spec(tmp_path / "train" / "experiment.yaml").model  # experiment.yaml holds what was used
    assert recorded.frustum3d.grid_dimensions == 64 and recorded.projection.voxel_size == pytest.approx(0.12)


def _record_spec(spec, results_dir, status):
    _record_spec.seen["spec"] = spec  # type: ignore[attr-defined]


def test_grid_that_contradicts_the_dataset_is_one_line(repo_root, data64, tmp_path):
    template = repo_root / "references" / "spec_template_train.yaml"
    code, _, err = _run("train", template, ["model.preset=tiny", f"results_dir={tmp_path}", *_data_keys(data64),
                                            "dataset.enable_3d=true", "model.frustum3d.grid_dimensions=256"])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "model.frustum3d.grid_dimensions=256 differs from 64" in lines[0]
    assert str(data64 / "meta" / "camera.json") in lines[0]


def test_two_d_stage_keeps_an_explicit_grid_it_does_not_use(repo_root, data64, tmp_path, restore_actions):
    """experiment.yaml files of 2D runs made before the grid came from the data say 256 on a 64^3 set: the 2D
    stage never uses the grid side, so they keep working; a wrong voxel size (used by the 2D targets) does not."""
    restore_actions["train"] = f"{__name__}:_record_spec"
    _record_spec.seen = {}  # type: ignore[attr-defined]
    template = repo_root / "references" / "spec_template_train.yaml"
    base = ["model.preset=tiny", f"results_dir={tmp_path}", *_data_keys(data64)]
    code, _, err = _run("train", template, [*base, "model.frustum3d.grid_dimensions=256"])
    assert code == 0, err
    code, _, err = _run("train", template, [*base, "model.projection.voxel_size=0.03"])
    assert code == 2 and "model.projection.voxel_size=0.03 differs from 0.12" in err


def test_frustum_mask_shape_defines_the_grid_without_camera_json(tmp_path):
    (tmp_path / "meta").mkdir()
    np.savez_compressed(tmp_path / "meta" / "frustum_mask.npz", mask=np.ones((96, 96, 96), dtype=bool))
    spec = load_spec(None, [f"dataset.train.base_dir={tmp_path}"])
    found = dataset_geometry(spec, "train")
    assert found["frustum3d.grid_dimensions"][0] == 96 and found["frustum3d.frustum_dims"][0] == 96
    assert "projection.voxel_size" not in found  # only camera.json says the voxel size


@pytest.mark.slow
def test_later_actions_take_the_model_from_the_checkpoint(repo_root, data64, tmp_path, restore_actions):
    """Train with model overrides; evaluate from the evaluate template repeats none of them; a contradicting key
    is one line; a checkpoint without the record (written before it existed) still works with explicit keys."""
    template = repo_root / "references" / "spec_template_train.yaml"
    train_overrides = ["model.preset=tiny", "model.mask_former.hidden_dim=48", "model.mask_former.nheads=4",
                       "model.mask_former.train_num_points=256", "train.num_gpus=0", "train.num_epochs=1",
                       f"results_dir={tmp_path}", *SMALL_IMAGES, *_data_keys(data64), *_data_keys(data64, "val")]
    code, _, err = _run("train", template, train_overrides)
    assert code == 0, err
    ckpt = tmp_path / "train" / "panoptic_recon_3d_model_latest.pth"
    # 2D KPIs that are undefined (no segment of a kind predicted) are null in status.json, not the string "nan"
    kpis = [r["kpi"] for r in read_status(tmp_path / "train" / "status.json") if "kpi" in r]
    assert kpis and "PQ" in kpis[-1]
    assert not any(isinstance(v, str) for kpi in kpis for v in kpi.values()), kpis[-1]
    assert '"nan"' not in (tmp_path / "train" / "status.json").read_text()
    record = torch.load(ckpt, map_location="cpu", weights_only=False)["nvp3d_spec"]
    assert record["model"]["mask_former"]["hidden_dim"] == 48
    assert {e["name"] for e in record["labels"]} >= {"wall", "floor"}

    evaluate = repo_root / "references" / "spec_template_evaluate.yaml"
    common = [f"evaluate.checkpoint={ckpt}", "evaluate.num_gpus=0", *_data_keys(data64, "test")]
    code, out, err = _run("evaluate", evaluate, [*common, f"results_dir={tmp_path}/a"])
    assert code == 0, err
    assert "from evaluate.checkpoint=" in out
    used = load_spec(tmp_path / "a" / "evaluate" / "experiment.yaml")
    assert used.model.preset == "tiny" and used.model.mask_former.hidden_dim == 48
    assert used.dataset.target_size == [64, 48] and used.model.frustum3d.grid_dimensions == 64

    code, _, err = _run("evaluate", evaluate, [*common, f"results_dir={tmp_path}/b", "model.mask_former.hidden_dim=32"])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "model.mask_former.hidden_dim=32 conflicts with 48 recorded in" in lines[0], err

    # export (its action replaced by a recorder: ONNX export itself is tested elsewhere) gets the same sizes
    restore_actions["export"] = f"{__name__}:_record_spec"
    _record_spec.seen = {}  # type: ignore[attr-defined]
    export = repo_root / "references" / "spec_template_export.yaml"
    code, _, err = _run("export", export, [f"export.checkpoint={ckpt}", f"results_dir={tmp_path}/e"])
    assert code == 0, err
    assert _record_spec.seen["spec"].model.mask_former.hidden_dim == 48  # type: ignore[attr-defined]

    old = torch.load(ckpt, map_location="cpu", weights_only=False)
    del old["nvp3d_spec"]
    old_ckpt = tmp_path / "old.pth"
    torch.save(old, old_ckpt)
    explicit = ["model.preset=tiny", "model.mask_former.hidden_dim=48", "model.mask_former.nheads=4", *SMALL_IMAGES]
    code, out, err = _run("evaluate", evaluate, [f"evaluate.checkpoint={old_ckpt}", "evaluate.num_gpus=0",
                                                 *_data_keys(data64, "test"), f"results_dir={tmp_path}/c", *explicit])
    assert code == 0, err
    assert "from evaluate.checkpoint=" not in out
    assert yaml.safe_load((tmp_path / "c" / "evaluate" / "experiment.yaml").read_text())["model"]["preset"] == "tiny"


@pytest.mark.slow
def test_example_spec_on_a_64_grid_needs_no_grid_keys(repo_root, tmp_path, monkeypatch):
    """The README's short path: `nvp3d dataset synth --out data/synthetic --grid 64`, then the example spec as it
    is (its paths are relative to the working directory, as the toolkit reads them)."""
    from datasets3d.synth import generate

    monkeypatch.chdir(tmp_path)
    generate(tmp_path / "data" / "synthetic", scenes=2, frames_per_scene=1, grid=64, image_size=(64, 48), seed=8,
             check=False)
    code, _, err = _run("train", repo_root / "references" / "spec_synthetic_2d.yaml",
                        ["train.num_gpus=0", "train.num_epochs=1", "model.mask_former.train_num_points=256"])
    assert code == 0, err
    used = load_spec(tmp_path / "results" / "synthetic_2d" / "train" / "experiment.yaml")
    assert used.model.frustum3d.grid_dimensions == 64 and used.model.projection.voxel_size == pytest.approx(0.12)


def test_recorded_sizes_survive_later_model_keys():
    """A checkpoint's size that differs from the preset's default (tiny: 16 queries) stays when a model key sorted
    after it is filled too (``object_mask_threshold``): found when a demo checkpoint with 32 queries could not be
    evaluated ("query_embed has shape (32, 32) but the model needs (16, 32)")."""
    from nvp3d.config import validate_spec
    from nvp3d.config.sources import merge_recorded_model

    recorded = validate_spec({"model": {"preset": "tiny", "mask_former": {"num_object_queries": 48},
                                        "object_mask_threshold": 0.5}}).model.model_dump(mode="json")
    spec = validate_spec({"model": {"preset": "tiny"}})
    changed = merge_recorded_model(spec, recorded, "test.pth")
    assert {"mask_former.num_object_queries", "object_mask_threshold"} <= set(changed)
    assert spec.model.mask_former.num_object_queries == 48 and spec.model.object_mask_threshold == 0.5
    spec.model.overlap_threshold = 0.6  # any later assignment re-validates the model
    assert spec.model.mask_former.num_object_queries == 48
    assert spec.model.model_copy(deep=True).mask_former.num_object_queries == 48
    # the preset still decides the keys nobody set: changing it brings the new preset's defaults
    spec = validate_spec({"model": {"preset": "tiny"}})
    spec.model.preset = "small"
    assert spec.model.mask_former.num_object_queries == 50 and spec.model.mask_former.hidden_dim == 128
    # the preset default is taken from the recorded preset when the spec sets none
    spec = validate_spec({})
    merge_recorded_model(spec, recorded, "test.pth")
    assert spec.model.preset == "tiny" and spec.model.mask_former.num_object_queries == 48


def test_fusion_setting_of_the_command_line_wins_over_the_checkpoint():
    """``model.frustum3d.labels_2d_bands`` is a fusion setting, not part of the network: set explicitly it overrides
    the checkpoint's value without a conflict; left unset it takes the checkpoint's."""
    from nvp3d.config import validate_spec
    from nvp3d.config.sources import merge_recorded_model

    recorded = validate_spec({"model": {"frustum3d": {"labels_2d_bands": 0.0}}}).model.model_dump(mode="json")
    spec = validate_spec({"model": {"frustum3d": {"labels_2d_bands": 1.0}}})
    merge_recorded_model(spec, recorded, "test.pth")
    assert spec.model.frustum3d.labels_2d_bands == 1.0
    recorded["frustum3d"]["labels_2d_bands"] = 1.5
    spec = validate_spec({})
    assert "frustum3d.labels_2d_bands" in merge_recorded_model(spec, recorded, "test.pth")
    assert spec.model.frustum3d.labels_2d_bands == 1.5
