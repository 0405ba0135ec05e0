"""The shape of the package, read from its source: imports only go down, and no module or class grows past a
size a reader can hold. Nothing here imports distcnn: the AST is enough."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "distcnn"
MAX_FILE_LINES = 400
MAX_CLASS_LINES = 200
MAX_FUNCTION_LINES = 60  # a function's whole text, its docstring included


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of distcnn (a package is its __init__)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def all_imported(name: str, path: Path) -> set[str]:
    """Every module a module names in its imports, distcnn's or not, at any depth (a function's lazy import
    counts too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return targets


def imported(name: str, path: Path) -> set[str]:
    """The distcnn modules a module names in its imports, at any depth."""
    return {target for target in all_imported(name, path) if target == "distcnn" or target.startswith("distcnn.")}


def unit(module: str) -> str:
    """The package-level unit a module belongs to: `distcnn.telemetry.sampler` -> `distcnn.telemetry`."""
    return ".".join(module.split(".")[:2])


def package_graph() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {unit(name): set() for name in known if name != "distcnn"}
    for name, path in known.items():
        if name == "distcnn":
            continue
        for target in imported(name, path):
            if target in known and target != "distcnn" and unit(target) != unit(name):
                graph[unit(name)].add(unit(target))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_level_import_graph_has_no_cycle():
    graph = package_graph()
    assert len(graph) > 10 and graph["distcnn.cli"], "the graph was read"  # it saw the modules and their imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_nothing_imports_the_command_line():
    users = [name for name, path in modules().items()
             if name not in ("distcnn.cli", "distcnn.__main__") and "distcnn.cli" in imported(name, path)]
    assert users == []


def test_printing_a_line_joins_no_process_group():
    """distcnn.console, and every distcnn module it reaches, never imports torch.distributed."""
    known, seen, todo = modules(), set(), ["distcnn.console"]
    while todo:
        name = todo.pop()
        if name in seen or name not in known:
            continue
        seen.add(name)
        todo += imported(name, known[name])
    assert "distcnn.parallel.ranks" in seen  # the walk followed console's imports
    distributed = {name for name in seen if any(module == "torch.distributed" or module.startswith(
        "torch.distributed.") for module in all_imported(name, known[name]))}
    assert distributed == set()


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_classes_and_functions_stay_readable(name):
    path = modules()[name]
    source = path.read_text(encoding="utf-8")
    assert len(source.splitlines()) <= MAX_FILE_LINES, f"{path.name}: over {MAX_FILE_LINES} lines"
    for node in ast.walk(ast.parse(source)):
        length = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
        if isinstance(node, ast.ClassDef):
            assert length <= MAX_CLASS_LINES, f"class {node.name} in {path.name}: {length} lines"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert length <= MAX_FUNCTION_LINES, f"function {node.name} in {path.name}: {length} lines"
