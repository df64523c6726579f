"""Bridge to the synthetic scene generator of ``datasets3d`` and the specs that use its output.

The generator writes the toolkit's on-disk layout (``<out>/meta/{train,val,test}.json``,
``meta/colormap.json``, ``meta/frustum_mask.npz`` and per-frame files ``<out>/data/<scene>/rgb_<id>.png``,
...); :func:`synthetic_spec` returns a
spec whose dataset paths point into such a folder, for the demo and the example specs in ``references/``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from nvp3d.actions import import_or_not_built
from nvp3d.config import ExperimentSpec, validate_spec

_IMAGE_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")

#: File name of the 2D-stage "latest" checkpoint link (toolkit naming), used by the 3D example spec.
LATEST_2D_CHECKPOINT = "panoptic_recon_3d_model_latest.pth"
#: File name of the 3D-stage "latest" checkpoint link (toolkit naming).
LATEST_3D_CHECKPOINT = "nvpanoptix3d_model_latest.pth"


def parse_image_size(text: str) -> tuple[int, int]:
    """``"320x240"`` -> ``(320, 240)`` as (width, height), like ``dataset.target_size``."""
    match = _IMAGE_SIZE.match(text)
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise ValueError(f"image size {text!r} is not WIDTHxHEIGHT with positive numbers, e.g. 320x240")
    return int(match.group(1)), int(match.group(2))


def generate_synthetic(
    out_dir: str | Path,
    scenes: int,
    frames_per_scene: int,
    grid: int,
    image_size: tuple[int, int],
    seed: int,
) -> Any:
    """Run ``datasets3d.synth.generate`` (imported lazily); NotBuiltYetError while it does not exist."""
    module = import_or_not_built("datasets3d.synth", "synthetic data generator (datasets3d.synth.generate)")
    generate = getattr(module, "generate", None)
    if not callable(generate):
        from nvp3d.errors import NotBuiltYetError

        raise NotBuiltYetError("synthetic data generator (datasets3d.synth has no generate function)")
    return generate(
        out_dir=Path(out_dir),
        scenes=scenes,
        frames_per_scene=frames_per_scene,
        grid=grid,
        image_size=image_size,
        seed=seed,
    )


def synthetic_spec_dict(data_dir: str, results_dir: str, stage: str = "2d", num_gpus: int = 1) -> dict[str, Any]:
    """Non-default keys of a spec for data made by ``nvp3d dataset synth --out <data_dir>``.

    ``stage="2d"`` trains the 2D stage; ``"3d"`` trains the 3D stage on top of the 2D run's latest
    checkpoint (``<results_dir of the 2d spec>/train/...``), with batch size 1 as the toolkit's 3D specs.
    """
    if stage not in ("2d", "3d"):
        raise ValueError(f"stage must be '2d' or '3d', got {stage!r}")
    meta = f"{data_dir}/meta"
    checkpoint = f"{results_dir}/train/{LATEST_2D_CHECKPOINT if stage == '2d' else LATEST_3D_CHECKPOINT}"
    batch = 2 if stage == "2d" else 1

    def split(name: str) -> dict[str, Any]:
        return {"base_dir": data_dir, "json_path": f"{meta}/{name}.json", "batch_size": batch, "num_workers": 0}

    spec: dict[str, Any] = {
        "results_dir": results_dir,
        "dataset": {
            "name": "synthetic",
            "contiguous_id": True,
            "label_map": f"{meta}/colormap.json",
            "frustum_mask_path": f"{meta}/frustum_mask.npz",
            "enable_3d": stage == "3d",
            "train": split("train"),
            "val": split("val"),
            "test": split("test"),
            "augmentation": {"train_min_size": [240], "train_max_size": 960, "size_divisibility": 32},
        },
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
        spec["train"]["checkpoint_2d"] = f"{results_dir.removesuffix('_3d')}_2d/train/{LATEST_2D_CHECKPOINT}"
    return spec


def synthetic_spec(data_dir: str, results_dir: str, stage: str = "2d", num_gpus: int = 1) -> ExperimentSpec:
    """Validated :func:`synthetic_spec_dict`."""
    return validate_spec(synthetic_spec_dict(data_dir, results_dir, stage, num_gpus), source="synthetic spec")
