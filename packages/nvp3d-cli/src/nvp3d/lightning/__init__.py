"""Lightning pieces of the 2D stage: module, data module, optimizer/scheduler, checkpoints, status.

    from nvp3d.lightning import NVP3DDataModule, PanopticModule2D, build_trainer
    dm = NVP3DDataModule(spec); dm.setup("fit")
    module = PanopticModule2D(spec, dm.thing_ids, dm.stuff_ids)
    build_trainer(spec, "results/train").fit(module, datamodule=dm)

(``nvp3d.run_train.train`` does exactly this plus weight loading, resume and status.json.)
"""

from nvp3d.lightning.checkpointing import (
    LoaderPosition,
    PeriodicCheckpoint,
    checkpoint_name,
    find_latest_checkpoint,
    latest_pointer_name,
)
from nvp3d.lightning.datamodule import DataSpecError, NVP3DDataModule, dataset_config
from nvp3d.lightning.module import PanopticModule2D, build_criterion, kpis_from_metric, per_class_table
from nvp3d.lightning.optim import WarmupPolyLR, build_optimizer, build_param_groups, build_scheduler
from nvp3d.lightning.sampler import ResumableSampler
from nvp3d.lightning.seeding import StepSeed
from nvp3d.lightning.status_callback import StatusCallback
from nvp3d.lightning.trainer import LATEST_NAME_2D, build_trainer, device_setup, lightning_precision

__all__ = [
    "LATEST_NAME_2D", "DataSpecError", "LoaderPosition", "NVP3DDataModule", "PanopticModule2D", "PeriodicCheckpoint",
    "ResumableSampler", "StatusCallback", "StepSeed", "WarmupPolyLR", "build_criterion", "build_optimizer",
    "build_param_groups", "build_scheduler", "build_trainer", "checkpoint_name", "dataset_config", "device_setup",
    "find_latest_checkpoint", "kpis_from_metric", "latest_pointer_name", "lightning_precision", "per_class_table",
]
