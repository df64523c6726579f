"""Generated schemas/ and references/: committed copies are up to date and parse back into the models."""

from __future__ import annotations

import json

import pytest
import yaml
from nvp3d.cli import app
from nvp3d.config import ACTION_SECTIONS, SPEC_ACTIONS, TOP_LEVEL_KEYS, ExperimentSpec, load_spec
from nvp3d.schema_gen import derived_keys, generated_files
from typer.testing import CliRunner


def test_committed_files_are_up_to_date(repo_root, tmp_path):
    result = CliRunner().invoke(app, ["schema", "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    fresh = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert fresh == sorted(generated_files())
    stale = [rel for rel in fresh if not (repo_root / rel).is_file()
             or (repo_root / rel).read_text() != (tmp_path / rel).read_text()]
    assert stale == [], "regenerate with `uv run nvp3d schema --out-dir .` at the repo root"


@pytest.mark.parametrize("action", SPEC_ACTIONS)
def test_template_parses_back_to_defaults(repo_root, action):
    path = repo_root / "references" / f"spec_template_{action}.yaml"
    text = path.read_text()
    data = yaml.safe_load(text)
    assert list(data) == [*TOP_LEVEL_KEYS, *ACTION_SECTIONS[action]]
    defaults = ExperimentSpec().model_dump(mode="json")
    derived = derived_keys(action)
    # Every key is listed with its default; the keys another source fills (preset, dataset, checkpoint) are
    # listed as comments, so that source can apply (they used to be written out, which blocked model.preset).
    for dotted, default in _leaves(defaults):
        if dotted.split(".")[0] not in data:
            continue
        name = dotted.rsplit(".", 1)[-1]
        if dotted in derived:
            assert _get(data, dotted) is _MISSING, dotted
            assert f"# {name}: " in text, dotted
        else:
            assert _get(data, dotted) == default, dotted
    assert load_spec(path) == ExperimentSpec()


_MISSING = object()


def _leaves(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _get(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def test_train_template_lets_the_preset_apply(repo_root):
    spec = load_spec(repo_root / "references" / "spec_template_train.yaml", ["model.preset=tiny"])
    assert spec.model.sem_seg_head.depth_dim == 32
    assert spec.model.mask_former.hidden_dim == 32
    assert "depth_dim" not in spec.model.sem_seg_head.model_fields_set  # still the preset's, not the user's


@pytest.mark.parametrize("stage", ["2d", "3d"])
def test_synthetic_examples_parse(repo_root, stage):
    spec = load_spec(repo_root / "references" / f"spec_synthetic_{stage}.yaml")
    assert spec.dataset.name == "synthetic"
    assert spec.dataset.enable_3d is (stage == "3d")
    assert spec.model.preset == "tiny"
    assert spec.dataset.train.json_path == "data/synthetic/meta/train.json"
    if stage == "3d":
        assert spec.train.checkpoint_2d.startswith("results/synthetic_2d/train/")


def _resolve(schema: dict, node: dict) -> dict:
    ref = node.get("$ref")
    return schema["$defs"][ref.rsplit("/", 1)[-1]] if ref else node


def _prop(schema: dict, dotted: str) -> dict:
    node = schema
    for part in dotted.split("."):
        node = _resolve(schema, node)["properties"][part]
    return node


@pytest.mark.parametrize("action", SPEC_ACTIONS)
def test_schema_has_constraints_and_enums(repo_root, action):
    schema = json.loads((repo_root / "schemas" / f"{action}.schema.json").read_text())
    assert schema["x-nvp3d-action"] == action
    assert schema["x-nvp3d-sections"] == list(ACTION_SECTIONS[action])
    assert schema["additionalProperties"] is False
    assert _prop(schema, "train.num_epochs")["minimum"] == 1
    assert _prop(schema, "model.object_mask_threshold")["maximum"] == 1
    assert _prop(schema, "model.object_mask_threshold")["minimum"] == 0
    assert set(_prop(schema, "model.mode")["enum"]) == {"panoptic", "instance", "semantic"}
    assert set(_prop(schema, "train.precision")["enum"]) == {"fp32", "bf16"}  # fp16 is refused by the trainer, so not offered
    assert set(_prop(schema, "train.optim.lr_scheduler")["enum"]) == {"MultiStep", "WarmupPoly"}
    assert "synthetic" in _prop(schema, "dataset.name")["enum"]
    assert _prop(schema, "train.optim.lr")["exclusiveMinimum"] == 0
    for name, definition in schema["$defs"].items():
        assert definition.get("additionalProperties") is False, name


def test_manifest_lists_actions(repo_root):
    manifest = json.loads((repo_root / "schemas" / "manifest.json").read_text())
    assert [a["name"] for a in manifest["actions"]] == list(SPEC_ACTIONS)
    for entry in manifest["actions"]:
        assert (repo_root / entry["schema"]).is_file()
        assert (repo_root / entry["template"]).is_file()
    for example in manifest["examples"]:
        assert (repo_root / example).is_file()
