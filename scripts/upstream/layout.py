"""Where each file of this repository goes in verl's tree, and the rewrite of its imports.

The module list is read from the repository (every product module, every test of the MTP-RL path, the
test-only helpers those tests import), never kept by hand: adding a module here adds it upstream. A product
module whose verl path is already taken by one of verl's own files (``mtp_patch.py``, ``losses.py``) is placed
beside it as ``mtp_rl_<name>.py``. The product's engine subclass and ``MtpRLConfig`` are not moved: their
contents go into verl's own classes (:mod:`verl_edits`), so their names become verl's.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

PRODUCT = "verl_mtp"
PLATFORM = "verl_cpu"

# The product's verl integration that the upstream form replaces by edits of verl's own files
# (see verl_edits.py): the plugin, the engine subclass and its registry swap, the own entry point, its Hydra
# config and its --check (the pre-flight of the plugin's launcher, a later PR of its own).
ENGINE_SUBCLASS = "workers/engine/megatron/transformer_impl.py"
NOT_UPSTREAM = (
    "plugin.py",
    "workers/engine/registry.py",
    ENGINE_SUBCLASS,
    "trainer/main_ppo.py",
    "trainer/config/",
    "trainer/config_check.py",
    "trainer/parallel_layout.py",
)
# Classes whose contents move into verl's own class: the product's name becomes verl's.
CLASS_RENAMES = {"MtpRLConfig": "MtpConfig", "MegatronMTPEngineWithLMHead": "MegatronEngineWithLMHead"}

# Test directories of the MTP-RL path (model, worker loss/config/engine, trainer OCC and config).
TEST_DIRS = ("tests/models", "tests/trainer", "tests/workers")
# Tests of what does not go upstream: the plugin's registration, this repository's recipes, the launcher's --check.
TESTS_NOT_UPSTREAM = ("test_engine_registration_on_cpu.py", "test_recipes_on_cpu.py", "test_config_check_on_cpu.py")
# Tests of the moved tests themselves (they leave verl's CI process as they found it): upstream too, though they
# import no product module.
TESTS_OF_THE_TESTS = ("test_mtp_cpu_stand_ins_on_cpu.py",)

# The test-only helpers go into one package of verl's tests (the CPU platform itself is not part of the PR).
HELPER_PACKAGE = "tests.mtp_rl_support"
HELPER_ROOTS = (f"{PLATFORM}.testing", f"{PLATFORM}.environment")
# The platform's testing package re-exports its modules' names; upstream each name is imported from its module
# and the package's ``__init__`` is this docstring alone, so a test brings only the helpers it uses.
TESTING = f"{PLATFORM}.testing"
TESTING_INIT_TEXT = '"""Test-only helpers of the MTP-RL tests (a tiny Megatron-Core GPTModel with MTP layers on CPU and what it\nneeds); each is imported from its own module."""\n'

# Names this repository's tests use for its own Hydra config, and verl's names for the patched config.
CONFIG_RENAMES = {
    '"mtp_ppo_megatron_trainer"': '"ppo_megatron_trainer"',
    "docs/mtp_rl.md": "docs/advance/mtp.md",
}

_DOTTED = re.compile(r"\b(?:verl_mtp|verl_cpu|support)(?:\.[A-Za-z_]\w*)*")


def testing_exports(repo: Path) -> dict[str, str]:
    """Name -> module for every name the platform's testing package re-exports."""
    init = ast.parse((repo / Path(*TESTING.split(".")) / "__init__.py").read_text())
    return {
        alias.asname or alias.name: node.module
        for node in init.body
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
        for alias in node.names
    }


def import_from_modules(text: str, exports: dict[str, str]) -> str:
    """Each ``from <testing package> import a, b`` statement split into imports from the modules defining them."""
    try:
        tree = ast.parse(text)
    except SyntaxError:  # not Python (YAML, Markdown)
        return text
    lines = text.splitlines(keepends=True)
    statements = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == TESTING and n.level == 0]
    for node in sorted(statements, key=lambda n: n.lineno, reverse=True):
        indent = lines[node.lineno - 1][: node.col_offset]
        by_module: dict[str, list[str]] = {}
        for alias in node.names:
            name = alias.name if alias.asname is None else f"{alias.name} as {alias.asname}"
            by_module.setdefault(exports[alias.name], []).append(name)
        lines[node.lineno - 1 : node.end_lineno] = [
            f"{indent}from {module} import {', '.join(names)}\n" for module, names in sorted(by_module.items())
        ]
    return "".join(lines)


@dataclass
class Layout:
    """Source path -> path in verl's tree, and old module name -> new module name."""

    files: dict[Path, str] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)
    testing_exports: dict[str, str] = field(default_factory=dict)

    def rewrite(self, text: str) -> str:
        """Replace every dotted module reference by its verl name (longest known prefix wins)."""
        text = import_from_modules(text, self.testing_exports)

        def sub(match: re.Match) -> str:
            name = match.group(0)
            parts = name.split(".")
            for cut in range(len(parts), 0, -1):
                head = ".".join(parts[:cut])
                if head in self.modules:
                    return ".".join([self.modules[head], *parts[cut:]])
            return name

        text = _DOTTED.sub(sub, text)
        for old, new in CLASS_RENAMES.items():
            text = re.sub(rf"\b{old}\b", new, text)
        for old, new in CONFIG_RENAMES.items():
            text = text.replace(old, new)
        return text


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _verl_path(rel: Path, verl_root: Path) -> Path:
    """``verl_mtp/a/b.py`` -> ``verl/a/b.py``, or ``verl/a/mtp_rl_b.py`` when verl has its own ``b.py``."""
    target = Path("verl", *rel.parts[1:])
    if rel.name != "__init__.py" and (verl_root / target).exists():
        target = target.with_name("mtp_rl_" + rel.name.removeprefix("mtp_"))
    return target


