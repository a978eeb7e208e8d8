"""The shape of the package: the import graph (no cycle, no upward arrow, no production import of
tests) and the size of its rooms (no file over ~400 lines, no function over ~80)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qstar"

# layer of each top-level module or sub-package: a module may import its own layer or lower ones
LAYERS = {
    "config": 0,
    "overrides": 0,
    "run_config": 0,
    "sections": 0,
    "sections_qa": 0,
    "errors": 0,
    "hub": 0,
    "version": 0,
    "data": 1,
    "data_sources": 1,
    "qa": 1,
    "models": 1,
    "core": 2,
    "runs": 3,
    "evaluation": 4,
    "recipes": 5,
    "experiments": 6,
    "analysis": 7,
    "cli": 8,
    "cli_tools": 8,
    "__init__": 8,
}
MAX_FILE_LINES = 420
MAX_FUNCTION_LINES = 85
# declarative argument parsers: long by nature, one add_argument per option
LONG_BY_DESIGN = {("qstar/cli.py", "build_parser"), ("qstar/analysis/bench.py", "add_arguments")}


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


def test_no_file_is_too_long():
    long = [
        f"{p.relative_to(PACKAGE.parent)} ({n} lines)"
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    ]
    assert not long, "files over ~400 lines: " + ", ".join(sorted(long))


def test_no_function_is_too_long():
    long = []
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE.parent))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and (rel, node.name) not in LONG_BY_DESIGN:
                    long.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over ~80 lines: " + ", ".join(sorted(long))


def test_imports_of_qstar_modules_are_at_the_top():
    """Deferred imports of qstar modules are for optional or heavy dependencies and say so."""
    deferred = []
    for path in PACKAGE.rglob("*.py"):
        if "tasks" in path.parts:
            continue
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    names = (
                        [inner.module or ""]
                        if isinstance(inner, ast.ImportFrom)
                        else [a.name for a in inner.names]
                    )
                    if (
                        any(n.startswith("qstar") for n in names)
                        and "#" not in lines[inner.lineno - 1]
                    ):
                        deferred.append(f"{path.relative_to(PACKAGE.parent)}:{inner.lineno}")
    assert not deferred, "qstar imports inside functions without a reason: " + ", ".join(
        sorted(deferred)
    )
