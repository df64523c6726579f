"""Build, check and tag the workspace packages for release, each on its own.

Every package under ``packages/`` is versioned independently. A release of a package is
identified by the git tag ``<distribution-name>-v<version>``. This script:

* builds each selected package's wheel and sdist with ``uv build --package <name>``;
* checks the built metadata (name, version, summary, README, Python requirement, that
  sibling dependencies carry a compatible version range and no path/workspace source leaked in);
* refuses a release when the package changed since its last release tag but its version did not
  move (``version not bumped``), or when the version goes backwards;
* with ``--tag``, creates the release tags for the packages it built.

Usage::

    uv run python tools/release.py                 # check + build all five into dist/
    uv run python tools/release.py frustum3d       # one package
    uv run python tools/release.py --check-only    # version/metadata checks, no build
    uv run python tools/release.py --tag           # build, then tag <name>-v<version>
"""

from __future__ import annotations

import argparse
import email
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIBLINGS = ("backbone-vggt", "maskformer-head", "frustum3d", "datasets3d", "nvp3d-cli")


class ReleaseError(RuntimeError):
    """A release check failed; the message says which package and why."""


@dataclass(frozen=True)
class Package:
    """One workspace member as declared in its pyproject.toml."""

    name: str
    version: str
    path: Path
    dependencies: tuple[str, ...]

    @property
    def tag(self) -> str:
        return f"{self.name}-v{self.version}"


def parse_version(text: str) -> tuple[int, ...]:
    """Numeric release tuple of a PEP 440 version (pre/post/dev suffixes ignored for ordering)."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def load_packages() -> dict[str, Package]:
    """Read every ``packages/*/pyproject.toml``."""
    packages: dict[str, Package] = {}
    for pyproject in sorted(REPO.glob("packages/*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        packages[project["name"]] = Package(
            name=project["name"],
            version=project["version"],
            path=pyproject.parent,
            dependencies=tuple(project.get("dependencies", [])),
        )
    return packages


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout


def release_tags(name: str) -> list[tuple[tuple[int, ...], str]]:
    """Existing release tags of one package, oldest version first."""
    tags = []
    for tag in git("tag", "--list", f"{name}-v*").split():
        tags.append((parse_version(tag.removeprefix(f"{name}-v")), tag))
    return sorted(tags)


def check_version_bump(package: Package) -> str:
    """Refuse a release whose sources changed since the last tag while the version stayed put."""
    tags = release_tags(package.name)
    if not tags:
        return "first release"
    last_version, last_tag = tags[-1]
    current = parse_version(package.version)
    if current < last_version:
        raise ReleaseError(f"{package.name}: version {package.version} is older than the released {last_tag}")
    if current == last_version:
        changed = git("diff", "--name-only", last_tag, "--", str(package.path.relative_to(REPO))).strip()
        if changed:
            raise ReleaseError(
                f"{package.name}: version not bumped: {package.version} is already released as {last_tag} "
                f"but {len(changed.splitlines())} file(s) changed since; bump `version` in "
                f"{package.path.relative_to(REPO)}/pyproject.toml"
            )
        return f"unchanged since {last_tag} (nothing to release)"
    return f"bumped from {last_tag}"


def check_sibling_ranges(package: Package) -> None:
    """Sibling dependencies must be version ranges (``>=a,<b``), never pins to paths or bare names."""
    for requirement in package.dependencies:
        name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]
        if name in SIBLINGS and not re.search(r">=.*,\s*<", requirement):
            raise ReleaseError(
                f"{package.name}: sibling dependency {requirement!r} needs a compatible range like 'name>=0.1,<0.2'"
            )


def read_wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(archive.read(meta))


def check_built(package: Package, dist: Path) -> list[Path]:
    """Check the wheel and sdist that ``uv build`` produced for one package."""
    stem = package.name.replace("-", "_")
    wheels = list(dist.glob(f"{stem}-{package.version}-*.whl"))
    sdists = list(dist.glob(f"{stem}-{package.version}.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        raise ReleaseError(f"{package.name}: expected one wheel and one sdist in {dist}, found {wheels + sdists}")
    meta = read_wheel_metadata(wheels[0])
    problems = []
    if meta["Name"] != package.name:
        problems.append(f"Name {meta['Name']!r}")
    if meta["Version"] != package.version:
        problems.append(f"Version {meta['Version']!r}")
    if not meta.get("Summary"):
        problems.append("empty Summary")
    if not meta.get("Requires-Python"):
        problems.append("no Requires-Python")
    if len(meta.get_payload() or "") < 20:
        problems.append("README missing from the long description")
    for requirement in meta.get_all("Requires-Dist") or []:
        if "file://" in requirement or "@" in requirement.split(";")[0]:
            problems.append(f"direct reference leaked into Requires-Dist: {requirement}")
    with tarfile.open(sdists[0]) as archive:
        if not any(m.name.endswith("/pyproject.toml") for m in archive.getmembers()):
            problems.append("sdist has no pyproject.toml")
    if problems:
        raise ReleaseError(f"{package.name}: bad built metadata: " + "; ".join(problems))
    return [wheels[0], sdists[0]]


def build(package: Package, dist: Path) -> list[Path]:
    subprocess.run(
        ["uv", "build", "--package", package.name, "--out-dir", str(dist), "--quiet"],
        cwd=REPO,
        check=True,
    )
    return check_built(package, dist)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="*", help="distribution names (default: all)")
    parser.add_argument("--dist", type=Path, default=REPO / "dist", help="output folder")
    parser.add_argument("--check-only", action="store_true", help="run the version checks, build nothing")
    parser.add_argument("--tag", action="store_true", help="tag <name>-v<version> after a good build")
    args = parser.parse_args(argv)

    packages = load_packages()
    unknown = [n for n in args.packages if n not in packages]
    if unknown:
        print(f"release: unknown package(s) {unknown}; known: {sorted(packages)}", file=sys.stderr)
        return 2
    selected = [packages[n] for n in (args.packages or sorted(packages))]
    try:
        for package in selected:
            check_sibling_ranges(package)
            verdict = check_version_bump(package)
            print(f"{package.name} {package.version}: {verdict}")
            if args.check_only:
                continue
            files = build(package, args.dist)
            print("  built " + ", ".join(f.name for f in files))
            releasable = verdict == "first release" or verdict.startswith("bumped")
            if args.tag and releasable:
                git("tag", package.tag)
                print(f"  tagged {package.tag}")
    except ReleaseError as err:
        print(f"release refused: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
