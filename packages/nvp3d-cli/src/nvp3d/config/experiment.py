"""The whole experiment spec (one YAML file drives every action) and which sections each action reads."""

from __future__ import annotations

from pydantic import Field

from nvp3d.config.action_specs import EvaluateSpec, ExportSpec, GenTrtEngineSpec, InferenceSpec, WandbSpec
from nvp3d.config.automl_spec import AutoMLPolicy, AutoMLSpec
from nvp3d.config.base import GpuIds, StrictModel
from nvp3d.config.dataset_spec import DatasetSpec
from nvp3d.config.model_spec import ModelSpec
from nvp3d.config.train_spec import TrainSpec

#: Actions that take a spec (``nvp3d <action> -e spec.yaml``), in pipeline order.
SPEC_ACTIONS: tuple[str, ...] = ("train", "evaluate", "inference", "export", "gen_trt_engine")

#: Top-level keys that are not sections.
TOP_LEVEL_KEYS: tuple[str, ...] = ("results_dir", "encryption_key", "model_name", "gpu_ids", "automl_policy")

#: Sections each action reads (its template and help list these; any valid spec is accepted by all).
ACTION_SECTIONS: dict[str, tuple[str, ...]] = {
    "train": ("dataset", "model", "train", "automl"),
    "evaluate": ("dataset", "model", "evaluate"),
    "inference": ("dataset", "model", "inference"),
    "export": ("dataset", "model", "export"),
    "gen_trt_engine": ("gen_trt_engine",),
}


class ExperimentSpec(StrictModel):
    """Root of the spec: common keys plus one section per stage of the pipeline."""

    results_dir: str = Field(
        "", description="Root output folder; each action writes to <results_dir>/<action> (empty = ./results)."
    )
    encryption_key: str | None = Field(None, description="Toolkit key for encrypted models (unused by nvp3d).")
    model_name: str | None = Field(None, description="Free-form model name recorded with the run.")
    gpu_ids: GpuIds = Field(default_factory=lambda: [0], description="Default GPU indices.")
    automl_policy: AutoMLPolicy = Field("off", description="on: `nvp3d train` runs the AutoML search (automl section).")
    dataset: DatasetSpec = Field(default_factory=DatasetSpec, description="Data.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Network.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Training.")
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec, description="Evaluation.")
    inference: InferenceSpec = Field(default_factory=InferenceSpec, description="Inference.")
    export: ExportSpec = Field(default_factory=ExportSpec, description="Export.")
    gen_trt_engine: GenTrtEngineSpec = Field(default_factory=GenTrtEngineSpec, description="TensorRT build.")
    automl: AutoMLSpec = Field(default_factory=AutoMLSpec, description="AutoML hyper-parameter search.")
    wandb: WandbSpec = Field(default_factory=WandbSpec, description="Weights & Biases (not used yet).")
