"""The one place that writes specs for data made by the synthetic generator (``datasets3d.synth``).

The generator writes the toolkit's on-disk layout (``<data>/meta/{train,val,test}.json``,
``meta/colormap.json``, ``meta/frustum_mask.npz``, ``meta/camera.json`` and per-frame files
``<data>/data/<scene>/rgb_<id>.png``, ...). Every spec here shares :func:`dataset_section` (the split lists,
label map and frustum mask of such a folder); they differ only in their training recipe:

* :func:`example_spec_dict` -- the example specs in ``references/spec_synthetic_{2d,3d}.yaml`` (written by
  ``nvp3d schema``): toolkit-sized images, WarmupPoly schedule;
* :func:`demo_spec_dict` / :func:`demo_spec` -- the tiny 2D model of ``nvp3d demo`` (small images, MultiStep);
* :func:`spec_3d_from_2d` -- the 3D stage on top of a 2D spec (the demo's second half).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from nvp3d.config import ExperimentSpec, validate_spec
from nvp3d.training.checkpointing import latest_file

__all__ = ["DEMO_CLASS_TINT", "DEMO_COARSE_MASK_WEIGHT", "DEMO_LR_3D", "DEMO_TEST_TIME_FLIP", "dataset_section",
           "demo_spec", "demo_spec_dict", "example_spec_dict", "parse_image_size", "spec_3d_from_2d"]

#: ``datasets3d.synth`` ``class_tint`` of the demo's data: furniture colours pulled 60 % towards a typical colour
#: per class. With shape-only classes the tiny model, trained on a few scenes in CPU minutes, never names a piece of
#: furniture on an unseen scene (measured: held-out things PQ 0); a class colour cue, as real categories have
#: typical materials, makes that learnable within the demo's budget.
DEMO_CLASS_TINT = 0.6

#: lr of the demo's 3D stage, which also turns on ``model.frustum3d.mask_prior_2d`` (``nvp3d.demo.run3d.demo_3d``).
#: With the toolkit's 3D masks alone the thing queries' 3D mask probabilities stay low after the demo's 5 epochs
#: (at lr 3e-3: 0.15-0.25, on the training frames as well), so no thing owns a voxel (held-out 3D things PRQ 0, at
#: lr 1e-3 also on the GT geometry). Measured on the default demo (seed 0, same 2D checkpoint; held-out PRQ /
#: things PRQ): lr 1e-3 2.8 / 0.0; lr 3e-3 7.2 / 0.0; lr 3e-3 + soft dice 5 7.5 / 0.0; lr 3e-3 + 2D mask prior
#: 9.4 / 6.8 (10 epochs: 10.6 / 6.7, 80 s more). Seed 1: lr 1e-3 3.2 / 0.0; lr 3e-3 + prior 8.5 / 2.9.
DEMO_LR_3D = 3e-3

#: ``model.test_time_flip`` of the demo's 2D evaluations: each query's class and mask probabilities (and the depth)
#: averaged with the horizontally flipped image's (the demo trains with horizontal flips). Measured on 8 finished
#: demo runs of stops 40-42 (their own 32 held-out rooms, same checkpoints): held-out things PQ 6.7 / 12.1 / 9.3 /
#: 6.0 / 11.2 / 14.4 / 5.3 / 8.4 in one pass, 10.8 / 15.4 / 11.9 / 9.5 / 15.5 / 17.2 / 5.4 / 9.0 flip-averaged
#: (mean 9.2 -> 11.8, no run lower). The demo prints the one-pass numbers too.
DEMO_TEST_TIME_FLIP = True

#: ``model.frustum3d.coarse_mask_weight`` of the demo's 3D stage (evaluation and inference): each finest voxel's
#: query mask logits plus this times its level-128 parent's (:mod:`nvp3d.model.coarse_masks`). Measured on five
#: finished demo runs (seeds 0-4 of stops 43-44, their own 32 held-out rooms, same checkpoints), held-out 3D PRQ
#: (things): weight 0: 6.4 (3.3) / 7.6 (4.6) / 7.0 (3.6) / 8.6 (6.8) / 7.9 (3.6); 0.25: 6.8 (3.4) / 7.9 (4.9) /
#: 7.5 (3.9) / 9.6 (7.5) / 8.9 (4.3), every run higher (mean 7.5 -> 8.1, things 4.4 -> 4.8); 0.5 about the same
#: (8.2, 4.8), 0.75 less (8.0, 4.5). The demo prints the plain fusion's numbers too.
DEMO_COARSE_MASK_WEIGHT = 0.25

_IMAGE_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_image_size(text: str) -> tuple[int, int]:
    """``"320x240"`` -> ``(320, 240)`` as (width, height), like ``dataset.target_size``."""
    match = _IMAGE_SIZE.match(text)
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise ValueError(f"image size {text!r} is not WIDTHxHEIGHT with positive numbers, e.g. 320x240")
    return int(match.group(1)), int(match.group(2))


def dataset_section(data_dir: str | Path, *, batch_size: int, num_workers: int, enable_3d: bool = False,
                    val_test_batch_size: int | None = None) -> dict[str, Any]:
    """The ``dataset`` keys every synthetic spec shares: the folder's split lists, label map, frustum mask."""
    data = Path(data_dir).as_posix()
    meta = f"{data}/meta"

    def split(name: str, bs: int) -> dict[str, Any]:
        return {"base_dir": data, "json_path": f"{meta}/{name}.json", "batch_size": bs, "num_workers": num_workers}

    eval_bs = batch_size if val_test_batch_size is None else val_test_batch_size
    return {
        "name": "synthetic", "contiguous_id": True, "label_map": f"{meta}/colormap.json",
        "frustum_mask_path": f"{meta}/frustum_mask.npz", "enable_3d": enable_3d,
        "train": split("train", batch_size), "val": split("val", eval_bs), "test": split("test", eval_bs),
    }


