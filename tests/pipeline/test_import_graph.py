"""No import cycles inside ``pipeline/``, between modules or between packages.

The graph is read from the source with ``ast``, not by importing, so it sees every import the code
can execute: module-level ones and those inside functions (the lazy imports that keep CLI start-up
light still tie the modules together: a cycle through them is a design cycle that only happens not
to crash at import time). Imports under ``if TYPE_CHECKING:`` are left out: they never run.
``importlib.import_module`` (the stage registry's lazy loading in ``pipeline.stages``) is not an
import statement and is not counted. The package graph collapses ``pipeline.eval.*`` and
``pipeline.stages.*`` to one node each, so e.g. eval → judges → eval is a cycle even when no two
single modules import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pipeline"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith("TYPE_CHECKING")


def imports_of(tree: ast.AST, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The pipeline modules the import statements in ``tree`` load, outside TYPE_CHECKING blocks:
    ``from pipeline.x import y`` loads module ``pipeline.x.y`` if there is one, else ``pipeline.x``."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        stack.extend(ast.iter_child_nodes(node))
    return (found & modules) - {name}


def module_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: imports_of(
            ast.parse(path.read_text(encoding="utf-8")), name, path.stem == "__init__", set(paths)
        )
        for name, path in paths.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def package_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2])  # pipeline.eval.x -> pipeline.eval; pipeline.judges stays itself


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_are_resolved_to_modules():
    graph = module_graph()
    assert "pipeline.config" in graph["pipeline.stages.train"]  # inside a function
    assert "pipeline.config" not in graph["pipeline.models"]  # only under TYPE_CHECKING


def test_no_module_cycle():
    cycle = find_cycle(module_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_package_cycle():
    packages: dict[str, set[str]] = {}
    for name, targets in module_graph().items():
        packages.setdefault(package_of(name), set()).update(
            package_of(t) for t in targets if package_of(t) != package_of(name)
        )
    cycle = find_cycle(packages)
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle or [])


def test_stages_never_import_each_other():
    """``pipeline/stages/base.py``'s contract: stages communicate only through the run directory."""
    from pipeline.stages import STAGE_ORDER

    stages = {f"pipeline.stages.{name}" for name in STAGE_ORDER}
    graph = module_graph()
    assert {stage: graph[stage] & stages for stage in stages} == {stage: set() for stage in stages}
