"""Generate the upstream PR into verl from this repository, apply it to verl's tree and test it there on CPU.

    python scripts/upstream/make_verl_pr.py [--target sdist|GIT_DIR] [--out DIR] [--cache DIR] [--no-tests]

1. verl's tree: the verl 0.9.1 source distribution from PyPI (cached in ``--cache``), or a bare git mirror
   of verl (``--target /path/to/git-dir``, exported with ``git archive``).
2. The product's modules at verl's paths, imports rewritten (:mod:`layout`); the integration as edits of
   verl's own files (:mod:`verl_edits`); the MTP-RL tests under verl's ``tests/`` with their test-only
   helpers in ``tests/mtp_rl_support``.
3. ``OUT/verl-mtp-rl.patch`` (the whole change) and the size of the change to verl's pre-existing files.
4. In the patched tree, with this repository's packages blocked (``isolation/sitecustomize.py``): verl's own
   CPU tests that touch the changed modules, then the moved tests. Exit status 0 only if both pass.
"""

from __future__ import annotations

import argparse
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
CONFTEST_LINE = "from tests.mtp_rl_support.pytest_fixtures import *  # noqa: F401,F403\n"
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


def package_tests(repo: Path, tree: Path, layout, new: list[str]) -> None:
    """verl's test directories are packages; the moved tests get this repository's fixtures via conftest."""
    fixtures = tree / "tests/mtp_rl_support/pytest_fixtures.py"
    fixtures.write_text(LICENSE_HEADER + layout.rewrite((repo / "tests/conftest.py").read_text()))
    new.append("tests/mtp_rl_support/pytest_fixtures.py")
    test_dirs = {(tree / d).parent for d in layout.files.values() if d.startswith("tests/")}
    for test_dir in sorted(test_dirs):
        for pkg in [test_dir, *test_dir.parents]:
            if pkg == tree / "tests" or tree not in pkg.parents:
                break
            if not (pkg / "__init__.py").exists():
                (pkg / "__init__.py").write_text(LICENSE_HEADER)
                new.append(str((pkg / "__init__.py").relative_to(tree)))
        conftest = test_dir / "conftest.py"
        if test_dir.name != "mtp_rl_support":
            text = conftest.read_text() if conftest.exists() else LICENSE_HEADER + "\n"
            if not conftest.exists():
                new.append(str(conftest.relative_to(tree)))
            conftest.write_text(text + CONFTEST_LINE)


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


def pytest_run(tree: Path, python: str, env: dict, tests: list[str], label: str) -> tuple[int, str]:
    """Run ``tests`` in the tree as verl's CPU CI does (``--asyncio-mode=auto``); print the summary line."""
    if not tests:
        print(f"--- {label}: none")
        return 0, ""
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--asyncio-mode=auto", "-rfE"]
    cmd.append("--continue-on-collection-errors")
    proc = subprocess.run([*cmd, *tests], cwd=tree, env=env, capture_output=True, text=True)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "(no output)"
    print(f"--- {label}: {len(tests)} files -> {summary}", flush=True)
    if proc.returncode != 0:
        print(proc.stdout[-8000:], proc.stderr[-3000:], sep="\n")
    return proc.returncode, proc.stdout


def _failing(stdout: str) -> set[str]:
    return set(re.findall(r"^(?:FAILED|ERROR) (\S+)", stdout, re.M))


def run_verl_own_tests(tree: Path, pristine: Path, python: str, env: dict, deps: Path, tests: list[str]) -> int:
    """verl's own tests in the patched tree; a failure counts only if the same test passes in unpatched verl
    (the patch broke it), not if it fails there too (this machine lacks one of verl's dependencies)."""
    rc, stdout = pytest_run(tree, python, env, tests, "verl's own tests")
    if rc == 0:
        return 0
    failing = _failing(stdout)
    files = sorted({test_id.split("::")[0] for test_id in failing})
    _, base_stdout = pytest_run(pristine, python, isolated_env(pristine, deps), files, "same files in unpatched verl")
    caused = failing - _failing(base_stdout)
    print(
        f"failing in the patched tree: {len(failing)}; failing in unpatched verl too: {len(failing - caused)};",
        f"caused by the change: {sorted(caused) or 'none'}",
    )
    return 1 if caused or not failing else 0


def run_tests(tree: Path, pristine: Path, python: str, deps: Path, moved: list[str]) -> int:
    """The isolation proof, then verl's own CPU tests of the changed modules, then the moved tests."""
    env = isolated_env(tree, deps)
    proof = subprocess.run([python, "-c", PROOF, str(tree)], cwd=tree, env=env, text=True, capture_output=True)
    print(proof.stdout.strip() or proof.stderr[-3000:])
    if proof.returncode != 0:
        return proof.returncode
    own = verl_own_tests(tree, set(moved))
    print("verl's own CPU tests touching the changed modules:", *own, sep="\n  ")
    print("moved MTP-RL tests:", *moved, sep="\n  ", flush=True)
    rc_own = run_verl_own_tests(tree, pristine, python, env, deps, own)
    rc_moved, _ = pytest_run(tree, python, env, moved, "moved MTP-RL tests")
    return rc_own or rc_moved


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
