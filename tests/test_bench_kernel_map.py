"""Smoke test of ``tools/bench_kernel_map.py`` (CPU, small scene): both builders are timed and agree on the
pair count, batch copies double it, and the row says which builder ``auto`` picks."""

from __future__ import annotations

import importlib
from pathlib import Path


def test_bench_kernel_map_rows(repo_root: Path, monkeypatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    tool = importlib.import_module("bench_kernel_map")
    assert tool.main(["--voxels", "20000", "--batches", "1", "2", "--repeats", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 2") or line.startswith("| 1")]
    assert len(rows) == 4
    table = {(int(r[1]), r[2].strip()): r for r in rows}
    for layer in ("subm k3", "k4 s2"):
        one, two = table[(1, layer)], table[(2, layer)]
        assert int(two[8]) == 2 * int(one[8]) > 0  # the same frame twice: twice the pairs
        assert int(two[6]) == 2 * int(one[6])  # the index grid spans both items
        assert one[7].strip() == two[7].strip() == "grid"
        assert float(one[3]) > 0 and float(one[4]) > 0
