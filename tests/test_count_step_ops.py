"""``tools/count_step_ops.py`` (a CPU proxy of a GPU step's host work) runs, and guards the 2D criterion's sync
count: matching a batch copies its costs to the host once per decoder layer (a read, listed apart), the depth loss
needs no sync and, on one process, the target count stays on the host: the 2D criterion makes no other host wait."""

from __future__ import annotations

import importlib
from argparse import Namespace
from pathlib import Path

import pytest
import torch


def test_2d_step_counts_and_criterion_syncs(repo_root: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    tool = importlib.import_module("count_step_ops")
    torch.set_num_threads(1)
    args = Namespace(preset="tiny", batch=2, grid=32, image=(64, 48), checkpoint="")
    counters = tool.count_step("2d", args)
    assert set(counters) == {"forward", "criterion", "backward", "optimizer"}
    assert all(c.total > 0 for c in counters.values())
    assert sum(counters["forward"].syncs.values()) == 0
    # --by func: the same ops grouped by file:function
    by_func = counters["forward"].by_func
    assert sum(by_func.values()) == counters["forward"].total
    assert any(k.startswith("net2d.py:") for k in by_func), by_func.most_common(5)
    assert sum(counters["criterion"].syncs.values()) == 0, counters["criterion"].syncs
    # the matcher's one cost copy per decoder layer (main + 2 auxiliary layers of the tiny head), nothing else
    assert counters["criterion"].host_reads and all("matcher.py" in k for k in counters["criterion"].host_reads)
    assert sum(counters["backward"].syncs.values()) == 0


def test_3d_criterion_syncs_once(repo_root: Path, monkeypatch) -> None:
    """The 3D losses look up dense targets at sparse voxels by clamped indices and take masked means, so the
    whole 3D criterion (frustum3d losses and the 2D matcher it reuses) waits for the device once."""
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    tool = importlib.import_module("count_step_ops")
    torch.set_num_threads(1)
    args = Namespace(preset="tiny", batch=1, grid=32, image=(64, 48), checkpoint="")
    counters = tool.count_step("3d", args)
    assert counters["criterion"].total > 0
    assert sum(counters["criterion"].syncs.values()) <= 1, counters["criterion"].syncs
    assert sum(counters["backward"].syncs.values()) == 0


def test_bench_training_3d_step_runs_on_cpu(repo_root: Path, tmp_path: Path, monkeypatch) -> None:
    """``tools/bench_training.py``'s 3D row (the step ``count_step_ops`` splits into phases, from the same
    ``parts_3d``) runs end to end on a CPU and writes its row: device time is too scarce to find a broken tool."""
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    tool = importlib.import_module("bench_training")
    torch.set_num_threads(1)
    out = tmp_path / "rows.json"
    assert tool.main(["--preset", "tiny", "--grid", "32", "--image", "64x48", "--stages", "3d", "--dtypes", "fp32",
                      "--batches-3d", "2", "--repeats", "1", "--device", "cpu", "--out", str(out)]) == 0
    import json

    rows = json.loads(out.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert [(r["stage"], r["dtype"], r["batch"]) for r in rows] == [("3d", "fp32", 2)]
    assert rows[0]["step_s"] > 0 and rows[0]["samples_per_s"] == pytest.approx(2 / rows[0]["step_s"])


def test_bench_training_2d_rows_with_and_without_training_graphs_on_cpu(repo_root: Path, tmp_path: Path,
                                                                       monkeypatch) -> None:
    """The 2D rows of ``--train-graphs-2d off on`` run on a CPU: both settings give a row per batch, and the CPU
    rows are labelled eager (the training graphs need CUDA)."""
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    tool = importlib.import_module("bench_training")
    torch.set_num_threads(1)
    out = tmp_path / "rows.json"
    assert tool.main(["--preset", "tiny", "--grid", "32", "--image", "64x48", "--stages", "2d", "--dtypes", "fp32",
                      "--batches-2d", "2", "--repeats", "1", "--device", "cpu", "--train-graphs-2d", "off", "on",
                      "--out", str(out)]) == 0
    import json

    rows = json.loads(out.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert [(r["stage"], r["dtype"], r["batch"]) for r in rows] == [("2d", "fp32", 1), ("2d", "fp32", 2)] * 2
    assert all(r["step_s"] > 0 for r in rows)


def test_count_step_ops_cuda_mode_says_when_there_is_no_cuda(repo_root: Path, monkeypatch) -> None:
    """``--device cuda`` on a machine without CUDA stops with one line that says what to do."""
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    tool = importlib.import_module("count_step_ops")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device here; leave --device out"):
        tool.main(["--stage", "3d", "--device", "cuda"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: sync debug mode is a CUDA feature")
def test_count_step_ops_counts_device_syncs_on_cuda(repo_root: Path, monkeypatch) -> None:
    """On CUDA every phase also lists the synchronising calls torch's sync debug mode reports, by project line;
    a blocking host-to-device copy made inside a phase is among them."""
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    tool = importlib.import_module("count_step_ops")
    with tool.DeviceSyncs(torch.device("cuda")) as blocking:
        torch.tensor([1, 2, 3], device="cuda")  # from pageable memory: a blocking copy
    with tool.DeviceSyncs(torch.device("cuda")) as pinned:
        torch.arange(3).pin_memory().to("cuda", non_blocking=True)  # queued, no wait
    assert sum(blocking.calls.values()) >= 1 and sum(pinned.calls.values()) == 0, (blocking.calls, pinned.calls)
    args = Namespace(preset="tiny", batch=2, batch_3d=2, grid=32, image=(64, 48), checkpoint="", device="cuda")
    counters = tool.count_step("3d", args)
    assert all(isinstance(c.device_syncs, dict) for c in counters.values())
    assert sum(counters["forward"].device_syncs.values()) > 0  # the forward reads counts and bounds


def test_inference_forward_is_counted_by_phase(repo_root: Path, monkeypatch) -> None:
    """``--stage infer``: one inference forward split into its five phases; the 2D network dispatches no host
    sync, and the sparse decoder's syncs are listed by their source line (the data behind the 3D speed work)."""
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    tool = importlib.import_module("count_step_ops")
    torch.set_num_threads(1)
    args = Namespace(preset="tiny", batch=1, batch_3d=1, grid=32, image=(64, 48), checkpoint="")
    counters = tool.count_step("infer", args)
    assert list(counters) == ["2d", "plane", "lifting", "decoder", "fusion"]
    assert all(c.total > 0 for c in counters.values())
    assert sum(counters["2d"].syncs.values()) == 0, counters["2d"].syncs
    assert counters["decoder"].syncs and all(" at " in k for k in counters["decoder"].syncs)
