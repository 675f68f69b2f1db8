"""Generate the upstream PR into verl from this repository, apply it to verl's tree and test it there on CPU.

    python scripts/upstream/make_verl_pr.py [--target sdist|GIT_DIR] [--out DIR] [--cache DIR] [--no-tests]

1. verl's tree: the verl 0.9.1 source distribution from PyPI (cached in ``--cache``), or a bare git mirror
   of verl (``--target /path/to/git-dir``, exported with ``git archive``).
2. The product's modules at verl's paths, imports rewritten (:mod:`layout`); the integration as edits of
   verl's own files (:mod:`verl_edits`); the MTP-RL tests under verl's ``tests/`` with their test-only
   helpers in ``tests/mtp_rl_support`` (each test module imports the fixtures it uses: no conftest.py).
3. ``OUT/verl-mtp-rl.patch`` (the whole change) and the size of the change to verl's pre-existing files.
4. In the patched tree, with this repository's packages blocked (``isolation/sitecustomize.py``): verl's own
   CPU tests that touch the changed modules and the moved tests in one pytest process, in the order and with
   the ``-x`` of verl's CPU CI, with a plugin that fails any test module leaving ``torch.cuda`` or Megatron
   changed. Exit status 0 only if all pass.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import os
import re
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import layout as layout_mod
import verl_edits
import verl_source

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ISOLATION = HERE / "isolation"
# verl's header for a contribution by individuals, as on its 2025 files (``Copyright 2025 Individual
# Contributor: <name>``, the form verl's tests/special_sanity/check_license.py accepts) with the Apache text.
LICENSE_HEADER = """\
# Copyright 2025 Individual Contributor: the verl-mtp authors
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
# verl's pre-commit pins ruff 0.12.2 (.pre-commit-config.yaml); run on the new files with verl's settings.
RUFF = "ruff==0.12.2"
# verl's `test` extra (pytest-asyncio) where the interpreter lacks it; installed once into the cache.
TEST_DEPS = ("pytest-asyncio",)
# The moved tests' fixture and warning filters (tests/support/pytest_fixtures.py), imported by each moved module
# that uses them: verl's CI runs all of tests/ in one process, and a conftest.py would reach verl's own tests.
FIXTURES = f"{layout_mod.HELPER_PACKAGE}.pytest_fixtures"
FIXTURE_NAMES = ("cpu_megatron",)
WARNING_FILTERS = "MCORE_WARNING_FILTERS"
# The plugin that fails a test module which leaves the process changed (tests/support/stand_in_probe.py).
PROBE = f"{layout_mod.HELPER_PACKAGE}.stand_in_probe"
# verl modules the integration edits: verl's own CPU tests that name one of them are run too.
CHANGED_MODULES = ("verl.workers.config", "verl.workers.engine", "verl.trainer.config", "MtpConfig", "hf_model")


def place_files(repo: Path, tree: Path, layout) -> list[str]:
    """Copy every laid-out file with its imports rewritten; returns the new files' paths."""
    new = []
    for src, dest in sorted(layout.files.items()):
        target = tree / dest
        if target.exists():
            raise FileExistsError(f"{dest} already exists in verl's tree (layout clash for {src})")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(LICENSE_HEADER + layout.rewrite((repo / src).read_text()))
        new.append(dest)
    return new


