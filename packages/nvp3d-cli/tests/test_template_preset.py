"""A copy of the generated train template works with ``model.preset`` (issue "From template to trained model
without guesswork", bullet 1); a depth width that does not fit the preset is a spec error (exit 2)."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

runner = CliRunner()



def test_template_copy_takes_the_tiny_preset(repo_root, tmp_path, invoke_cli):
    template = repo_root / "references" / "spec_template_train.yaml"
    result = invoke_cli(["train", "-e", str(template), "model.preset=tiny"], tmp_path)
    # the template names no data: the run gets as far as the data (4), past every size check
    assert result.exit_code == 4, result.output
    assert "dataset.train.base_dir is empty" in result.stderr
    resolved = yaml.safe_load((tmp_path / "results" / "train" / "experiment.yaml").read_text())
    assert resolved["model"]["sem_seg_head"]["depth_dim"] == 32
    assert resolved["model"]["mask_former"]["hidden_dim"] == 32


def test_depth_dim_that_misfits_the_preset_is_a_spec_error(repo_root, tmp_path, invoke_cli):
    template = repo_root / "references" / "spec_template_train.yaml"
    result = invoke_cli(["train", "-e", str(template), "model.preset=tiny", "model.sem_seg_head.depth_dim=256"],
                     tmp_path)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "depth_dim=256 must equal the DPT depth-head width 32 of preset 'tiny'" in lines[0]
    assert not (tmp_path / "results").exists()  # refused before anything is written
