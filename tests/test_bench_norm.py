"""Smoke test of ``tools/bench_norm.py`` (CPU, small sizes): both forms of the batched instance norm are timed
for every (batch, channels, pass) and give the same values."""

from __future__ import annotations

import importlib
from pathlib import Path


def test_bench_norm_rows(repo_root: Path, monkeypatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    tool = importlib.import_module("bench_norm")
    assert tool.main(["--rows", "2000", "--batches", "2", "3", "--channels", "8", "--repeats", "1"]) == 0
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
            if line[:3] in ("| 2", "| 3")]
    assert [(r[0], r[1], r[3]) for r in rows] == [
        ("2", "4000", "forward"), ("2", "4000", "forward+backward"),
        ("3", "6000", "forward"), ("3", "6000", "forward+backward")]
    for r in rows:
        assert float(r[4]) > 0 and float(r[5]) > 0
        assert float(r[7]) < 1e-5  # the gather form and the row-block broadcast agree