def with_fixture_imports(text: str) -> str:
    """A moved test module importing the fixtures it uses and marking Megatron's expected warnings itself:
    ``from FIXTURES import ...`` after its last top-level import, and ``MCORE_WARNING_FILTERS`` joined to its
    ``pytestmark`` (or as its ``pytestmark``)."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    names = [name for name in FIXTURE_NAMES if re.search(rf"\b{name}\b", text)]
    marks = [node for node in tree.body if isinstance(node, ast.Assign) and ast.unparse(node.targets) == "pytestmark"]
    if len(marks) > 1:
        raise ValueError("a moved test module assigns pytestmark more than once")
    if marks:
        mark = marks[0]
        value = mark.value
        items = [ast.unparse(e) for e in value.elts] if isinstance(value, ast.List) else [ast.unparse(value)]
        joined = f"pytestmark = [{', '.join(items)}, *{WARNING_FILTERS}]\n"
        lines[mark.lineno - 1 : mark.end_lineno] = [joined]
    last_import = max(n.end_lineno for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom))
    added = f"from {FIXTURES} import {', '.join(sorted([WARNING_FILTERS, *names]))}"
    added += "  # noqa: F401\n" if names else "\n"
    added += "" if marks else f"\npytestmark = {WARNING_FILTERS}\n"
    lines.insert(last_import, added)
    return "".join(lines)


def package_tests(repo: Path, tree: Path, layout, new: list[str]) -> None:
    """verl's test directories are packages; each moved test module imports this repository's fixtures and
    warning filters by name (no conftest.py: verl's other tests in those directories stay as they were)."""
    fixtures = tree / "tests/mtp_rl_support/pytest_fixtures.py"
    fixtures.write_text(LICENSE_HEADER + layout.rewrite((repo / "tests/support/pytest_fixtures.py").read_text()))
    new.append("tests/mtp_rl_support/pytest_fixtures.py")
    for dest in layout.files.values():
        if re.match(r"tests/.*/test_[^/]*_on_cpu\.py$", dest):
            (tree / dest).write_text(with_fixture_imports((tree / dest).read_text()))
    test_dirs = {(tree / d).parent for d in layout.files.values() if d.startswith("tests/")}
    for test_dir in sorted(test_dirs):
        for pkg in [test_dir, *test_dir.parents]:
            if pkg == tree / "tests" or tree not in pkg.parents:
                break
            if not (pkg / "__init__.py").exists():
                (pkg / "__init__.py").write_text(LICENSE_HEADER)
                new.append(str((pkg / "__init__.py").relative_to(tree)))


def diff_report(pristine: Path, tree: Path, out: Path) -> list[tuple[str, int, int]]:
    """Write the whole change as one patch; return (file, added, removed) for verl's pre-existing files."""
    rows, chunks = [], []
    caches = {"__pycache__", ".ruff_cache", ".pytest_cache", ".hypothesis"}
    for path in sorted(p for p in tree.rglob("*") if p.is_file() and not caches & set(p.parts)):
        rel = str(path.relative_to(tree))
        old_path = pristine / rel
        if old_path.exists() and old_path.read_bytes() == path.read_bytes():
            continue
        old = old_path.read_text().splitlines(keepends=True) if old_path.exists() else []
        new = path.read_text().splitlines(keepends=True)
        lines = list(difflib.unified_diff(old, new, f"a/{rel}" if old_path.exists() else "/dev/null", f"b/{rel}"))
        chunks += lines
        if old_path.exists():
            added = sum(1 for x in lines if x.startswith("+") and not x.startswith("+++"))
            removed = sum(1 for x in lines if x.startswith("-") and not x.startswith("---"))
            rows.append((rel, added, removed))
    (out / "verl-mtp-rl.patch").write_text("".join(chunks))
    return rows


def print_diff_table(rows: list[tuple[str, int, int]], generated: list[str]) -> None:
    print("diff to verl's pre-existing files (lines added / removed):")
    totals = {"edited": [0, 0], "generated": [0, 0]}
    for rel, added, removed in rows:
        kind = "generated" if rel in generated else "edited"
        totals[kind][0] += added
        totals[kind][1] += removed
        note = "  (generated by verl's scripts/print_cfg.py)" if kind == "generated" else ""
        print(f"  {rel}: +{added} -{removed}{note}")
    for kind, (added, removed) in totals.items():
        print(f"  total {kind}: +{added} -{removed}")


def verl_own_tests(tree: Path, moved: set[str]) -> list[str]:
    """verl's CPU tests in the tree that name one of the modules the integration edits."""
    found = []
    for path in sorted((tree / "tests").rglob("test_*_on_cpu.py")):
        rel = str(path.relative_to(tree))
        if rel not in moved and any(name in path.read_text() for name in CHANGED_MODULES):
            found.append(rel)
    return found


def test_deps(python: str, cache: Path) -> Path:
    """A directory with verl's test-only pytest plugins the interpreter lacks (pip, once per cache)."""
    target = cache / "test-deps"
    for package in TEST_DEPS:
        module = package.replace("-", "_")
        if subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0:
            continue
        if not (target / module).exists():
            subprocess.run(
                [python, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), package], check=True
            )
    return target