def example_spec_dict(data_dir: str, results_dir: str, stage: str = "2d", num_gpus: int = 1) -> dict[str, Any]:
    """Non-default keys of the example spec for data made by ``nvp3d dataset synth --out <data_dir>``.

    ``stage="2d"`` trains the 2D stage; ``"3d"`` trains the 3D stage on top of the 2D run's latest
    checkpoint (``<results_dir of the 2d spec>/train/...``), with batch size 1 as the toolkit's 3D specs.
    """
    if stage not in ("2d", "3d"):
        raise ValueError(f"stage must be '2d' or '3d', got {stage!r}")
    checkpoint = f"{results_dir}/train/{latest_file(stage)}"
    dataset = dataset_section(data_dir, batch_size=2 if stage == "2d" else 1, num_workers=0, enable_3d=stage == "3d")
    dataset["augmentation"] = {"train_min_size": [240], "train_max_size": 960, "size_divisibility": 32}
    spec: dict[str, Any] = {
        "results_dir": results_dir,
        "dataset": dataset,
        "model": {
            "preset": "tiny",
            "object_mask_threshold": 0.8,
            "overlap_threshold": 0.8,
            "frustum3d": {"iso_recon_value": 1.0},
        },
        "train": {
            "num_gpus": num_gpus,
            "num_epochs": 3,
            "checkpoint_interval": 1,
            "clip_grad_norm": 0.01,
            "optim": {"lr": 1e-4, "lr_scheduler": "WarmupPoly", "max_steps": 1000},
        },
        "evaluate": {"checkpoint": checkpoint},
        "inference": {"checkpoint": checkpoint, "images_dir": f"{data_dir}/data", "recursive": True},
        "export": {"checkpoint": checkpoint, "input_width": 320, "input_height": 240, "batch_size": 1},
    }
    if stage == "3d":
        spec["train"]["checkpoint_2d"] = f"{results_dir.removesuffix('_3d')}_2d/train/{latest_file('2d')}"
    return spec


