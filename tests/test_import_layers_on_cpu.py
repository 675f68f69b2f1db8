"""The product's import graph, read from its source with ``ast``: no cycle, no import of another layer.

``verl_mtp`` is the product; the CPU platform (``verl_cpu``), the local example (``verl_mtp_example``,
``examples``) and the tests build on it and must never be imported by it. Config modules are leaves: they
import nothing of the project outside their own package. Imports under ``if TYPE_CHECKING:`` never run, so
they count for the layer rule but not for cycles; imports inside functions count for both.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "verl_mtp"  # the source tree, read as text (nothing is imported)
FORBIDDEN = ("verl_cpu", "verl_mtp_example", "examples", "tests")
CONFIG_PACKAGE = "verl_mtp.workers.config"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, modules: set[str]) -> list[tuple[str, bool]]:
    """``(imported module, runs at import time or call time)`` for every import statement in ``path``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    type_checking = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            type_checking.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        runs = id(node) not in type_checking
        if isinstance(node, ast.Import):
            found += [(alias.name, runs) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # ``from pkg import submodule`` imports the submodule
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in modules else base, runs))
    return found


def product_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(runtime edges between product modules, every imported name per product module)."""
    files = sorted(ROOT.rglob("*.py"))
    modules = {module_name(f) for f in files}
    edges, imported = {}, {}
    for f in files:
        found = imports_of(f, modules)
        imported[module_name(f)] = {m for m, _ in found}
        edges[module_name(f)] = {m for m, runs in found if runs and m in modules and m != module_name(f)}
    return edges, imported


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a path ``[a, b, ..., a]``, or ``None``."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_the_product_imports():
    """The graph is not vacuous: known edges of the engine and of the loss are in it."""
    edges, _ = product_graph()
    engine = "verl_mtp.workers.engine.megatron.transformer_impl"
    hooks = "verl_mtp.workers.engine.megatron.mtp_engine_hooks"
    assert {hooks, "verl_mtp.workers.engine.registry"} <= edges[engine]
    assert {"verl_mtp.workers.utils.losses", "verl_mtp.models.mcore.mtp_patch",
            "verl_mtp.workers.config.mtp"} <= edges[hooks]
    assert "verl_mtp.trainer.ppo.mtp_occ" in edges["verl_mtp.workers.utils.losses"]
    assert edges["verl_mtp.plugin"] == {engine}


def test_product_imports_have_no_cycle():
    edges, _ = product_graph()
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_product_never_imports_the_platform_the_example_or_tests():
    _, imported = product_graph()
    bad = {
        module: sorted(m for m in names if m.split(".")[0] in FORBIDDEN)
        for module, names in imported.items()
        if any(m.split(".")[0] in FORBIDDEN for m in names)
    }
    assert not bad, bad


@pytest.mark.parametrize("module", sorted(m for m in product_graph()[1] if m.startswith(CONFIG_PACKAGE)))
def test_config_modules_are_leaves(module):
    _, imported = product_graph()
    project = {m for m in imported[module] if m.split(".")[0] == "verl_mtp"}
    assert all(m.startswith(CONFIG_PACKAGE) for m in project), project
