"""Spec models and loader: toolkit keys/defaults, enums, ranges, unknown keys, overrides, outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from nvp3d.config import (
    ExperimentSpec,
    apply_overrides,
    dump_spec,
    iter_spec_keys,
    load_spec,
    parse_override,
    resolve_results_dir,
    suggest_key,
)
from nvp3d.errors import OverrideError, SpecError, SpecFileNotFoundError

# Keys the issue requires, copied from its text (independent of the models).
ISSUE_KEYS = """
results_dir encryption_key model_name gpu_ids
dataset.name dataset.contiguous_id dataset.label_map dataset.frustum_mask_path dataset.downsample_factor
dataset.iso_value dataset.ignore_label dataset.min_instance_pixels dataset.target_size
dataset.reduced_target_size dataset.depth_size dataset.depth_min dataset.depth_max dataset.occ_truncation_lvl
dataset.truncation_range dataset.enable_3d dataset.enable_mp_occ dataset.depth_scale dataset.num_thing_classes
dataset.train dataset.val dataset.test dataset.augmentation dataset.flip_frustum_mask dataset.skip_bad
dataset.train.base_dir dataset.train.json_path dataset.train.batch_size dataset.train.num_workers
dataset.val.base_dir dataset.test.num_workers
model.mode model.preset model.object_mask_threshold model.overlap_threshold model.backbone.backbone_type
model.backbone.pretrained_model_path model.sem_seg_head.num_classes model.sem_seg_head.common_stride
model.sem_seg_head.transformer_enc_layers model.sem_seg_head.convs_dim model.sem_seg_head.mask_dim
model.sem_seg_head.depth_dim model.sem_seg_head.norm model.mask_former.num_object_queries
model.mask_former.dec_layers model.mask_former.hidden_dim model.mask_former.nheads
model.mask_former.dim_feedforward model.mask_former.transformer_dim_feedforward model.mask_former.dropout
model.mask_former.pre_norm model.mask_former.class_weight model.mask_former.dice_weight
model.mask_former.mask_weight model.mask_former.depth_weight model.mask_former.mp_occ_weight
model.mask_former.train_num_points model.mask_former.oversample_ratio model.mask_former.importance_sample_ratio
model.mask_former.no_object_weight model.mask_former.deep_supervision model.mask_former.size_divisibility
model.frustum3d.truncation model.frustum3d.iso_recon_value model.frustum3d.panoptic_weight
model.frustum3d.completion_weights model.frustum3d.surface_weight model.frustum3d.unet_output_channels
model.frustum3d.unet_features model.frustum3d.use_multi_scale model.frustum3d.grid_dimensions
model.frustum3d.frustum_dims model.projection.voxel_size model.projection.depth_feature_dim
train.num_gpus train.gpu_ids train.num_nodes train.seed train.num_epochs train.checkpoint_interval
train.checkpoint_interval_unit train.validation_interval train.resume_training_checkpoint_path
train.results_dir train.checkpoint_2d train.checkpoint_3d train.freeze train.clip_grad_norm train.precision
train.distributed_strategy train.activation_checkpoint train.is_dry_run train.optim.type
train.optim.monitor_name train.optim.lr train.optim.backbone_multiplier train.optim.momentum
train.optim.weight_decay train.optim.lr_scheduler train.optim.milestones train.optim.gamma
train.optim.max_steps train.optim.warmup_factor train.optim.warmup_iters
evaluate.checkpoint evaluate.num_gpus evaluate.gpu_ids evaluate.results_dir evaluate.batch_size
inference.checkpoint inference.images_dir inference.mode inference.results_dir inference.num_gpus
inference.gpu_ids inference.recursive
export.checkpoint export.onnx_file_2d export.onnx_file_3d export.max_voxels export.opset_version
export.input_width export.input_height export.batch_size export.on_cpu export.results_dir export.format
gen_trt_engine.onnx_file gen_trt_engine.trt_engine gen_trt_engine.tensorrt.data_type
""".split()

# Defaults from the toolkit reference sheet (sections 2.1-2.5), typed in by hand.
SHEET_DEFAULTS = {
    "results_dir": "", "encryption_key": None, "model_name": None, "gpu_ids": [0],
    "dataset.name": "front3d", "dataset.contiguous_id": False, "dataset.label_map": "",
    "dataset.frustum_mask_path": "meta/frustum_mask.npz", "dataset.downsample_factor": 1,
    "dataset.iso_value": 1.0, "dataset.ignore_label": 255, "dataset.min_instance_pixels": 200,
    "dataset.img_format": "RGB", "dataset.target_size": [320, 240], "dataset.reduced_target_size": [160, 120],
    "dataset.depth_size": [120, 160], "dataset.depth_bound": False, "dataset.depth_min": 0.4,
    "dataset.depth_max": 6.0, "dataset.occ_truncation_lvl": [8.0, 6.0], "dataset.truncation_range": [0.0, 12.0],
    "dataset.enable_3d": False, "dataset.enable_mp_occ": True, "dataset.depth_scale": 25.0,
    "dataset.num_thing_classes": 9, "dataset.workers": 8, "dataset.pin_memory": True,
    "dataset.flip_frustum_mask": True, "dataset.skip_bad": False,
    "dataset.train.base_dir": "", "dataset.train.json_path": "", "dataset.train.batch_size": 1,
    "dataset.train.num_workers": 1,
    "dataset.augmentation.train_min_size": [448], "dataset.augmentation.train_max_size": 768,
    "dataset.augmentation.train_crop_size": [240, 240], "dataset.augmentation.test_min_size": 240,
    "dataset.augmentation.test_max_size": 960, "dataset.augmentation.color_aug_ssd": False,
    "dataset.augmentation.enable_crop": False, "dataset.augmentation.crop_size": [240, 240],
    "dataset.augmentation.single_category_max_area": 1.0, "dataset.augmentation.random_flip": "",
    "dataset.augmentation.random_flip_prob": 0.5, "dataset.augmentation.size_divisibility": -1,
    "dataset.augmentation.gen_aug_weight": 0.0,
    "model.preset": "full", "model.mode": "panoptic", "model.object_mask_threshold": 0.4,
    "model.overlap_threshold": 0.5, "model.test_topk_per_image": 100,
    "model.backbone.backbone_type": "vggt", "model.backbone.pretrained_model_path": "",
    "model.sem_seg_head.common_stride": 4, "model.sem_seg_head.transformer_enc_layers": 6,
    "model.sem_seg_head.convs_dim": 256, "model.sem_seg_head.mask_dim": 256, "model.sem_seg_head.depth_dim": 256,
    "model.sem_seg_head.ignore_value": 255, "model.sem_seg_head.num_classes": 13, "model.sem_seg_head.norm": "GN",
    "model.sem_seg_head.in_features": ["res2", "res3", "res4", "res5"],
    "model.sem_seg_head.deformable_transformer_encoder_in_features": ["res3", "res4", "res5"],
    "model.mask_former.dropout": 0.0, "model.mask_former.nheads": 8, "model.mask_former.num_object_queries": 100,
    "model.mask_former.hidden_dim": 256, "model.mask_former.transformer_dim_feedforward": 1024,
    "model.mask_former.dim_feedforward": 2048, "model.mask_former.dec_layers": 10,
    "model.mask_former.pre_norm": False, "model.mask_former.class_weight": 2.0,
    "model.mask_former.dice_weight": 5.0, "model.mask_former.mask_weight": 5.0,
    "model.mask_former.depth_weight": 5.0, "model.mask_former.mp_occ_weight": 5.0,
    "model.mask_former.train_num_points": 12544, "model.mask_former.oversample_ratio": 3.0,
    "model.mask_former.importance_sample_ratio": 0.75, "model.mask_former.deep_supervision": True,
    "model.mask_former.no_object_weight": 0.1, "model.mask_former.size_divisibility": 32,
    "model.frustum3d.truncation": 3.0, "model.frustum3d.iso_recon_value": 2.0,
    "model.frustum3d.panoptic_weight": 25.0, "model.frustum3d.completion_weights": [50.0, 25.0, 10.0],
    "model.frustum3d.surface_weight": 5.0, "model.frustum3d.unet_output_channels": 16,
    "model.frustum3d.unet_features": 16, "model.frustum3d.use_multi_scale": False,
    "model.frustum3d.grid_dimensions": 256, "model.frustum3d.frustum_dims": 256,
    "model.frustum3d.signed_channel": 3,
    "model.projection.voxel_size": 0.03, "model.projection.sign_channel": True,
    "model.projection.depth_feature_dim": 256,
    "train.num_gpus": 1, "train.num_nodes": 1, "train.seed": 1234, "train.cudnn.benchmark": False,
    "train.cudnn.deterministic": True, "train.num_epochs": 10, "train.checkpoint_interval": 1,
    "train.checkpoint_interval_unit": "epoch", "train.validation_interval": 1,
    "train.resume_training_checkpoint_path": None, "train.checkpoint_2d": "", "train.checkpoint_3d": "",
    "train.val_check_interval": 5, "train.freeze": [], "train.clip_grad_norm": 0.1,
    "train.clip_grad_norm_type": 2.0, "train.clip_grad_type": "full", "train.is_dry_run": False,
    "train.precision": "fp32", "train.distributed_strategy": "ddp", "train.activation_checkpoint": True,
    "train.verbose": False, "train.iters_per_epoch": None,
    "train.optim.type": "AdamW", "train.optim.monitor_name": "val_loss", "train.optim.lr": 2e-4,
    "train.optim.backbone_multiplier": 0.1, "train.optim.momentum": 0.9, "train.optim.weight_decay": 0.05,
    "train.optim.lr_scheduler": "MultiStep", "train.optim.milestones": [88, 96], "train.optim.gamma": 0.1,
    "train.optim.max_steps": 160000, "train.optim.warmup_factor": 1.0, "train.optim.warmup_iters": 0,
    "evaluate.num_gpus": 1, "evaluate.gpu_ids": [0], "evaluate.checkpoint": "", "evaluate.batch_size": -1,
    "inference.num_gpus": 1, "inference.gpu_ids": [0], "inference.checkpoint": "", "inference.mode": "panoptic",
    "inference.trt_engine": "", "inference.images_dir": "", "inference.recursive": False,
    "export.gpu_id": 0, "export.on_cpu": False, "export.input_channel": 3, "export.input_width": 960,
    "export.input_height": 544, "export.opset_version": 17, "export.batch_size": -1, "export.verbose": False,
    "export.format": "onnx", "export.onnx_file_2d": "", "export.onnx_file_3d": "", "export.max_voxels": 700000,
    "gen_trt_engine.batch_size": -1, "gen_trt_engine.tensorrt.data_type": "FP32",
    "gen_trt_engine.tensorrt.workspace_size": 1024, "gen_trt_engine.tensorrt.min_batch_size": 1,
    "gen_trt_engine.tensorrt.opt_batch_size": 1, "gen_trt_engine.tensorrt.max_batch_size": 1,
}


def _get(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_every_issue_key_exists():
    keys = {key for key, _ in iter_spec_keys()}
    missing = [k for k in ISSUE_KEYS if k not in keys]
    assert missing == []


def test_defaults_match_toolkit_sheet():
    dumped = ExperimentSpec().model_dump(mode="json")
    wrong = {k: (_get(dumped, k), v) for k, v in SHEET_DEFAULTS.items() if _get(dumped, k) != v}
    assert wrong == {}


def test_empty_file_and_empty_sections_mean_defaults(tmp_path):
    assert load_spec(_write(tmp_path, "")) == ExperimentSpec()
    assert load_spec(_write(tmp_path, "train:\nmodel:\n  mask_former:\n")) == ExperimentSpec()


def test_file_then_overrides(tmp_path):
    path = _write(tmp_path, "train:\n  num_epochs: 5\n  optim:\n    lr: 0.001\n    gamma: 0.5\n")
    spec = load_spec(path, ["train.num_epochs=3", "train.optim.milestones=[10, 20]", "dataset.name=synthetic",
                            "train.optim={lr: 0.01}", "model_name=null", "encryption_key="])
    assert spec.train.num_epochs == 3  # override wins over the file
    assert spec.train.optim.milestones == [10, 20]
    assert spec.train.optim.lr == 0.01
    assert spec.train.optim.gamma == 0.5  # mapping override merges, keeps file keys
    assert spec.dataset.name == "synthetic"
    assert spec.model_name is None
    assert spec.encryption_key == ""


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("train.optim.lr_scheduler=warmuppoly", "train.optim.lr_scheduler", "WarmupPoly"),
        ("train.optim.lr_scheduler=MULTISTEP", "train.optim.lr_scheduler", "MultiStep"),
        ("train.optim.type=sgd", "train.optim.type", "SGD"),
        ("gen_trt_engine.tensorrt.data_type=fp16", "gen_trt_engine.tensorrt.data_type", "FP16"),
        ("train.optim.lr=1e-4", "train.optim.lr", 1e-4),  # YAML 1.1 reads 1e-4 as a string
    ],
)
def test_normalised_values(override, key, expected):
    spec = load_spec(None, [override])
    assert _get(spec.model_dump(mode="json"), key) == expected


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.mode=foo", "model.mode"),
        ("inference.mode=depth", "inference.mode"),
        ("train.precision=fp8", "train.precision"),
        ("train.distributed_strategy=deepspeed", "train.distributed_strategy"),
        ("dataset.name=scannet", "dataset.name"),
        ("train.optim.lr_scheduler=cosine", "train.optim.lr_scheduler"),
        ("export.format=tflite", "export.format"),
        ("train.num_epochs=0", "train.num_epochs"),
        ("dataset.train.batch_size=0", "dataset.train.batch_size"),
        ("model.object_mask_threshold=1.5", "model.object_mask_threshold"),
        ("model.overlap_threshold=-0.1", "model.overlap_threshold"),
        ("train.optim.lr=0", "train.optim.lr"),
        ("dataset.target_size=[320]", "dataset.target_size"),
        ("gpu_ids=[-1]", "gpu_ids[0]"),
        ("train.num_epochs=abc", "train.num_epochs"),
        ("dataset.enable_3d=maybe", "dataset.enable_3d"),
        ("dataset.label_map=5", "dataset.label_map"),
        ("dataset.depth_min=7", "depth_min"),
        ("model.mask_former.nheads=7", "nheads"),
        ("train.optim.milestones=[5,3]", "milestones"),
        ("evaluate.batch_size=0", "evaluate.batch_size"),
        ("inference.outputs=[volumes,cloud]", "inference.outputs[1]"),
        ("inference.outputs=[]", "inference.outputs"),
        ("gen_trt_engine.tensorrt.max_batch_size=0", "gen_trt_engine.tensorrt.max_batch_size"),
    ],
)
def test_invalid_values_name_the_key(override, needle):
    with pytest.raises(SpecError) as info:
        load_spec(None, [override])
    message = str(info.value)
    assert needle in message
    assert f"override '{override}'" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("trian:\n  num_epochs: 3\n", "unknown key 'trian' (did you mean 'train'?)"),
        ("train:\n  num_epoch: 3\n", "unknown key 'train.num_epoch' (did you mean 'train.num_epochs'?)"),
        ("train:\n  optim:\n    lrr: 0.1\n", "unknown key 'train.optim.lrr' (did you mean 'train.optim.lr'?)"),
        ("dataset:\n  batch_size: 2\n", "unknown key 'dataset.batch_size' (did you mean 'dataset.train.batch_size'?)"),
        ("model:\n  backbone:\n    pretrained_path: x\n",
         "unknown key 'model.backbone.pretrained_path' (did you mean 'model.backbone.pretrained_model_path'?)"),
    ],
)
def test_unknown_keys_in_file_suggest_closest(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_key_in_override_names_override():
    with pytest.raises(SpecError, match=r"override 'train\.optim\.lr_schedular=x'.*did you mean 'train\.optim\.lr_scheduler'"):
        load_spec(None, ["train.optim.lr_schedular=x"])
    with pytest.raises(SpecError, match="unknown key 'zzzz'"):
        load_spec(None, ["zzzz=1"])


def test_unknown_key_reported_before_other_errors(tmp_path):
    path = _write(tmp_path, "model:\n  mode: bad\ntrain:\n  num_epoch: 3\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "train.num_epoch'" in str(info.value)
    assert "+1 more" in str(info.value)
    assert len(info.value.details) == 2


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("train: [1, 2\n", "YAML syntax error"),
        ("train:\n  num_epochs: 1\n  num_epochs: 2\n", "duplicate key 'num_epochs'"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("train: 5\n", "train: expected a section"),
    ],
)
def test_bad_yaml_files(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_error_has_line_number(tmp_path):
    path = _write(tmp_path, "train:\n  num_epochs: 3\n  optim: {lr: 0.1\n")
    with pytest.raises(SpecError, match=r"spec\.yaml:\d+:\d+: YAML syntax error"):
        load_spec(path)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecFileNotFoundError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecFileNotFoundError, match="not a file"):
        load_spec(tmp_path)


@pytest.mark.parametrize("bad", ["train.num_epochs", "=3", "train..x=1", "train.num epochs=1", "k=[1,"])
def test_malformed_overrides(bad):
    with pytest.raises(OverrideError, match="malformed override"):
        load_spec(None, [bad])


def test_override_below_a_value_is_rejected():
    with pytest.raises(OverrideError, match="'dataset.name' is a value, not a section"):
        load_spec(None, ["dataset.name.x=1"])


def test_parse_override_yaml_types():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=[1, 2.5]") == (["a"], [1, 2.5])
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=x=y") == (["a"], "x=y")
    assert parse_override("a=") == (["a"], "")
    assert parse_override("a=null") == (["a"], None)


def test_apply_overrides_does_not_mutate_input():
    data = {"train": {"num_epochs": 5}}
    out = apply_overrides(data, ["train.num_epochs=3", "dataset.train.batch_size=2"])
    assert data == {"train": {"num_epochs": 5}}
    assert out == {"train": {"num_epochs": 3}, "dataset": {"train": {"batch_size": 2}}}


def test_suggest_key():
    assert suggest_key(("train", "optim", "weight_decy")) == "train.optim.weight_decay"
    assert suggest_key(("num_epochs",)) == "train.num_epochs"
    assert suggest_key(("qqqqqq",)) is None


def test_resolve_results_dir():
    spec = load_spec(None, ["results_dir=/tmp/exp"])
    assert resolve_results_dir(spec, "train") == Path("/tmp/exp/train")
    assert resolve_results_dir(spec, "gen_trt_engine") == Path("/tmp/exp/gen_trt_engine")
    spec = load_spec(None, ["results_dir=/tmp/exp", "evaluate.results_dir=/tmp/eval"])
    assert resolve_results_dir(spec, "evaluate") == Path("/tmp/eval")
    assert resolve_results_dir(ExperimentSpec(), "export") == Path("results/export")
    assert resolve_results_dir(spec, "demo") == Path("/tmp/exp/demo")


def test_dump_spec_round_trips(tmp_path):
    spec = load_spec(None, ["train.num_epochs=3", "dataset.name=matterport", "train.optim.lr_scheduler=warmuppoly",
                            "train.resume_training_checkpoint_path=/x/y.pth"])
    text = dump_spec(spec, tmp_path / "experiment.yaml")
    assert (tmp_path / "experiment.yaml").read_text() == text
    assert yaml.safe_load(text)["train"]["num_epochs"] == 3
    assert load_spec(tmp_path / "experiment.yaml") == spec
    assert [p.name for p in tmp_path.iterdir()] == ["experiment.yaml"]  # no temp files left


def test_assignment_is_validated():
    spec = ExperimentSpec()
    with pytest.raises(ValueError):
        spec.train.num_epochs = 0


def test_tiny_preset_fills_unset_keys_and_round_trips(tmp_path):
    spec = load_spec(None, ["model.preset=tiny", "model.mask_former.hidden_dim=48"])
    assert spec.model.mask_former.hidden_dim == 48  # explicit key wins over the preset
    assert spec.model.mask_former.nheads == 4  # preset default (full: 8)
    assert spec.model.sem_seg_head.convs_dim == 32  # preset default (full: 256)
    assert spec.model.frustum3d.unet_features == 16  # keys the preset does not name keep the toolkit default
    dump_spec(spec, tmp_path / "experiment.yaml")
    assert load_spec(tmp_path / "experiment.yaml") == spec  # the written file rebuilds the same network
    full = load_spec(None, [])
    assert (full.model.mask_former.hidden_dim, full.model.mask_former.nheads) == (256, 8)


# A spec in the toolkit's layout (every section of its shipped 2D/3D specs, re-typed in flow style):
# toolkit specs must load unchanged.
TOOLKIT_STYLE_SPEC = """
results_dir: out/
dataset:
  {name: matterport, contiguous_id: True, label_map: "", downsample_factor: 2, frustum_mask_path: "",
   iso_value: 2.0, ignore_label: 255, enable_3d: True, enable_mp_occ: True,
   train: {json_path: "", base_dir: "", batch_size: 1, num_workers: 2},
   val: {json_path: "", base_dir: "", batch_size: 1, num_workers: 2},
   test: {json_path: "", base_dir: "", batch_size: 1, num_workers: 2},
   augmentation: {train_min_size: [240], train_max_size: 960, test_min_size: 240, test_max_size: 960,
                  size_divisibility: -1}}
