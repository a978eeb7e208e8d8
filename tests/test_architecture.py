"""The import graph of the package: no cycle, no upward arrow, no production import of tests."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qstar"

# layer of each top-level module or sub-package: a module may import its own layer or lower ones
LAYERS = {
    "config": 0,
    "overrides": 0,
    "run_config": 0,
    "errors": 0,
    "hub": 0,
    "version": 0,
    "data": 1,
    "qa": 1,
    "models": 1,
    "core": 2,
    "recipes": 3,
    "evaluation": 3,
    "experiments": 3,
    "analysis": 3,
    "cli": 4,
    "__init__": 4,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every qstar module a file imports, at the top or inside functions."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("qstar")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base.startswith("qstar"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else LAYERS["__init__"]


def _graph() -> dict[str, set[str]]:
    return {
        _module_name(p): _imports(p) - {_module_name(p)}
        for p in PACKAGE.rglob("*.py")
        if "tasks" not in p.parts  # lm-eval task utilities are loaded by file path
    }


def test_every_module_has_a_layer():
    for module in _graph():
        _layer(module)  # KeyError names a module the layer table does not know


def test_imports_never_point_upwards():
    bad = [
        f"{m} -> {d}"
        for m, deps in _graph().items()
        for d in deps
        if _layer(d) > _layer(m) and not (m == "qstar" and d.startswith("qstar.core"))
    ]
    assert not bad, "imports from a higher layer: " + ", ".join(sorted(bad))


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt == "qstar" or nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)


def test_production_code_never_imports_tests():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests"):
                raise AssertionError(f"{path} imports {node.module}")
