"""tools/release.py refuses a release whose package changed without a version bump."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_release_module():
    spec = importlib.util.spec_from_file_location("release_tool", REPO_ROOT / "tools" / "release.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_repo(tmp_path: Path, version: str) -> Path:
    pkg = tmp_path / "packages" / "demo-lib"
    (pkg / "src" / "demo_lib").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(
        f'[project]\nname = "demo-lib"\nversion = "{version}"\ndependencies = ["frustum3d>=0.1,<0.2"]\n'
    )
    (pkg / "src" / "demo_lib" / "__init__.py").write_text("x = 1\n")
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a"]):
        subprocess.run(["git", *cmd], cwd=tmp_path, check=True)
    return pkg


@pytest.fixture()
def release(tmp_path, monkeypatch):
    module = load_release_module()
    monkeypatch.setattr(module, "REPO", tmp_path)
    return module


def test_first_release_then_refuse_unbumped_change(tmp_path, release) -> None:
    pkg = make_repo(tmp_path, "0.1.0")
    package = release.load_packages()["demo-lib"]
    assert release.check_version_bump(package) == "first release"
    subprocess.run(["git", "tag", package.tag], cwd=tmp_path, check=True)
    assert release.check_version_bump(package).startswith("unchanged")

    (pkg / "src" / "demo_lib" / "__init__.py").write_text("x = 2\n")
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "b"], cwd=tmp_path, check=True)
    with pytest.raises(release.ReleaseError, match="version not bumped"):
        release.check_version_bump(release.load_packages()["demo-lib"])

    text = (pkg / "pyproject.toml").read_text().replace("0.1.0", "0.1.1")
    (pkg / "pyproject.toml").write_text(text)
    assert release.check_version_bump(release.load_packages()["demo-lib"]).startswith("bumped")

    (pkg / "pyproject.toml").write_text(text.replace("0.1.1", "0.0.9"))
    with pytest.raises(release.ReleaseError, match="older than"):
        release.check_version_bump(release.load_packages()["demo-lib"])


def test_sibling_dependencies_need_ranges(release) -> None:
    bad = release.Package("x", "0.1.0", Path("."), ("frustum3d",))
    with pytest.raises(release.ReleaseError, match="compatible range"):
        release.check_sibling_ranges(bad)
    release.check_sibling_ranges(release.Package("x", "0.1.0", Path("."), ("frustum3d>=0.1,<0.2",)))


def test_real_workspace_packages_pass_the_checks() -> None:
    module = load_release_module()
    packages = module.load_packages()
    assert set(packages) == set(module.SIBLINGS)
    for package in packages.values():
        module.check_sibling_ranges(package)


@pytest.mark.parametrize("package", sorted(p.name for p in (REPO_ROOT / "packages").iterdir()
                                           if (p / "pyproject.toml").is_file()))
def test_module_version_is_the_package_version(package: str) -> None:
    """``<module>.__version__`` says the version its pyproject.toml releases (they had drifted apart)."""
    import importlib
    import tomllib

    pkg = REPO_ROOT / "packages" / package
    version = tomllib.loads((pkg / "pyproject.toml").read_text())["project"]["version"]
    (module_dir,) = [p for p in (pkg / "src").iterdir() if (p / "__init__.py").is_file()]
    assert importlib.import_module(module_dir.name).__version__ == version