train:
  {checkpoint_2d: "", checkpoint_3d: "", results_dir: out/, freeze: [], precision: fp32, num_gpus: 1,
   num_nodes: 1, checkpoint_interval_unit: step, checkpoint_interval: 1000, val_check_interval: 1,
   num_epochs: 20, clip_grad_norm: 0.01, clip_grad_norm_type: 2.0, clip_grad_type: full,
   activation_checkpoint: False,
   optim: {type: AdamW, lr: 0.0001, weight_decay: 0.05, lr_scheduler: WarmupPoly, max_steps: 120000,
           warmup_factor: 1.0, warmup_iters: 0, monitor_name: train_loss}}
evaluate: {checkpoint: ""}
inference: {images_dir: "", checkpoint: ""}
model:
  {object_mask_threshold: 0.8, overlap_threshold: 0.8, test_topk_per_image: 100, mode: panoptic,
   backbone: {backbone_type: vggt, pretrained_model_path: ""}, sem_seg_head: {num_classes: 13},
   mask_former: {dropout: 0.0, num_object_queries: 100, deep_supervision: True, no_object_weight: 0.1,
                 class_weight: 2.0, mask_weight: 5.0, dice_weight: 5.0, depth_weight: 5.0, mp_occ_weight: 5.0,
                 size_divisibility: 32},
   frustum3d: {truncation: 3.0, iso_recon_value: 2.0, panoptic_weight: 25.0, completion_weights: [50.0, 25.0, 10.0],
               surface_weight: 10.0, unet_output_channels: 16, unet_features: 16, use_multi_scale: False,
               grid_dimensions: 256, signed_channel: 3, frustum_dims: 256},
   projection: {voxel_size: 0.03, sign_channel: True}}
