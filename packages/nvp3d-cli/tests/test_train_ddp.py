"""Multi-process runs on CPU (gloo) through the command line, as a user launches them.

- ``nvp3d train`` with ``train.num_gpus: 2`` (Lightning spawns the second rank): both ranks train (the step
  count halves), rank 0 alone writes experiment.yaml, status.json (one STARTED record), checkpoints and the
  console line; the progress log has the throughput monitor.
Multi-process evaluation of trained checkpoints (both stages, torchrun and Lightning spawn) is checked in
test_stage3d_train.py, where trained weights exist.
The GPU (NCCL) runs of both stages are measured by tools/bench_ddp.py (numbers in the nvp3d-cli README).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from nvp3d.config import dump_spec
from nvp3d.config.loading import validate_spec
from nvp3d.demo.run import generate_demo_data
from nvp3d.demo.specs import demo_spec_dict
from nvp3d.status import read_status

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, run_cli) -> dict[str, Path]:
    data = tmp_path_factory.getbasetemp() / "nvp3d_synth_64x48"
    generate_demo_data(data, scenes=2, frames_per_scene=2, grid=32, image_size=(64, 48), seed=3)
    out = tmp_path_factory.mktemp("ddp")
    d = demo_spec_dict(data, out, image_size=(64, 48), voxel_size=0.24, epochs=2, batch_size=1, num_gpus=2,
                       min_instance_pixels=8, checkpoint_interval=1)
    d["model"]["mask_former"] = {"train_num_points": 128}
    d["train"]["validation_interval"] = 2
    spec = out / "spec.yaml"
    dump_spec(validate_spec(d, source="test"), spec)
    proc = run_cli("train", "-e", str(spec))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "stdout": proc.stdout}


def test_two_rank_training_writes_once(trained) -> None:
    train_dir = trained["out"] / "train"
    assert trained["stdout"].count("finished successfully") == 1
    names = sorted(p.name for p in train_dir.glob("model_epoch_*.pth"))
    # 4 frames / (2 ranks x batch 1) = 2 steps per epoch: one process alone would reach steps 4 and 8
    assert names == ["model_epoch_000_step_00002.pth", "model_epoch_001_step_00004.pth"]
    records = read_status(train_dir / "status.json")
    assert [r["status"] for r in records].count("STARTED") == 1
    assert records[-1]["status"] == "SUCCESS"
    assert [r["epoch"] for r in records if "epoch" in r] == [0, 1]
    assert (train_dir / "experiment.yaml").is_file()
    with next(train_dir.glob("lightning_logs/version_*/metrics.csv")).open() as fh:
        rows = list(csv.DictReader(fh))
    rates = [float(r["samples_per_s"]) for r in rows if r.get("samples_per_s")]
    assert len(rates) == 2 and all(r > 0 for r in rates)
