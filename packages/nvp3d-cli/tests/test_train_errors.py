"""Bad specs and missing data end with clear one-line errors that name the key or file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from nvp3d.data.datamodule import DataSpecError, dataset_config
from nvp3d.demo.specs import demo_spec
from nvp3d.evaluation.evaluate import evaluate
from nvp3d.training.fit import train
from nvp3d.training.trainer import device_setup, lightning_precision

IMAGE = (64, 48)


@pytest.fixture(scope="module")
def data_dir(synthetic_data) -> Path:
    return synthetic_data("nvp3d_synth_64x48", seed=3, image_size=IMAGE)


def _spec(data: Path, out: Path):
    return demo_spec(data, out, image_size=IMAGE, voxel_size=0.24, epochs=1, num_gpus=0, min_instance_pixels=8)


def _quiet(*args) -> None:
    pass


def test_empty_and_missing_dataset_paths(tmp_path: Path) -> None:
    spec = _spec(tmp_path / "nowhere", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"dataset.train.base_dir=.*nowhere"):
        train(spec, tmp_path / "train", None, say=_quiet)
    spec.dataset.train.base_dir = ""
    with pytest.raises(DataSpecError, match=r"dataset.train.base_dir is empty"):
        dataset_config(spec, "train")
    spec.dataset.train.base_dir = str(tmp_path)
    spec.dataset.train.json_path = ""
    with pytest.raises(DataSpecError, match=r"dataset.train.json_path is empty"):
        dataset_config(spec, "train")


def test_missing_split_file_names_the_file(data_dir: Path, tmp_path: Path) -> None:
    spec = _spec(data_dir, tmp_path)
    spec.dataset.train.json_path = str(data_dir / "meta" / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        train(spec, tmp_path / "train", None, say=_quiet)


def test_unsupported_settings(data_dir: Path, tmp_path: Path) -> None:
    spec = _spec(data_dir, tmp_path)
    with pytest.raises(ValueError, match="'fp32' or 'bf16'"):  # the spec no longer offers fp16
        spec.train.precision = "fp16"
    with pytest.raises(ValueError, match="train.precision=fp16"):
        lightning_precision("fp16")
    assert lightning_precision("bf16") == "bf16-mixed" and lightning_precision("fp32") == "32-true"
    spec = _spec(data_dir, tmp_path)
    spec.dataset.enable_3d = True  # the 3D stage trains on top of a 2D checkpoint
    with pytest.raises(ValueError, match="train.checkpoint_2d is empty"):
        train(spec, tmp_path / "train", None, say=_quiet)


def test_bad_resume_path_and_freeze_entry(data_dir: Path, tmp_path: Path) -> None:
    spec = _spec(data_dir, tmp_path)
    spec.train.resume_training_checkpoint_path = str(tmp_path / "gone.pth")
    with pytest.raises(FileNotFoundError, match="train.resume_training_checkpoint_path"):
        train(spec, tmp_path / "train", None, say=_quiet)
    spec = _spec(data_dir, tmp_path)
    spec.train.freeze = ["sem_seg_head.no_such_module"]
    with pytest.raises(ValueError, match="train.freeze entry 'sem_seg_head.no_such_module'"):
        train(spec, tmp_path / "train", None, say=_quiet)


def test_evaluate_needs_a_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    spec = _spec(data_dir, tmp_path)
    with pytest.raises(ValueError, match="evaluate.checkpoint is empty"):
        evaluate(spec, tmp_path / "eval", None, say=_quiet)
    spec.evaluate.checkpoint = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="evaluate.checkpoint="):
        evaluate(spec, tmp_path / "eval", None, say=_quiet)


def test_device_mapping_without_cuda() -> None:
    one = device_setup(1, [0], 1, cuda=False)
    assert one["accelerator"] == "cpu" and one["devices"] == 1 and one["strategy"] == "auto"
    two = device_setup(2, [0, 1], 1, activation_checkpoint=True, cuda=False)
    assert two["devices"] == 2 and two["strategy"]._ddp_kwargs["find_unused_parameters"] is False
    assert two["strategy"]._process_group_backend == "gloo"
    gpu = device_setup(2, [1, 3], 1, activation_checkpoint=False, cuda=True)
    assert gpu["accelerator"] == "gpu" and gpu["devices"] == [1, 3]
    assert gpu["strategy"]._ddp_kwargs["find_unused_parameters"] is True


def test_unapplied_augmentation_is_reported(data_dir: Path, tmp_path: Path) -> None:
    # random_flip and color_aug_ssd are applied now (nvp3d.data.augmentation): only gen_aug_weight and
    # enable_crop are still reported as not applied
    from nvp3d.data.augmentation import augmentation_notices, train_augmentation_fields
    from nvp3d.status import StatusLogger, read_status
    from nvp3d.training.fit import report_ignored_augmentation

    spec = _spec(data_dir, tmp_path)
    assert augmentation_notices(spec) == [] and train_augmentation_fields(spec) == {}
    spec.dataset.augmentation.random_flip = "horizontal"
    spec.dataset.augmentation.color_aug_ssd = True
    assert augmentation_notices(spec) == []
    fields = train_augmentation_fields(spec)
    assert fields["random_flip"] == "horizontal" and fields["color_aug_ssd"] is True
    assert fields["augment_seed"] == spec.train.seed and fields["zoom_range"] == (1.0, 1.0)
    spec.dataset.augmentation.random_zoom = [1.0, 1.5]
    assert train_augmentation_fields(spec)["zoom_range"] == (1.0, 1.5) and augmentation_notices(spec) == []
    spec.dataset.augmentation.gen_aug_weight = 0.5
    spec.dataset.augmentation.enable_crop = True
    lines: list[str] = []
    status = StatusLogger(tmp_path / "status.json")
    report_ignored_augmentation(spec, status, lines.append)
    assert len(lines) == 1 and "gen_aug_weight=0.5" in lines[0] and "enable_crop=true" in lines[0]
    assert "not applied" in read_status(tmp_path / "status.json")[-1]["message"]


def test_random_zoom_reaches_both_stages(data_dir: Path, tmp_path: Path) -> None:
    # dataset.augmentation.random_zoom: the 2D stage's multi-plane occupancy planes and the 3D stage's targets
    # are built from the zoomed camera. The zoom moves the volumes by whole voxels with camera_to_grid, so the
    # zoomed planes equal the planes of the *unzoomed* volumes seen through the zoomed intrinsic, cell for cell
    from datasets3d.augment import AugmentKey
    from nvp3d.data.datamodule import NVP3DDataModule
    from nvp3d.data.targets import mp_occ_planes

    raw, prepared = {}, {}
    for zoom in ([1.0, 1.0], [1.6, 1.6]):
        spec = _spec(data_dir, tmp_path)
        spec.dataset.augmentation.random_zoom = zoom
        dm = NVP3DDataModule(spec, splits=("train",))
        dm.setup("fit")
        frames = dm.datasets["train"]
        raw[zoom[0]] = frames.base[AugmentKey(0, 0)]
        prepared[zoom[0]] = frames[AugmentKey(0, 0)]
    cfg = frames.base.config
    plain, zoomed = raw[1.0], raw[1.6]
    assert "augment" not in plain["meta"] and zoomed["meta"]["augment"]["zoom"]["factor"] == pytest.approx(1.6)
    assert float(zoomed["intrinsic_reduced"][0, 0]) == pytest.approx(1.6 * float(plain["intrinsic_reduced"][0, 0]))
    bins = prepared[1.0]["occupancy_planes"].shape[0]
    args = (tuple(cfg.reduced_target_size), tuple(cfg.depth_size), bins, cfg.depth_min, cfg.depth_max)
    through_zoom = mp_occ_planes(plain["mp_occ"], plain["frustum_mask"], plain["camera_to_grid"],
                                 zoomed["intrinsic_reduced"], *args)
    assert through_zoom.any() and torch.equal(prepared[1.6]["occupancy_planes"], through_zoom)
    assert not torch.equal(prepared[1.6]["occupancy_planes"], prepared[1.0]["occupancy_planes"])
    spec3d = _spec(data_dir, tmp_path)
    spec3d.dataset.enable_3d = True
    spec3d.dataset.augmentation.random_zoom = [1.6, 1.6]
    dm = NVP3DDataModule(spec3d, splits=("train",))
    dm.setup("fit")
    s3 = dm.datasets["train"][AugmentKey(0, 0)]
    assert s3["meta"]["augment"]["zoom"]["factor"] == pytest.approx(1.6)
    assert not (s3["occupancy_256"] & ~s3["frustum_mask"]).any() and s3["masks_3d_256"].any()
