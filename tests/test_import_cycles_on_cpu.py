"""No import cycle inside the CPU platform or the local example (the product's own graph: test_import_layers_on_cpu).

Read from the source with ``ast``; an import inside a function counts (it closes the circle when it runs), one
under ``if TYPE_CHECKING:`` does not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"verl_cpu": REPO / "verl_cpu", "verl_mtp_example": REPO / "examples" / "verl_mtp_example"}


def _module(package: str, root: Path, path: Path) -> str:
    parts = (package, *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.Module):
    checking = [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]
    skipped = {id(n) for node in checking for stmt in node.body for n in ast.walk(stmt)}
    return [node for node in ast.walk(tree) if id(node) not in skipped]


def import_graph(package: str, root: Path) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}``."""
    files = {_module(package, root, p): p for p in sorted(root.rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        edges = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                edges |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                          for a in node.names}
        graph[name] = {e for e in edges if e in files and e != name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    return next((found for node in sorted(graph) if node not in state and (found := visit(node))), None)


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph("verl_mtp_example", PACKAGES["verl_mtp_example"])
    assert "verl_mtp_example.tiny_model" in graph["verl_mtp_example.preparation"]  # imported in a function
    assert cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


@pytest.mark.parametrize("package", list(PACKAGES))
def test_no_import_cycle(package):
    found = cycle(import_graph(package, PACKAGES[package]))
    assert found is None, " -> ".join(found)
