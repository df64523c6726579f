"""Inside nvp3d, data flows one way: cli -> runner/automl -> actions -> demo -> training/evaluation/inference/
export -> data/model -> config -> the core (errors, status, fileio, distributed, runlock, outdir, worker_errors). (automl drives ``nvp3d train``
processes, as the runner drives one action, so it sits beside the runner.) Checked on every import statement of
the sources (function-level imports included), with no import cycle between modules; and every third-party
module nvp3d imports is a declared dependency.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE = REPO_ROOT / "packages" / "nvp3d-cli" / "src" / "nvp3d"

#: rank of each room of nvp3d: a module may import its own room or rooms of a higher rank only
LAYERS: dict[str, int] = {
    "cli": 0, "__main__": 0,
    "runner": 1, "schema_gen": 1, "automl": 1,
    "actions": 2,
    "demo": 3,
    "training": 4, "evaluation": 4, "inference": 4, "export": 4,
    "data": 5, "model": 5,
    "config": 6,
    "errors": 7, "status": 7, "fileio": 7, "distributed": 7, "runlock": 7, "outdir": 7, "worker_errors": 7,
    "precision": 7,
}
#: the package's façade may name its public function (a lazy attribute, imported on first use only)
FACADE = "nvp3d/__init__.py"

#: import name -> distribution name, where they differ
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml", "pytorch_lightning": "pytorch-lightning",
                 "skimage": "scikit-image", "backbone_vggt": "backbone-vggt", "maskformer_head": "maskformer-head"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SOURCE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only, never imported at run time)."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement of a file."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in _runtime_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]  # submodule imports
    return found


def _source_files() -> list[Path]:
    return sorted(SOURCE.rglob("*.py"))


def _known_modules() -> set[str]:
    return {_module_name(p) for p in _source_files()}


def test_every_room_has_a_layer() -> None:
    rooms = {_room(_module_name(p)) for p in _source_files()} - {""}
    assert rooms <= set(LAYERS), f"rooms without a layer in tests/test_layering.py: {sorted(rooms - set(LAYERS))}"


def test_imports_point_down_the_layers() -> None:
    known = _known_modules()
    offending = []
    for path in _source_files():
        rel = path.relative_to(SOURCE.parent).as_posix()
        if rel == FACADE:
            continue
        src_room = _room(_module_name(path))
        for line, name in _imports(path):
            if name not in known or not name.startswith("nvp3d."):
                continue
            dst_room = _room(name)
            if dst_room and LAYERS[dst_room] < LAYERS[src_room]:
                offending.append(f"{rel}:{line} imports {name} ({src_room} -> {dst_room} points up)")
    assert not offending, "\n".join(offending)


def test_no_import_cycles_between_modules() -> None:
    known = _known_modules()
    graph: dict[str, set[str]] = {}
    for path in _source_files():
        if path.relative_to(SOURCE.parent).as_posix() == FACADE:
            continue
        me = _module_name(path)
        graph[me] = {name for _, name in _imports(path) if name in known and name != me and name != "nvp3d"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_third_party_imports_are_declared() -> None:
    project = tomllib.loads((REPO_ROOT / "packages/nvp3d-cli/pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower() for req in project["dependencies"]}
    for extra in project.get("optional-dependencies", {}).values():
        declared |= {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower() for req in extra}
    missing = {}
    for path in _source_files():
        for _, name in _imports(path):
            top = name.split(".")[0]
            if not top or top == "nvp3d" or top in sys.stdlib_module_names or top == "__future__":
                continue
            dist = DISTRIBUTIONS.get(top, top).lower().replace("_", "-")
            if dist not in declared:
                missing.setdefault(dist, path.relative_to(REPO_ROOT).as_posix())
    assert not missing, f"nvp3d imports undeclared packages (first file): {missing}"
