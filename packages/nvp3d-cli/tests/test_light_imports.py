"""The console script's module and the writer processes' modules import no torch: a spawned writer process
imports the main module (``nvp3d.cli``) again and then the writers, and torch plus the network's modules made each
writer process start seconds later (stop 52: 7.8-8.7 s against 1.4-1.6 s for two processes on a 2-core CPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "lightning", "pytorch_lightning", "frustum3d", "maskformer_head", "backbone_vggt")


@pytest.mark.parametrize("modules", [
    ["nvp3d.cli"],
    ["nvp3d.inference.output_queue", "nvp3d.inference.reconstruction", "nvp3d.inference.writers"],
], ids=["console-script", "writer-process"])
def test_module_imports_no_torch(modules: list[str]) -> None:
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            f"print(sorted({{n.split('.')[0] for n in sys.modules}} & set({HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing {modules} pulled in {out.strip()}"


def test_the_package_names_still_resolve() -> None:
    """``from nvp3d.inference import Predictor, Reconstruction, predict`` works, lazily."""
    import nvp3d.inference as inference
    from nvp3d.inference.predictor import Predictor, predict
    from nvp3d.inference.reconstruction import Reconstruction

    assert (inference.Predictor, inference.predict, inference.Reconstruction) == (Predictor, predict, Reconstruction)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        inference.nope  # noqa: B018
