"""``build_trainer``: a Lightning ``Trainer`` from the spec's ``train`` section.

Devices: ``train.num_gpus`` processes on ``train.gpu_ids`` (CUDA), or, on a machine without CUDA, the same
number of CPU processes (gloo) so multi-process runs can be tested anywhere; ``num_nodes`` passes through.
More than one process uses DDP with ``find_unused_parameters = not activation_checkpoint`` (the toolkit's
rule) and, on GPUs, synchronised BatchNorm (the 2D head's occupancy and depth-projector BatchNorms then see
the global batch, so 2 GPUs x batch 1 trains like 1 GPU x batch 2). Precision ``fp32`` -> "32-true",
``bf16`` -> "bf16-mixed". Loggers: CSV and TensorBoard under ``<results_dir>/lightning_logs``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy

from nvp3d.data.sampler import LoaderPosition
from nvp3d.distributed import launch_plan
from nvp3d.errors import SpecError
from nvp3d.training.checkpointing import LATEST_NAME_2D, PeriodicCheckpoint
from nvp3d.training.monitors import PeakGpuMemory, Throughput
from nvp3d.training.nonfinite import NonFiniteGuard
from nvp3d.training.seeding import StepSeed
from nvp3d.training.signals import GracefulStop
from nvp3d.training.step_limit import StepLimit
from nvp3d.training.weight_ema import WeightEMA

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}


def lightning_precision(precision: str) -> str:
    """Lightning precision string of ``train.precision``."""
    if precision == "fp16":
        raise SpecError("train.precision=fp16 is not supported (fp16 training of this model is unstable); "
                         "use bf16 or fp32")
    if precision not in PRECISIONS:
        raise SpecError(f"train.precision={precision!r} is not supported; use fp32 or bf16")
    return PRECISIONS[precision]


def device_setup(num_gpus: int, gpu_ids: list[int], num_nodes: int, activation_checkpoint: bool = True,
                 cuda: bool | None = None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``accelerator``, ``devices``, ``num_nodes`` and ``strategy`` keyword arguments for the Trainer.

    The per-node process count and the node count come from :func:`nvp3d.distributed.launch_plan` (the
    spec, overridden by a torchrun / SLURM / ``NUM_GPU_PER_NODE`` + ``WORLD_SIZE`` environment).
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    plan = launch_plan(num_gpus, num_nodes, env)
    for note in plan.notes:  # the launcher overrides the spec: say so
        log.warning(note)
    procs = plan.devices_per_node
    if cuda and num_gpus > 0:
        ids = list(gpu_ids)
        devices: Any = ids if len(ids) == procs else procs
        accelerator = "gpu"
    else:
        devices, accelerator = procs, "cpu"
    kwargs: dict[str, Any] = {"accelerator": accelerator, "devices": devices, "num_nodes": plan.num_nodes}
    if plan.world_size > 1:
        kwargs["strategy"] = DDPStrategy(
            find_unused_parameters=not activation_checkpoint,
            process_group_backend="nccl" if accelerator == "gpu" else "gloo",
        )
    else:
        kwargs["strategy"] = "auto"
    return kwargs


def build_trainer(spec: Any, results_dir: str | Path, extra_callbacks: list[Callback] | None = None,
                  latest_name: str = LATEST_NAME_2D, enable_progress_bar: bool = True, validate: bool = True
                  ) -> pl.Trainer:
    """The training ``Trainer`` (checkpointing, exact-resume helpers, loggers, progress bar); ``validate=False``
    turns validation off (no ``dataset.val``)."""
    # frozen parts (the 2D network in the 3D stage, a frozen aggregator) are in eval mode on purpose
    # (nvp3d.training.eval_hooks): Lightning's notice about it would only alarm users
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    t = spec.train
    results = Path(results_dir)
    if t.distributed_strategy == "fsdp":
        log.warning("train.distributed_strategy=fsdp is not implemented; using DDP")
    dev = device_setup(t.num_gpus, list(t.gpu_ids), t.num_nodes, t.activation_checkpoint)
    callbacks: list[Callback] = [
        StepSeed(t.seed), LoaderPosition(), PeakGpuMemory(), Throughput(),
        PeriodicCheckpoint(results, t.checkpoint_interval, t.checkpoint_interval_unit, latest_name,
                           keep=t.keep_checkpoints),
        NonFiniteGuard(t.optim.lr, t.skip_nonfinite_steps), GracefulStop(),
        StepLimit(t.optim.max_steps),  # train.optim.max_steps under every scheduler
        *(extra_callbacks or []),
    ]
    if t.ema_decay > 0:
        callbacks.append(WeightEMA(t.ema_decay))
    if enable_progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    clip = float(t.clip_grad_norm)
    return pl.Trainer(
        **dev,
        precision=lightning_precision(t.precision),
        max_epochs=t.num_epochs,
        max_steps=-1,  # StepLimit stops at train.optim.max_steps (a finite value here breaks epoch-end resumes)
        limit_train_batches=t.iters_per_epoch if t.iters_per_epoch else None,
        check_val_every_n_epoch=t.validation_interval,
        limit_val_batches=None if validate else 0,
        num_sanity_val_steps=0,
        gradient_clip_val=clip if clip > 0 else None,
        gradient_clip_algorithm="value" if t.clip_grad_type == "value" else "norm",
        use_distributed_sampler=False,
        # batch statistics over the global batch, so N processes x batch b train like 1 process x batch N*b
        # (torch's SyncBatchNorm runs on GPUs only)
        sync_batchnorm=dev["strategy"] != "auto" and dev["accelerator"] == "gpu",
        fast_dev_run=bool(t.is_dry_run),
        enable_checkpointing=False,
        enable_progress_bar=enable_progress_bar,
        enable_model_summary=False,
        default_root_dir=str(results),
        logger=[CSVLogger(str(results), name="lightning_logs"), TensorBoardLogger(str(results), name="lightning_logs")],
        callbacks=callbacks,
        log_every_n_steps=1,
    )
