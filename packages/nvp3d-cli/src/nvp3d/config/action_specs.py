"""Sections of the non-training actions: ``evaluate``, ``inference``, ``export``, ``gen_trt_engine``
(reference sheet section 2.5), and the optional ``wandb`` logger section."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field, field_validator, model_validator

from nvp3d.config.base import GpuIds, StrictModel, ci_enum
from nvp3d.config.model_spec import PanopticMode

#: one kind of file ``nvp3d inference`` writes per image (the same names, in the same order, as
#: :data:`nvp3d.inference.writers.OUTPUT_KINDS`, which the writers use without importing the spec)
OutputKind = Literal["semantic", "panoptic", "depth", "volumes", "mesh", "preview"]

BatchSize = Annotated[int, Field(ge=-1, description="Batch size (-1 = from the dataset split / dynamic).")]


def _no_zero_batch(value: int, key: str) -> None:
    if value == 0:
        raise ValueError(f"{key} must be -1 (automatic) or a positive number, got 0")


class EvaluateSpec(StrictModel):
    """Evaluation on ``dataset.test``."""

    checkpoint: str = Field("", description="Checkpoint to evaluate.")
    trt_engine: str = Field("", description="TensorRT engine to evaluate instead of a checkpoint.")
    num_gpus: int = Field(1, ge=0, description="GPUs to use (0 = CPU).")
    gpu_ids: GpuIds = Field(default_factory=lambda: [0], description="GPU indices to use.")
    results_dir: str | None = Field(None, description="Output folder (default: <results_dir>/evaluate).")
    batch_size: BatchSize = -1

    @model_validator(mode="after")
    def _batch(self) -> EvaluateSpec:
        _no_zero_batch(self.batch_size, "batch_size")
        return self


class InferenceSpec(StrictModel):
    """Prediction on a folder of images."""

    checkpoint: str = Field("", description="Checkpoint to run.")
    trt_engine: str = Field("", description="TensorRT engine (declared by the toolkit, unused).")
    images_dir: str = Field(
        "", description="Folder of *.jpg / *.png images to reconstruct; ours: also an s3:// (gs://, any fsspec) URL, "
        "mirrored into the dataset cache (NVP3D_CACHE) first.")
    recursive: bool = Field(False, description="Also scan sub-folders of images_dir (toolkit: top level only).")
    mode: PanopticMode = Field("panoptic", description="Output mode (panoptic, instance or semantic); unset = model.mode.")
    intrinsic: Annotated[list[Annotated[float, Field(gt=0.0)]], Field(max_length=6)] = Field(
        default_factory=list,
        description="Camera of the images: [fx, fy, cx, cy, width, height] in pixels of a width x height image; "
                    "empty = images_dir/camera.json, else the dataset's meta/camera.json, else 3D-FRONT",
    )
    num_gpus: int = Field(1, ge=0, description="GPUs to use (0 = CPU).")
    gpu_ids: GpuIds = Field(default_factory=lambda: [0], description="GPU indices to use.")
    results_dir: str | None = Field(None, description="Output folder (default: <results_dir>/inference).")
    batch_size: int = Field(1, ge=1, description="Images per forward pass (the last batch may be smaller).")
    outputs: Annotated[list[OutputKind], Field(min_length=1)] = Field(
        default_factory=lambda: list(get_args(OutputKind)),
        description="Ours: the files written per image: semantic, panoptic, depth (2D PNGs), volumes "
                    "(_panoptic3d.npz), mesh (.ply), preview (_preview.png). On a 256^3 grid volumes, mesh and preview "
                    "cost about half to one CPU second each per image, so a folder run that needs only some of them "
                    "goes faster without the others. 2D kinds only: the 3D stage is skipped (no lifting, 3D decoder or "
                    "fusion) and a 2D-stage checkpoint is enough.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="Arithmetic of the network: fp32, or bf16 autocast (faster on GPUs with bf16).")
    write_workers: int = Field(
        4, ge=0, description="Threads writing the output files while the network runs the next batch "
                             "(0 = write in the main thread).")
    write_processes: bool | None = Field(
        None, description="Ours: the write_workers are processes, not threads, so that writing does not compete "
                          "with the thread that launches the GPU work for the interpreter lock. null (default): "
                          "processes when the network runs on CUDA (one H200, 64 images, bf16 batch 4, 8 writers: "
                          "1.76 against 1.22 images/s), threads on CPU (a process starts in seconds). Each image's "
                          "volumes travel through a temporary file in /dev/shm (or the temp folder).")
    allow_tf32: bool = Field(
        True, description="Ours: with precision fp32, matrix products (and the fp32 sparse convolutions) on TF32 "
        "tensor cores on CUDA, as train.allow_tf32 (cuDNN convolutions use TF32 by default already): faster fp32 "
        "inference on Ampere and later GPUs, with 10-bit mantissa products. false: exact fp32.")
    cuda_graphs: bool = Field(
        True, description="On CUDA, replay the 2D network and the 3D decoder's dense levels from CUDA graphs "
                          "captured once per input size (same outputs, fewer kernel launches); no effect on CPU.")
    compile_2d: bool = Field(
        False, description="Ours: with cuda_graphs on CUDA, torch.compile the 2D network's parts (transformer "
                           "blocks, depth head, MaskFormer head) before capturing its graph, so the replay runs "
                           "fused kernels (one H200, bf16, 320x240: 31.8 -> 20.6 ms per batch-1 forward of the "
                           "2D network) at the cost of about a minute of compilation per input size on first use; "
                           "outputs move by about bf16 rounding. Needs Triton (Linux, CUDA). No effect on CPU.")
    overlap_2d: bool = Field(
        True, description="Ours: on CUDA, run the 2D network of the next batch on a second CUDA stream while this "
                          "batch's 3D part (bound by the host: pruning, kernel maps, fusion) runs, so a folder of "
                          "images goes through faster; each image's outputs are those of a run without it. No "
                          "effect on CPU or for a single image.")

    @field_validator("outputs")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))  # a kind named twice is written once

    @field_validator("intrinsic")
    @classmethod
    def _six_numbers(cls, value: list[float]) -> list[float]:
        if value and len(value) != 6:
            raise ValueError(f"needs 6 numbers [fx, fy, cx, cy, width, height] (or none), got {len(value)}")
        return value


class ExportSpec(StrictModel):
    """Export of the trained network to ONNX (and optionally a TensorRT engine)."""

    checkpoint: str = Field("", description="Checkpoint to export.")
    format: Literal["onnx", "tensorrt"] = Field("onnx", description="Export format.")
    onnx_file: str = Field("", description="Output ONNX file (toolkit ExportConfig key).")
    onnx_file_2d: str = Field("", description="Output ONNX file of the 2D stage.")
    onnx_file_3d: str = Field("", description="Output ONNX file of the 3D stage.")
    max_voxels: int = Field(700000, ge=1, description="Upper bound of sparse voxels for the 3D export.")
    opset_version: int = Field(17, ge=11, le=23, description="ONNX opset.")
    input_channel: Literal[3] = Field(3, description="Input channels (RGB).")
    input_width: int = Field(960, ge=1, description="Export input width (the shipped specs use 320).")
    input_height: int = Field(544, ge=1, description="Export input height (the shipped specs use 240).")
    batch_size: BatchSize = -1
    gpu_id: int = Field(0, ge=0, description="GPU used for export.")
    on_cpu: bool = Field(False, description="Export on the CPU.")
    verbose: bool = Field(False, description="Verbose exporter output.")
    results_dir: str | None = Field(None, description="Output folder (default: <results_dir>/export).")

    @model_validator(mode="after")
    def _batch(self) -> ExportSpec:
        _no_zero_batch(self.batch_size, "batch_size")
        return self


class TensorRTSpec(StrictModel):
    """TensorRT builder settings."""

    data_type: ci_enum("FP32", "FP16") = Field("FP32", description="Engine precision (FP32 or FP16).")
    workspace_size: int = Field(1024, ge=1, description="Builder workspace in MiB.")
    min_batch_size: int = Field(1, ge=1, description="Optimisation profile: min batch.")
    opt_batch_size: int = Field(1, ge=1, description="Optimisation profile: optimal batch.")
    max_batch_size: int = Field(1, ge=1, description="Optimisation profile: max batch.")
    layers_precision: list[str] = Field(default_factory=list, description="Per-layer precision overrides.")

    @model_validator(mode="after")
    def _profile_ordered(self) -> TensorRTSpec:
        if not self.min_batch_size <= self.opt_batch_size <= self.max_batch_size:
            raise ValueError(
                "need min_batch_size <= opt_batch_size <= max_batch_size, got "
                f"{self.min_batch_size}/{self.opt_batch_size}/{self.max_batch_size}"
            )
        return self


class GenTrtEngineSpec(StrictModel):
    """Build a TensorRT engine from an exported ONNX file."""

    onnx_file: str = Field("", description="Input ONNX file.")
    trt_engine: str = Field("", description="Output engine file.")
    timing_cache: str = Field("", description="TensorRT timing cache file.")
    batch_size: BatchSize = -1
    gpu_id: int = Field(0, ge=0, description="GPU used to build the engine.")
    verbose: bool = Field(False, description="Verbose builder output.")
    results_dir: str | None = Field(None, description="Output folder (default: <results_dir>/gen_trt_engine).")
    tensorrt: TensorRTSpec = Field(default_factory=TensorRTSpec, description="Builder settings.")

    @model_validator(mode="after")
    def _batch(self) -> GenTrtEngineSpec:
        _no_zero_batch(self.batch_size, "batch_size")
        return self


class WandbSpec(StrictModel):
    """Weights & Biases logging (accepted for toolkit compatibility; nvp3d does not log to W&B yet)."""

    enable: bool = Field(False, description="Log to Weights & Biases.")
    project: str = Field("TAO Toolkit", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity.")
    name: str = Field("", description="Run name.")
    tags: list[str] = Field(default_factory=list, description="Run tags.")
