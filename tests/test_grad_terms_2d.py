"""``tools/grad_terms_2d.py`` (per-term gradient norms of the 2D loss) runs on a tiny CPU case, and its numbers
follow the network's wiring: a head that a term does not reach gets a zero gradient from it, and the norm of the
total gradient is at most the sum of the term norms."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch


def test_term_groups_and_wiring(repo_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(repo_root / "tools"))
    tool = importlib.import_module("grad_terms_2d")
    assert [tool.term_group(k) for k in ("loss_ce", "loss_ce_3", "loss_dice_0", "loss_mp_occ", "loss_depth")] == [
        "class", "class", "dice", "mp_occ", "depth"]
    assert tool.term_group("loss_cex") is None and tool.term_group("loss_mask_aux") is None
    torch.set_num_threads(1)
    out = tmp_path / "g.json"
    assert tool.main(["--out", str(tmp_path), "--scenes", "2", "--image", "64x48", "--grid", "32", "--batch", "1",
                      "--batches", "1", "--set2d", "model.preset=tiny", "--json", str(out)]) == 0
    norms = json.loads(out.read_text())["norms"]
    assert set(norms) == {"class", "mask", "dice", "depth", "mp_occ", "total"}
    # only the occupancy term reaches the occupancy head; the depth term reaches only the backbone (DPT head)
    assert norms["mp_occ"]["occupancy_module"] > 0
    assert all(norms[t]["occupancy_module"] == 0 for t in ("class", "mask", "dice", "depth"))
    assert norms["depth"]["backbone"] > 0 and norms["depth"]["all"] == norms["depth"]["backbone"]
    terms = [t for t in norms if t != "total"]
    for part in norms["total"]:
        assert norms["total"][part] <= sum(norms[t][part] for t in terms) * (1 + 1e-9) + 1e-12