def product_modules(repo: Path) -> list[Path]:
    """The product's modules, and the data files they read (``*.yaml``), that move upstream, relative to the
    repository."""
    out = []
    for path in sorted([*(repo / PRODUCT).rglob("*.py"), *(repo / PRODUCT).rglob("*.yaml")]):
        rel = path.relative_to(repo)
        inner = rel.relative_to(PRODUCT).as_posix()
        if rel == Path(PRODUCT, "__init__.py") or inner.startswith(NOT_UPSTREAM):
            continue
        out.append(rel)
    return out


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _imports_product(repo: Path, path: Path, seen: set[Path]) -> bool:
    """Whether ``path`` imports the product, itself or through the test-only helpers (``support.*``) it imports."""
    seen.add(path)
    for name in _imports(path):
        if name.split(".")[0] == PRODUCT:
            return True
        helper = _source_of(repo / "tests", name) if name.split(".")[0] == "support" else None
        if helper is not None and helper not in seen and _imports_product(repo, helper, seen):
            return True
    return False


def mtp_rl_tests(repo: Path) -> list[Path]:
    """This repository's tests of the MTP-RL path: the tests under ``TEST_DIRS`` that import the product, and
    ``TESTS_OF_THE_TESTS``."""
    out = []
    for test_dir in TEST_DIRS:
        for path in sorted((repo / test_dir).rglob("test_*_on_cpu.py")):
            if path.name in TESTS_NOT_UPSTREAM:
                continue
            if path.name in TESTS_OF_THE_TESTS or _imports_product(repo, path, set()):
                out.append(path.relative_to(repo))
    return out


def _source_of(repo: Path, module: str) -> Path | None:
    base = repo / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def helper_modules(repo: Path, tests: list[Path]) -> list[Path]:
    """The test-only helpers the moved tests need: ``tests/support`` modules and the platform's modules they
    import, with everything of the platform those import (closure over imports; a name of the testing package
    counts as its module)."""
    exports = testing_exports(repo)
    todo = [m for t in tests for m in _imports(repo / t) if m.split(".")[0] in ("support", PLATFORM)]
    todo += list(HELPER_ROOTS)
    seen: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name.startswith(TESTING + ".") and name.removeprefix(TESTING + ".") in exports:
            name = exports[name.removeprefix(TESTING + ".")]
        top = "tests" if name.split(".")[0] == "support" else ""
        source = _source_of(repo / top, name) if top else _source_of(repo, name)
        if source is None or name in seen or source in seen.values():
            continue
        if source.name == "__init__.py" and source.parent.name == PLATFORM:
            continue  # the platform's package docstring only; its modules are taken one by one
        seen[name] = source
        if name != TESTING:  # the package's own re-exports are not followed (see TESTING_INIT_TEXT)
            todo += [m for m in _imports(source) if m.split(".")[0] in ("support", PLATFORM)]
    return sorted(p.relative_to(repo) for p in seen.values())


def build_layout(repo: Path, verl_root: Path) -> Layout:
    """Every file to place in ``verl_root`` and the module renames to apply to their text."""
    layout = Layout(testing_exports=testing_exports(repo))
    # the engine subclass's methods join verl's class in verl's module of the same path
    layout.modules[_module_name(Path(PRODUCT, ENGINE_SUBCLASS))] = _module_name(Path("verl", ENGINE_SUBCLASS))
    for rel in product_modules(repo):
        target = _verl_path(rel, verl_root)
        layout.modules[_module_name(rel)] = _module_name(target)
        if rel.name != "__init__.py" or not (verl_root / target).exists():
            layout.files[rel] = target.as_posix()
    tests = mtp_rl_tests(repo)
    for rel in tests:  # verl's tests are named after what they test: say MTP-RL where the name does not
        name = rel.name if "mtp" in rel.name else rel.name.replace("test_", "test_mtp_rl_", 1)
        layout.files[rel] = rel.with_name(name).as_posix()
    helper_dir = Path(*HELPER_PACKAGE.split("."))
    for rel in helper_modules(repo, tests):
        leaf = "__init__.py" if rel.name == "__init__.py" else rel.name
        layout.files[rel] = (helper_dir / leaf).as_posix()
        old = _module_name(rel.relative_to("tests")) if rel.parts[0] == "tests" else _module_name(rel)
        layout.modules[old] = HELPER_PACKAGE if leaf == "__init__.py" else f"{HELPER_PACKAGE}.{rel.stem}"
    layout.modules[PLATFORM] = HELPER_PACKAGE
    return layout