export:
  {checkpoint: "", onnx_file_2d: "", onnx_file_3d: "", max_voxels: 700000, on_cpu: False, input_channel: 3,
   input_width: 320, input_height: 240, opset_version: 17, batch_size: 1, verbose: False}
wandb: {enable: true, name: run3d, tags: ["training", "3d"]}
"""


def test_toolkit_style_spec_loads(tmp_path):
    spec = load_spec(_write(tmp_path, TOOLKIT_STYLE_SPEC))
    assert spec.dataset.name == "matterport" and spec.dataset.downsample_factor == 2
    assert spec.train.optim.lr_scheduler == "WarmupPoly" and spec.train.optim.max_steps == 120000
    assert spec.model.frustum3d.surface_weight == 10.0
    assert (spec.export.input_width, spec.export.input_height) == (320, 240)
    assert resolve_results_dir(spec, "train") == Path("out")
    assert resolve_results_dir(spec, "evaluate") == Path("out/evaluate")


def test_depth_loss_form_reaches_the_2d_criterion() -> None:
    """``model.mask_former.depth_loss`` (default: the toolkit's l1) is the 2D criterion's depth term; another
    value is a one-line spec error naming the key."""
    from nvp3d.config.loading import validate_spec
    from nvp3d.training.losses import build_criterion

    assert build_criterion(validate_spec({}), 2, True).depth_loss == "l1"
    spec = validate_spec({"model": {"mask_former": {"depth_loss": "log_l1"}}})
    assert build_criterion(spec, 2, True).depth_loss == "log_l1"
    with pytest.raises(SpecError, match="depth_loss"):
        validate_spec({"model": {"mask_former": {"depth_loss": "l2"}}})
