"""Dependencies point one way: nvp3d composes the four libraries, none of them imports nvp3d,
frustum3d imports no sibling, datasets3d may use frustum3d only, backbone and head stand alone.

Checked twice: on the import statements in the sources and on the declared dependencies.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {
    "backbone-vggt": "backbone_vggt",
    "maskformer-head": "maskformer_head",
    "frustum3d": "frustum3d",
    "datasets3d": "datasets3d",
    "nvp3d-cli": "nvp3d",
}
ALLOWED = {
    "backbone-vggt": set(),
    "maskformer-head": set(),
    "frustum3d": set(),
    "datasets3d": {"frustum3d"},
    "nvp3d-cli": {"backbone-vggt", "maskformer-head", "frustum3d", "datasets3d"},
}


def imported_top_level_modules(source_dir: Path) -> dict[str, str]:
    """Top-level module name -> first file importing it, over every .py file of a package."""
    found: dict[str, str] = {}
    for path in sorted(source_dir.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(REPO_ROOT)))
    return found


@pytest.mark.parametrize("package", sorted(IMPORT_NAMES))
def test_source_imports_follow_the_dependency_direction(package: str) -> None:
    imports = imported_top_level_modules(REPO_ROOT / "packages" / package / "src")
    forbidden = {IMPORT_NAMES[p] for p in IMPORT_NAMES if p != package and p not in ALLOWED[package]}
    offending = {name: where for name, where in imports.items() if name in forbidden}
    assert not offending, f"{package} imports siblings it must not depend on: {offending}"


@pytest.mark.parametrize("package", sorted(IMPORT_NAMES))
def test_declared_dependencies_follow_the_dependency_direction(package: str) -> None:
    project = tomllib.loads((REPO_ROOT / "packages" / package / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0] for req in project["dependencies"]}
    siblings = names & set(IMPORT_NAMES)
    assert siblings == ALLOWED[package] & siblings, f"{package} declares {siblings}, allowed {ALLOWED[package]}"
    if package == "nvp3d-cli":
        assert siblings == ALLOWED[package], "nvp3d-cli must depend on all four libraries"


def test_frustum3d_needs_only_torch_and_numpy() -> None:
    project = tomllib.loads((REPO_ROOT / "packages/frustum3d/pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower() for req in project["dependencies"]}
    assert names <= {"torch", "numpy"}, names
    imports = imported_top_level_modules(REPO_ROOT / "packages/frustum3d/src")
    third_party = set(imports) - {"frustum3d", "torch", "numpy", "triton"} - set(__import__("sys").stdlib_module_names)
    assert not third_party, f"frustum3d imports undeclared packages: {third_party}"


def test_torch_is_pinned_to_the_2_11_series() -> None:
    for package in IMPORT_NAMES:
        project = tomllib.loads((REPO_ROOT / "packages" / package / "pyproject.toml").read_text())["project"]
        torch_reqs = [r for r in project["dependencies"] if re.match(r"torch\b", r)]
        assert torch_reqs, f"{package} does not declare torch"
        assert all(">=2.11" in r and "<2.12" in r for r in torch_reqs), (package, torch_reqs)
