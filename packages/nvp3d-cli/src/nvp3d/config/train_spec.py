"""``train`` section: trainer settings and the optimiser (reference sheet section 2.4)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from nvp3d.config.base import GpuIds, StrictModel, ci_enum

LR_SCHEDULERS = ("MultiStep", "WarmupPoly")
OPTIMIZERS = ("AdamW", "SGD")


class OptimSpec(StrictModel):
    """Optimiser and learning-rate schedule."""

    type: ci_enum(*OPTIMIZERS) = Field("AdamW", description="Optimiser: AdamW or SGD (case-insensitive).")
    monitor_name: str = Field("val_loss", description="Metric monitored for checkpoint selection.")
    lr: float = Field(2e-4, gt=0.0, description="Base learning rate.")
    backbone_multiplier: float = Field(0.1, ge=0.0, description="LR factor for parameters of the backbone.")
    momentum: float = Field(0.9, ge=0.0, le=1.0, description="SGD momentum.")
    weight_decay: float = Field(0.05, ge=0.0, description="Weight decay (0 for norm and embedding params).")
    lr_scheduler: ci_enum(*LR_SCHEDULERS) = Field(
        "MultiStep", description="MultiStep (epoch-based) or WarmupPoly (step-based); case-insensitive."
    )
    milestones: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [88, 96], description="MultiStep epochs at which lr is multiplied by gamma."
    )
    gamma: float = Field(0.1, gt=0.0, description="MultiStep decay factor.")
    max_steps: int = Field(160000, ge=1, description="WarmupPoly length in steps (also the trainer's max_steps).")
    warmup_factor: float = Field(1.0, ge=0.0, le=1.0, description="Initial lr factor of the linear warmup.")
    warmup_iters: int = Field(0, ge=0, description="Warmup length in steps.")

    @field_validator("milestones")
    @classmethod
    def _milestones_increase(cls, value: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {value}")
        return value


class CudnnSpec(StrictModel):
    """cuDNN flags."""

    benchmark: bool = Field(False, description="torch.backends.cudnn.benchmark.")
    deterministic: bool = Field(True, description="torch.backends.cudnn.deterministic.")


class TrainSpec(StrictModel):
    """Training run."""

    num_gpus: int = Field(1, ge=0, description="GPUs per node (0 = train on CPU).")
    gpu_ids: GpuIds = Field(default_factory=lambda: [0], description="GPU indices to use.")
    num_nodes: int = Field(1, ge=1, description="Number of nodes.")
    seed: int = Field(1234, ge=0, description="Random seed.")
    cudnn: CudnnSpec = Field(default_factory=CudnnSpec, description="cuDNN flags.")
    num_epochs: int = Field(10, ge=1, description="Training epochs.")
    checkpoint_interval: int = Field(1, ge=1, description="Save a checkpoint every N epochs or steps.")
    checkpoint_interval_unit: Literal["epoch", "step"] = Field(
        "epoch", description="Unit of checkpoint_interval."
    )
    validation_interval: int = Field(1, ge=1, description="Validate every N epochs.")
    val_check_interval: int = Field(5, ge=1, description="Declared by the toolkit, unused.")
    resume_training_checkpoint_path: str | None = Field(
        None, description="Checkpoint to resume from (default: the latest in results_dir)."
    )
    results_dir: str | None = Field(None, description="Output folder (default: <results_dir>/train).")
    checkpoint_2d: str = Field("", description="2D-stage checkpoint loaded for the 3D stage.")
    checkpoint_3d: str = Field("", description="3D-stage weights to initialise the 3D modules.")
    freeze: list[str] = Field(default_factory=list, description=(
        "Module paths (on the model) to freeze: no gradients, and eval mode while training (batch-norm running "
        "statistics and dropout stay fixed)."))
    ema_decay: float = Field(
        0.0, ge=0.0, lt=1.0, description="Ours: keep an exponential moving average of the trained weights with this "
        "decay per optimizer step (e.g. 0.99: about the last 100 steps; 0 = off). Validation, every checkpoint's "
        "state_dict and so evaluate / inference / export / a 3D stage's checkpoint_2d use the average; the trained "
        "weights are kept beside it for an exact resume.")
    clip_grad_norm: float = Field(0.1, ge=0.0, description="Gradient clipping threshold (0 = off).")
    clip_grad_norm_type: float = Field(2.0, gt=0.0, description="p of the clipping norm.")
    clip_grad_type: Literal["full", "norm", "value"] = Field("full", description="Gradient clipping mode.")
    is_dry_run: bool = Field(False, description="Run one batch of train/val and stop (fast_dev_run).")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="Training precision (fp16 is not offered: it is unstable for this model; use bf16).")
    allow_tf32: bool = Field(
        True, description="Ours: fp32 matrix products (and the fp32 sparse convolutions) on TF32 tensor cores on "
        "CUDA (torch.backends.cuda.matmul.allow_tf32, set for the run; cuDNN convolutions use TF32 by default "
        "already): faster fp32 training on Ampere and later GPUs, with 10-bit mantissa products. false: exact fp32.")
    cuda_graphs_2d: bool = Field(
        True, description="Ours: in the 3D stage (training and evaluation) on CUDA, replay the frozen 2D network "
        "from CUDA graphs captured once per batch shape (same outputs, fewer kernel launches: its forward is "
        "bound by them at small batches); no effect in the 2D stage or on CPU.")
    cuda_graphs_train_2d: bool = Field(
        False, description="Ours, experimental (not yet measured on a GPU): in the 2D stage on one CUDA GPU with "
        "fp32 and without activation checkpointing, replay the 2D network's training forward and backward from "
        "CUDA graphs captured once per batch shape (the loss stays eager); the small preset's step is bound by "
        "kernel launches. Other settings train eagerly, as does a run whose capture fails (said once).")
    distributed_strategy: Literal["ddp", "fsdp"] = Field("ddp", description="Multi-GPU strategy.")
    activation_checkpoint: bool = Field(True, description="Recompute activations to save memory.")
    verbose: bool = Field(False, description="Verbose trainer logging.")
    iters_per_epoch: int | None = Field(
        None, ge=1, description="Steps per epoch (default: one pass over the train split). Longer than one pass: the "
        "epoch holds several shuffled passes, which saves the loader's refill at each epoch start on small splits.")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="Optimiser.")
    skip_nonfinite_steps: int = Field(
        0, ge=0, description="Optimizer steps with a non-finite loss or gradient that may be skipped before the run "
        "stops (0 = stop at the first; exit code 5).")
    keep_checkpoints: int = Field(
        3, ge=0, description="Newest model_epoch_*_step_*.pth files kept (plus the latest pointer's; 0 = keep all).")
