"""The CPU-checkable parts of ``tools/bench_sparse_conv.py``: the device busy-time union of the ``kernel`` timing mode
and the per-mode comparison table (the timings themselves need a CUDA GPU)."""

from __future__ import annotations

import importlib
import random
from pathlib import Path

import pytest


@pytest.fixture()
def tool(repo_root: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    return importlib.import_module("bench_sparse_conv")


def test_busy_us_is_the_union_of_intervals(tool) -> None:
    rng = random.Random(3)
    for _ in range(50):
        spans = []
        for _ in range(rng.randrange(0, 12)):
            a = rng.randrange(0, 200)
            spans.append((float(a), float(a + rng.randrange(0, 40))))
        covered = {t for a, b in spans for t in range(int(a), int(b))}  # unit cells [t, t+1) inside some interval
        assert tool.busy_us(spans) == pytest.approx(len(covered))
    assert tool.busy_us([(0.0, 10.0), (2.0, 3.0), (10.0, 12.5)]) == pytest.approx(12.5)


def test_mode_table_reports_every_mode_and_ratio(tool) -> None:
    row = {"n": 307_000, "layer": "k4 s2", "c": 16, "dtype": "bf16", "n_out": 56_991, "spconv_n_out": 96_658}
    for p, ours, theirs in (("fwd", 0.2, 0.25), ("fwdbwd", 1.0, 0.9)):
        for m, scale in (("call", 1.0), ("kernel", 0.5)):
            sfx = tool._suffix(m)
            row[f"triton_{p}{sfx}_ms"], row[f"spconv_{p}{sfx}_ms"] = ours * scale, theirs * scale
            row[f"vs_spconv_{p}{sfx}"] = theirs / ours
    table = tool.markdown({"env": {"timing": ["call", "kernel"]}, "rows": [row]})
    lines = table.splitlines()
    head = next(i for i, line in enumerate(lines) if "fwd kernel: frustum3d / spconv-triton (x)" in line)
    last = lines[head + 2]
    assert "0.100 / 0.125 (1.25)" in last  # fwd, kernel mode
    assert "0.500 / 0.450 (0.90)" in last  # fwd+bwd, kernel mode
    with pytest.raises(ValueError, match="timing mode"):
        tool.time_ms(lambda: None, mode="wall")
