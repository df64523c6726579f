"""``tools/alternate.py`` runs a command with old and new package sources in alternating order, the old ones
first on PYTHONPATH, and reports each run (the order and the sources are what it guarantees)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest


def test_alternating_order_and_old_sources_first(repo_root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    tool = importlib.import_module("alternate")
    assert tool.schedule(3) == ["after", "before", "before", "after", "after", "before"]
    old = tmp_path / "old" / "packages" / "frustum3d" / "src" / "frustum3d"
    old.mkdir(parents=True)
    (old / "__init__.py").write_text('__version__ = "0.0.0-old"\n')
    out = tmp_path / "runs.json"
    code = tool.main(["--before", str(tmp_path / "old"), "--rounds", "2", "--json", str(out), "--",
                      sys.executable, "-c", "import frustum3d; print('version', frustum3d.__version__)"])
    assert code == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["label"] for r in runs] == ["after", "before", "before", "after"]
    for r in runs:
        seen = r["output"].split()[-1]
        assert (seen == "0.0.0-old") == (r["label"] == "before"), r
    assert "== run 3 (after): exit 0" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no packages/<name>/src folder"):
        tool.main(["--before", str(tmp_path), "--", "true"])
