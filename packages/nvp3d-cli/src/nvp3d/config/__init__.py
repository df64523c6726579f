"""Experiment spec of nvp3d: pydantic v2 models with the NVPanoptix3D toolkit's keys and defaults,
plus loading (YAML + dotted overrides), validation with one-line errors, and output helpers.

Example::

    from nvp3d.config import load_spec, resolve_results_dir
    spec = load_spec("references/spec_template_train.yaml", ["train.num_epochs=3"])
    spec.train.num_epochs                   # 3
    resolve_results_dir(spec, "train")      # Path("results/train")
"""

from nvp3d.config.action_specs import (
    EvaluateSpec,
    ExportSpec,
    GenTrtEngineSpec,
    InferenceSpec,
    TensorRTSpec,
    WandbSpec,
)
from nvp3d.config.dataset_spec import DATASET_NAMES, AugmentationSpec, DatasetSpec, SplitSpec
from nvp3d.config.experiment import ACTION_SECTIONS, SPEC_ACTIONS, TOP_LEVEL_KEYS, ExperimentSpec
from nvp3d.config.loading import (
    apply_overrides,
    describe_error,
    dump_spec,
    iter_spec_keys,
    load_spec,
    parse_override,
    read_spec_file,
    resolve_results_dir,
    spec_to_dict,
    suggest_key,
    validate_spec,
)
from nvp3d.config.model_spec import (
    BackboneSpec,
    Frustum3DSpec,
    MaskFormerSpec,
    ModelSpec,
    ProjectionSpec,
    SemSegHeadSpec,
)
from nvp3d.config.train_spec import LR_SCHEDULERS, CudnnSpec, OptimSpec, TrainSpec

__all__ = [
    "ACTION_SECTIONS",
    "DATASET_NAMES",
    "LR_SCHEDULERS",
    "SPEC_ACTIONS",
    "TOP_LEVEL_KEYS",
    "AugmentationSpec",
    "BackboneSpec",
    "CudnnSpec",
    "DatasetSpec",
    "EvaluateSpec",
    "ExperimentSpec",
    "ExportSpec",
    "Frustum3DSpec",
    "GenTrtEngineSpec",
    "InferenceSpec",
    "MaskFormerSpec",
    "ModelSpec",
    "OptimSpec",
    "ProjectionSpec",
    "SemSegHeadSpec",
    "SplitSpec",
    "TensorRTSpec",
    "TrainSpec",
    "WandbSpec",
    "apply_overrides",
    "describe_error",
    "dump_spec",
    "iter_spec_keys",
    "load_spec",
    "parse_override",
    "read_spec_file",
    "resolve_results_dir",
    "spec_to_dict",
    "suggest_key",
    "validate_spec",
]