def isolated_env(tree: Path, deps: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(ISOLATION), str(deps)])
    env.pop("VERL_USE_EXTERNAL_MODULES", None)
    env.pop("VERL_PLATFORM", None)
    return env


PROOF = """
import inspect, sys, verl
from verl.workers.engine.base import EngineRegistry
cls = EngineRegistry.get_engine_cls("language_model", "megatron")
assert verl.__file__.startswith(sys.argv[1]), verl.__file__
assert cls.__module__ == "verl.workers.engine.megatron.transformer_impl", cls
assert cls.__qualname__ == "MegatronEngineWithLMHead" and "mtp_engine_hooks" in inspect.getsource(cls), cls
from verl.workers.config import MtpConfig
assert MtpConfig(enable=True, mtp_loss_type="rl").is_rl
assert not any(m.split(".")[0] in ("verl_mtp", "verl_cpu") for m in sys.modules), "local package imported"
try:
    import verl_mtp
except ModuleNotFoundError:
    print(f"isolation: verl from {verl.__file__}; engine {cls.__qualname__}; verl_mtp not importable")
else:
    raise SystemExit("verl_mtp is importable in the upstream tree's run")
"""


def lint_new_files(tree: Path, python: str, cache: Path, new: list[str]) -> list[str]:
    """verl's pre-commit ruff hooks on the new Python files (``--fix``, then format); the findings left."""
    ruff = cache / "lint/bin/ruff"
    if not ruff.exists():
        subprocess.run(
            [python, "-m", "pip", "install", "-q", "--no-deps", "--target", str(cache / "lint"), RUFF], check=True
        )
    files = [f for f in new if f.endswith(".py")]
    subprocess.run(
        [str(ruff), "check", "--no-cache", "--fix", "--quiet", "--exit-zero", *files],
        cwd=tree,
        check=True,
        capture_output=True,
    )
    subprocess.run([str(ruff), "format", "--no-cache", "--quiet", *files], cwd=tree, check=True)
    left = subprocess.run(
        [str(ruff), "check", "--no-cache", "--output-format", "concise", "--exit-zero", *files],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in left.splitlines() if re.match(r"\S+\.py:\d+:\d+: ", line)]


def license_findings(tree: Path, new: list[str]) -> list[str] | None:
    """New Python files without one of the headers verl's ``tests/special_sanity/check_license.py`` accepts
    (its script needs a git checkout, so its header list is read instead); None when the tree lacks it."""
    script = tree / "tests/special_sanity/check_license.py"
    if not script.exists():
        return None
    heads = re.findall(r'^license_head_\w+ = "(.+)"$', script.read_text(), re.M)
    return [f for f in new if f.endswith(".py") and not any(h in (tree / f).read_text() for h in heads)]


def _python_output(python: str, tree: Path, env: dict, args: list[str]) -> str:
    return subprocess.run([python, *args], cwd=tree, env=env, capture_output=True, text=True, check=True).stdout


def pytest_run(tree: Path, python: str, env: dict, tests: list[str], label: str, extra=()) -> tuple[int, str]:
    """Run ``tests`` in the tree in one pytest process as verl's CPU CI does (``--asyncio-mode=auto``, plus
    ``extra`` arguments); print the summary line."""
    if not tests:
        print(f"--- {label}: none")
        return 0, ""
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--asyncio-mode=auto", "-rfE"]
    proc = subprocess.run([*cmd, *extra, *tests], cwd=tree, env=env, capture_output=True, text=True)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "(no output)"
    print(f"--- {label}: {len(tests)} files -> {summary}", flush=True)
    if proc.returncode != 0:
        print(proc.stdout[-8000:], proc.stderr[-3000:], sep="\n")
    return proc.returncode, proc.stdout


def _failing(stdout: str) -> set[str]:
    return set(re.findall(r"^(?:FAILED|ERROR) (\S+)", stdout, re.M))


def ci_order(files: list[str]) -> list[str]:
    """The order verl's CI (``pytest -x tests/``) reaches the files in: each directory's entries by name."""
    return sorted(files, key=lambda f: Path(f).parts)


