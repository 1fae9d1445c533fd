"""The package's import graph: no cycles, no imports of another module's private names, and the layers in order."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "pvtv2"

# Which packages a package may import from (besides itself and the top-level helpers); imports flow one way:
# tools -> training -> data / weights -> models -> fast. Two modules of ``weights`` are reached from below at call
# time: ``hub`` (a leaf: names to local files) and ``loading``, which the models' ``from_pretrained`` /
# ``save_pretrained`` hand over to (it imports nothing that imports the models' modules back: no cycle).
ALLOWED = {
    "fast": set(),
    "models": {"fast", "weights.hub", "weights.loading"},
    "weights": {"models"},
    "data": {"weights.hub"},
    "training": {"models", "weights", "data", "fast"},
}
# Top-level modules every package may use: they import nothing of the packages above them.
HELPERS = {"fileio", "runtime", "progress"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module imported, names taken from it) for every import in the file, at any depth."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "pvtv2" or target.startswith("pvtv2."):
                found.append((target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names if a.name.startswith("pvtv2"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for target, names in _imports(path):
            for imported in names or [""]:
                sub = f"{target}.{imported}" if imported else target
                edges.add(sub if sub in modules else target)
        graph[name] = {e for e in edges if e != name}
    return graph


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_private_names_imported_from_other_modules():
    offenders = []
    for path in SRC.rglob("*.py"):
        for target, names in _imports(path):
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            if private:
                offenders.append(f"{_module_name(path)} imports {private} from {target}")
    assert not offenders, "\n".join(offenders)


def test_packages_import_only_downwards():
    offenders = []
    for path in SRC.rglob("*.py"):
        name = _module_name(path)
        parts = name.split(".")
        if len(parts) < 3 or parts[1] not in ALLOWED:  # top-level tools may import anything
            continue
        own = parts[1]
        for module, names in _imports(path):
            # ``from pvtv2 import fast`` imports the package pvtv2.fast
            targets = [f"{module}.{n}" for n in names] if module == "pvtv2" else [module]
            for target in targets:
                offenders.extend(_upward(name, own, target))
    assert not offenders, "\n".join(offenders)


def _upward(name: str, own: str, target: str) -> list[str]:
    tparts = target.split(".")
    if len(tparts) < 2 or tparts[1] == own or tparts[1] in HELPERS:
        return []
    dotted = ".".join(tparts[1:])
    if not any(dotted == a or dotted.startswith(a + ".") for a in ALLOWED[own]):
        return [f"{name} imports {target}"]
    return []


def test_the_graph_sees_the_imports():
    """The walk above finds relative imports at any depth (a walk that saw nothing would pass every check)."""
    graph = _graph()
    assert "pvtv2.models.config" in graph["pvtv2.models.modeling"]
    assert "pvtv2.weights.loading" in graph["pvtv2.models.modeling"]  # inside from_pretrained
    assert "pvtv2.training.engine" in graph["pvtv2.training.classification"]
    assert "pvtv2.fast" in graph["pvtv2.models.layers"]  # ``from .. import fast``