def demo_spec_dict(data_dir: str | Path, results_dir: str | Path, *, image_size: tuple[int, int] = (80, 60),
                   voxel_size: float = 0.12, epochs: int = 20, batch_size: int = 2, lr: float = 1e-3,
                   num_gpus: int = 1, min_instance_pixels: int = 20, checkpoint_interval: int = 5,
                   num_workers: int = 0, random_flip: str = "",
                   random_zoom: tuple[float, float] = (1.0, 1.0), ema_decay: float = 0.0,
                   test_time_flip: bool = False) -> dict[str, Any]:
    """Spec (non-default keys) of the demo's tiny 2D model on data written by ``datasets3d.synth.generate``.

    The aggregator has no pretrained weights, so it trains (``model.backbone.freeze`` null); ``random_flip``
    (``"horizontal"``) sets ``dataset.augmentation.random_flip`` and ``random_zoom`` (min, max) the 3D-consistent
    ``dataset.augmentation.random_zoom``; both act in both stages. ``ema_decay`` sets ``train.ema_decay`` (the
    checkpoints hold a moving average of the weights; :mod:`nvp3d.training.weight_ema`). ``test_time_flip`` sets
    ``model.test_time_flip`` (the demo itself passes :data:`DEMO_TEST_TIME_FLIP`).
    """
    w, h = image_size
    dataset = dataset_section(data_dir, batch_size=batch_size, num_workers=num_workers)
    dataset.update({"target_size": [w, h], "reduced_target_size": [w // 2, h // 2], "depth_size": [h // 2, w // 2],
                    "min_instance_pixels": min_instance_pixels})
    augmentation: dict[str, Any] = {}
    if random_flip:
        augmentation["random_flip"] = random_flip
    if tuple(random_zoom) != (1.0, 1.0):
        augmentation["random_zoom"] = [float(v) for v in random_zoom]
    if augmentation:
        dataset["augmentation"] = augmentation
    return {
        "results_dir": Path(results_dir).as_posix(),
        "dataset": dataset,
        "model": {"preset": "tiny", "object_mask_threshold": 0.5, "overlap_threshold": 0.5,
                  "test_time_flip": bool(test_time_flip), "projection": {"voxel_size": voxel_size}},
        "train": {
            "num_gpus": num_gpus, "num_epochs": epochs, "checkpoint_interval": checkpoint_interval,
            "clip_grad_norm": 1.0, "seed": 1234, "ema_decay": float(ema_decay),
            "activation_checkpoint": False,  # the trained tiny aggregator is small: recomputing it only costs time
            "optim": {"lr": lr, "lr_scheduler": "MultiStep", "milestones": [max(1, int(epochs * 0.8))],
                      "gamma": 0.1, "backbone_multiplier": 1.0},
        },
    }


def demo_spec(data_dir: str | Path, results_dir: str | Path, **kwargs: Any) -> ExperimentSpec:
    """Validated :func:`demo_spec_dict`."""
    return validate_spec(demo_spec_dict(data_dir, results_dir, **kwargs), source="demo spec")


#: ``model.frustum3d.iso_recon_value`` for synthetic data. The generator's TDF is a voxel-unit distance transform:
#: surface voxels hold 0..0.87 and their face neighbours exactly 1.0, the most common value, right at the metric's
#: ``TDF < 1.0`` surface test. A prediction a little under 1.0 there doubles the predicted surface thickness and
#: halves every IoU. Measured on one overfit scene (4 frames, 389 steps): PRQ 29.3 at 1.0, 50.5 at 0.75.
SYNTHETIC_ISO_RECON_VALUE = 0.75


def spec_3d_from_2d(spec_2d: Any, checkpoint_2d: str | Path, *, grid: int, epochs: int = 6, lr: float = 1e-3,
                    unet_features: int = 8, iso_recon_value: float = SYNTHETIC_ISO_RECON_VALUE,
                    panoptic_dice_weight: float | None = None, mask_prior_2d: bool | None = None,
                    coarse_mask_weight: float | None = None) -> Any:
    """The 3D-stage spec of a (tiny, synthetic) 2D spec: same data and model, ``dataset.enable_3d: true``,
    batch 1, the 2D checkpoint, the data's grid; ``mask_prior_2d`` and ``coarse_mask_weight`` (when given) set
    ``model.frustum3d.mask_prior_2d`` and ``model.frustum3d.coarse_mask_weight``."""
    s3 = spec_2d.model_copy(deep=True)
    s3.dataset.enable_3d = True
    f3 = s3.model.frustum3d
    f3.grid_dimensions = f3.frustum_dims = int(grid)
    f3.unet_features = f3.unet_output_channels = int(unet_features)
    f3.iso_recon_value = float(iso_recon_value)
    if panoptic_dice_weight is not None:
        f3.panoptic_dice_weight = float(panoptic_dice_weight)
    if mask_prior_2d is not None:
        f3.mask_prior_2d = bool(mask_prior_2d)
    if coarse_mask_weight is not None:
        f3.coarse_mask_weight = float(coarse_mask_weight)
    s3.dataset.train.batch_size = 1
    s3.train.checkpoint_2d = str(checkpoint_2d)
    s3.train.resume_training_checkpoint_path = ""
    s3.train.num_epochs = int(epochs)
    s3.train.checkpoint_interval = max(1, int(epochs) // 2)
    s3.train.validation_interval = int(epochs)
    s3.train.optim.lr = float(lr)
    s3.train.optim.milestones = [max(1, int(epochs * 0.8))]
    return s3
