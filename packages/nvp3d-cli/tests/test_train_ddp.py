"""A 2-process DDP training run on CPU (gloo): both ranks train, rank 0 alone writes checkpoints/status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from nvp3d.run_demo import generate_demo_data
from nvp3d.status import read_status

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import pytorch_lightning as pl
    from nvp3d.run_demo import demo_spec
    from nvp3d.run_train import train
    from nvp3d.status import StatusLogger

    class Seen(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            path = os.path.join(sys.argv[2], f"rank{trainer.global_rank}_of_{trainer.world_size}.json")
            with open(path, "w") as fh:
                json.dump({"step": trainer.global_step, "strategy": type(trainer.strategy).__name__}, fh)

    spec = demo_spec(sys.argv[1], sys.argv[2], image_size=(64, 48), voxel_size=0.24, epochs=2, batch_size=1,
                     num_gpus=2, min_instance_pixels=8, checkpoint_interval=1)
    spec.model.mask_former.train_num_points = 128
    spec.train.validation_interval = 2
    status = StatusLogger(os.path.join(sys.argv[2], "train", "status.json"))
    train(spec, os.path.join(sys.argv[2], "train"), status, say=lambda *a: None, enable_progress_bar=False,
          callbacks=[Seen()])
    """
)


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path_factory, tmp_path: Path) -> None:
    data = tmp_path_factory.getbasetemp() / "nvp3d_synth_64x48"
    generate_demo_data(data, scenes=2, frames_per_scene=2, grid=32, image_size=(64, 48), seed=3)
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, str(script), str(data), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = sorted(p.name for p in tmp_path.glob("rank*_of_2.json"))
    assert seen == ["rank0_of_2.json", "rank1_of_2.json"]
    steps = {json.loads((tmp_path / n).read_text())["step"] for n in seen}
    assert steps == {4}  # 4 frames / (2 ranks x batch 1) = 2 steps per epoch, 2 epochs
    assert json.loads((tmp_path / seen[0]).read_text())["strategy"] == "DDPStrategy"
    names = sorted(p.name for p in (tmp_path / "train").glob("model_epoch_*.pth"))
    assert names == ["model_epoch_000_step_00002.pth", "model_epoch_001_step_00004.pth"]
    epochs = [r["epoch"] for r in read_status(tmp_path / "train" / "status.json") if "epoch" in r]
    assert epochs == [0, 1]  # rank 0 only