def run_in_ci_order(tree: Path, pristine: Path, python: str, deps: Path, own: list[str], moved: list[str]) -> int:
    """verl's own tests and the moved ones in one process, in CI order, with ``-x`` and the stand-in probe (a
    module that leaves ``torch.cuda`` or Megatron changed fails). A failing test of verl's own that fails in
    unpatched verl too (this machine lacks one of verl's dependencies) is left out and the run repeated; any
    other failure fails."""
    env = isolated_env(tree, deps)
    left_out: list[str] = []
    while True:
        files = ci_order([f for f in [*own, *moved] if f not in left_out])  # a file that fails to import
        args = ["-x", "-p", PROBE, *(f"--deselect={t}" for t in left_out if "::" in t)]
        rc, stdout = pytest_run(tree, python, env, files, "verl's own + moved tests, CI order", args)
        print(*re.findall(r"^stand-in probe: .*$", stdout, re.M))
        failing = _failing(stdout)
        if rc == 0 or not failing or any(t.split("::")[0] not in own for t in failing):
            return rc
        files = sorted({t.split("::")[0] for t in failing})
        _, base = pytest_run(pristine, python, isolated_env(pristine, deps), files, "same files in unpatched verl")
        caused = failing - _failing(base)
        print(f"failing in the patched tree: {sorted(failing)}; caused by the change: {sorted(caused) or 'none'}")
        if caused:
            return 1
        left_out += sorted(failing)


def run_tests(tree: Path, pristine: Path, python: str, deps: Path, moved: list[str]) -> int:
    """The isolation proof, then verl's own CPU tests of the changed modules and the moved tests together."""
    env = isolated_env(tree, deps)
    proof = subprocess.run([python, "-c", PROOF, str(tree)], cwd=tree, env=env, text=True, capture_output=True)
    print(proof.stdout.strip() or proof.stderr[-3000:])
    if proof.returncode != 0:
        return proof.returncode
    own = verl_own_tests(tree, set(moved))
    print("verl's own CPU tests touching the changed modules:", *own, sep="\n  ")
    print("moved MTP-RL tests:", *moved, sep="\n  ", flush=True)
    return run_in_ci_order(tree, pristine, python, deps, own, moved)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="sdist", help="'sdist' (verl 0.9.1 from PyPI) or a bare git dir of verl")
    parser.add_argument("--out", type=Path, default=REPO / "build/verl-upstream")
    default_cache = os.environ.get("VERL_MTP_UPSTREAM_CACHE", "~/.cache/verl-mtp/upstream")
    parser.add_argument("--cache", type=Path, default=Path(default_cache).expanduser())
    parser.add_argument("--python", default=sys.executable, help="interpreter for the tests in the patched tree")
    parser.add_argument("--no-tests", action="store_true")
    args = parser.parse_args(argv)
    start = time.monotonic()

    pristine, tree = verl_source.fresh_copies(args.target, args.cache, args.out.resolve())
    layout = layout_mod.build_layout(REPO, tree)
    new = place_files(REPO, tree, layout)
    package_tests(REPO, tree, layout, new)
    docs_existed = verl_edits.apply_all(tree, REPO, layout)["docs/advance/mtp.md"]
    deps = test_deps(args.python, args.cache)
    env = isolated_env(tree, deps)
    generated = verl_edits.regenerate_reference_configs(tree, partial(_python_output, args.python, tree, env))
    findings = lint_new_files(tree, args.python, args.cache, new)
    rows = diff_report(pristine, tree, args.out.resolve())

    print(f"patched verl tree: {tree}\nwhole change: {args.out.resolve() / 'verl-mtp-rl.patch'}")
    print(f"new files: {len(new) + (0 if docs_existed else 1)}")
    print_diff_table(rows, generated)
    print(
        f"ruff (verl's settings) findings left in new files after --fix and format: {len(findings)}",
        *findings,
        sep="\n  ",
    )
    missing = license_findings(tree, new)
    print(
        "license headers (verl's check_license.py):",
        "not in this tree" if missing is None else missing or "all present",
    )
    leftovers = [d for d in new if re.search(r"\bverl_(mtp|cpu)\b", (tree / d).read_text())]
    print("files still naming verl_mtp/verl_cpu (prose only; imports are blocked):", leftovers or "none")

    moved = sorted(d for d in layout.files.values() if re.search(r"/test_[^/]*_on_cpu\.py$", d))
    rc = 0 if args.no_tests else run_tests(tree, pristine, args.python, deps, moved)
    print(f"{'PASSED' if rc == 0 else 'FAILED'} in {time.monotonic() - start:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
