"""Generate the upstream change into verl from this repository as a series of pull requests, apply them one by
one to verl's tree and test each there on CPU.

    python scripts/upstream/make_verl_pr.py [--target sdist|GIT_DIR] [--out DIR] [--cache DIR] [--no-tests]
                                            [--doc docs/upstream_pr.md]

1. verl's tree: the verl 0.9.1 source distribution from PyPI (cached in ``--cache``), or a bare git mirror
   of verl (``--target /path/to/git-dir``, exported with ``git archive``).
2. For each pull request of :data:`series.SERIES`, in order: its files of this repository at verl's paths,
   imports rewritten (:mod:`layout`), its integration edits of verl's own files (:mod:`verl_edits`), its tests
   under verl's ``tests/`` with their test-only helpers in ``tests/mtp_rl_support`` (each test module imports
   the fixtures it uses: no conftest.py); the tree after it (``OUT/steps/NN-name``) and its patch
   (``OUT/series/NN-name.patch``).
3. ``OUT/verl-mtp-rl.patch`` (the whole series), the size of each pull request and of the edit of verl's
   pre-existing files; the example launch script composed with verl's config; ``--doc``: the series' section
   of that file rewritten (:mod:`series_doc`).
4. In each step's tree, with this repository's packages blocked (``isolation/sitecustomize.py``) and on the
   megatron-core version ``VERL_MTP_MCORE`` names: verl's own CPU tests that touch the changed modules and the
   pull request's tests in one pytest process, in the order and with the ``-x`` of verl's CPU CI, with a plugin
   that fails any test module leaving ``torch.cuda`` or Megatron changed; after the last, verl's own and every
   moved test in one process. Exit status 0 only if all pass.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import os
import re
import subprocess
import sys
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import layout as layout_mod
import series
import series_doc
import verl_edits
import verl_source

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ISOLATION = HERE / "isolation"
# verl's header for a contribution by individuals, as on its 2025 files (``Copyright 2025 Individual
# Contributor: <name>``, the form verl's tests/special_sanity/check_license.py accepts) with the Apache text.
LICENSE_HEADER = """\
# Copyright 2025 Individual Contributor: the MTP-RL authors
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
# What the plugin's own prose says that verl's would not: its package names, "ours", "the product".
LEFTOVER = re.compile(r"\bverl[-_](?:mtp|cpu)\b|\bours\b|\bthe product\b|\bproduct's\b|\bupstream form\b", re.I)
CACHES = {"__pycache__", ".ruff_cache", ".pytest_cache", ".hypothesis"}
# The moved tests' fixture and warning filters (tests/support/pytest_fixtures.py), imported by each moved module
# that uses them: verl's CI runs all of tests/ in one process, and a conftest.py would reach verl's own tests.
FIXTURES = f"{layout_mod.HELPER_PACKAGE}.pytest_fixtures"
FIXTURE_NAMES = ("cpu_megatron",)
WARNING_FILTERS = "MCORE_WARNING_FILTERS"
# The plugin that fails a test module which leaves the process changed (tests/support/stand_in_probe.py).
PROBE = f"{layout_mod.HELPER_PACKAGE}.stand_in_probe"
# The labels of the test runs: each pull request's, and verl's CI after the whole series.
CI_RUN = "verl's own + its tests, CI order"
WHOLE_RUN = "whole series: verl's own + every moved test, CI order"
# verl modules the integration edits: verl's own CPU tests that name one of them are run too.
CHANGED_MODULES = ("verl.workers.config", "verl.workers.engine", "verl.trainer.config", "MtpConfig", "hf_model")


def _is_testing_init(src: Path) -> bool:
    return src == Path(*layout_mod.TESTING.split("."), "__init__.py")


def place_files(repo: Path, tree: Path, layout, files: dict[Path, str]) -> list[str]:
    """Copy ``files`` (laid-out source -> destination) with their imports rewritten; returns the new paths."""
    new = []
    for src, dest in sorted(files.items()):
        target = tree / dest
        if target.exists():
            raise FileExistsError(f"{dest} already exists in verl's tree (layout clash for {src})")
        target.parent.mkdir(parents=True, exist_ok=True)
        text = layout_mod.TESTING_INIT_TEXT if _is_testing_init(src) else layout.rewrite((repo / src).read_text())
        target.write_text(LICENSE_HEADER + text)
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


def package_tests(repo: Path, tree: Path, layout, new: list[str], files: dict[Path, str]) -> None:
    """verl's test directories are packages; each moved test module imports this repository's fixtures and
    warning filters by name (no conftest.py: verl's other tests in those directories stay as they were), from the
    pull request that brings the tiny model on."""
    fixtures = tree / "tests/mtp_rl_support/pytest_fixtures.py"
    if (tree / "tests/mtp_rl_support/tiny_gpt.py").exists() and not fixtures.exists():
        fixtures.write_text(LICENSE_HEADER + layout.rewrite((repo / "tests/support/pytest_fixtures.py").read_text()))
        new.append("tests/mtp_rl_support/pytest_fixtures.py")
    for dest in files.values():
        if not re.match(r"tests/.*/test_[^/]*_on_cpu\.py$", dest):
            continue
        text = (tree / dest).read_text()
        if fixtures.exists():
            (tree / dest).write_text(with_fixture_imports(text))
        elif any(re.search(rf"\b{name}\b", text) for name in FIXTURE_NAMES):
            raise ValueError(f"{dest} uses a fixture of {FIXTURES}, which a later pull request of the series brings")
    test_dirs = {(tree / d).parent for d in files.values() if d.startswith("tests/")}
    for test_dir in sorted(test_dirs):
        for pkg in [test_dir, *test_dir.parents]:
            if pkg == tree / "tests" or tree not in pkg.parents:
                break
            if not (pkg / "__init__.py").exists():
                (pkg / "__init__.py").write_text(LICENSE_HEADER)
                new.append(str((pkg / "__init__.py").relative_to(tree)))


def diff_trees(old_tree: Path, tree: Path) -> tuple[str, list[tuple[str, int, int, bool]]]:
    """The unified diff from ``old_tree`` to ``tree``, and per changed file (path, added, removed, existed)."""
    rows, chunks = [], []
    for path in sorted(p for p in tree.rglob("*") if p.is_file() and not CACHES & set(p.parts)):
        rel = str(path.relative_to(tree))
        old_path = old_tree / rel
        if old_path.exists() and old_path.read_bytes() == path.read_bytes():
            continue
        old = old_path.read_text().splitlines(keepends=True) if old_path.exists() else []
        new = path.read_text().splitlines(keepends=True)
        lines = list(difflib.unified_diff(old, new, f"a/{rel}" if old_path.exists() else "/dev/null", f"b/{rel}"))
        chunks += lines
        added = sum(1 for x in lines if x.startswith("+") and not x.startswith("+++"))
        removed = sum(1 for x in lines if x.startswith("-") and not x.startswith("---"))
        rows.append((rel, added, removed, old_path.exists()))
    return "".join(chunks), rows


def print_diff_table(rows: list[tuple[str, int, int, bool]], generated: list[str]) -> None:
    print("diff to verl's pre-existing files (lines added / removed):")
    totals = {"edited": [0, 0], "generated": [0, 0]}
    for rel, added, removed, existed in rows:
        if not existed:
            continue
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


def mcore_overlay() -> list[str]:
    """The megatron-core version ``VERL_MTP_MCORE`` names, from where this repository's test commands install it
    (``scripts/venv_path.sh --overlay``; nothing for the default version)."""
    venv_path = REPO / "scripts/venv_path.sh"
    overlay = subprocess.run(["bash", str(venv_path), "--overlay"], capture_output=True, text=True, check=True)
    path = overlay.stdout.strip()
    if path and not Path(path).is_dir():
        raise FileNotFoundError(f"{path} does not exist: VERL_MTP_MCORE=<version> bash scripts/setup_env.sh installs it")
    return [path] if path else []


def isolated_env(tree: Path, deps: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *mcore_overlay(), str(ISOLATION), str(deps)])
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
assert MtpConfig(enable=True, enable_train=True, mtp_loss_type="rl").is_rl
assert not any(m.split(".")[0] in ("verl_mtp", "verl_cpu") for m in sys.modules), "local package imported"
try:
    import verl_mtp
except ModuleNotFoundError:
    print(f"isolation: verl from {verl.__file__}; engine {cls.__qualname__}; verl_mtp not importable")
else:
    raise SystemExit("verl_mtp is importable in the upstream tree's run")
"""


EXAMPLE_CHECK = """
import re, sys
from hydra import compose, initialize_config_module
from verl.utils.config import omega_conf_to_dataclass
text = open(sys.argv[1]).read()
args = [a.strip("'\\"").replace("${DATA_HOME}", "/data") for a in re.findall(r"^    (\\S.*?) \\\\$", text, re.M)]
with initialize_config_module(config_module="verl.trainer.config", version_base=None):
    cfg = compose(config_name="ppo_megatron_trainer", overrides=args)
mtp = omega_conf_to_dataclass(cfg.actor_rollout_ref.model.mtp)
assert mtp.is_rl and mtp.occ.enable, mtp
print(f"example: {len(args)} overrides compose with verl's ppo_megatron_trainer (mtp_loss_type={mtp.mtp_loss_type}, "
      f"occ.enable={mtp.occ.enable})")
"""


def check_example(tree: Path, python: str, env: dict) -> int:
    """The example launch script's overrides compose with verl's own config into an ``rl`` + OCC ``MtpConfig``."""
    done = subprocess.run([python, "-c", EXAMPLE_CHECK, verl_edits.EXAMPLE], cwd=tree, env=env, capture_output=True,
                          text=True)
    print(done.stdout.strip() or f"example: does not compose\n{done.stderr[-3000:]}")
    return done.returncode


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
    print(f"--- {label}: {len(tests)} files -> {_summary(proc.stdout)}", flush=True)
    if proc.returncode != 0:
        print(proc.stdout[-8000:], proc.stderr[-3000:], sep="\n")
    return proc.returncode, proc.stdout


def _summary(stdout: str) -> str:
    """pytest's last line (counts and time)."""
    return stdout.strip().splitlines()[-1] if stdout.strip() else "(no output)"


def _failing(stdout: str) -> set[str]:
    return set(re.findall(r"^(?:FAILED|ERROR) (\S+)", stdout, re.M))


def ci_order(files: list[str]) -> list[str]:
    """The order verl's CI (``pytest -x tests/``) reaches the files in: each directory's entries by name."""
    return sorted(files, key=lambda f: Path(f).parts)


def _probe(tree: Path) -> list[str]:
    """pytest's arguments loading the stand-in probe, once the series has brought it."""
    return ["-p", PROBE] if (tree / Path(*PROBE.split("."))).with_suffix(".py").exists() else []


def run_in_ci_order(
    tree: Path, pristine: Path, python: str, deps: Path, own: list[str], moved: list[str], label: str
) -> tuple[int, str]:
    """verl's own tests and the moved ones in one process, in CI order, with ``-x`` and the stand-in probe (a
    module that leaves ``torch.cuda`` or Megatron changed fails), and pytest's summary. A failing test of verl's
    own that fails in unpatched verl too (this machine lacks one of verl's dependencies) is left out and the run
    repeated; any other failure fails."""
    env = isolated_env(tree, deps)
    probe = _probe(tree) if moved else []  # it checks the moved tests only: verl's own leaks are verl's to judge
    left_out: list[str] = []
    while True:
        files = ci_order([f for f in [*own, *moved] if f not in left_out])  # a file that fails to import
        only = [f"--stand-in-probe-only={','.join(moved)}"] if probe else []
        args = ["-x", *probe, *only, *(f"--deselect={t}" for t in left_out if "::" in t)]
        rc, stdout = pytest_run(tree, python, env, files, label, args)
        print(*re.findall(r"^stand-in probe: .*$", stdout, re.M))
        failing = _failing(stdout)
        if rc == 0 or not failing or any(t.split("::")[0] not in own for t in failing):
            return rc, _summary(stdout)
        files = sorted({t.split("::")[0] for t in failing})
        _, base = pytest_run(pristine, python, isolated_env(pristine, deps), files, "same files in unpatched verl")
        caused = failing - _failing(base)
        print(f"failing in the patched tree: {sorted(failing)}; caused by the change: {sorted(caused) or 'none'}")
        if caused:
            return 1, _summary(stdout)
        left_out += sorted(failing)


def run_tests(tree: Path, pristine: Path, python: str, deps: Path, step, all_moved: list[str]) -> dict:
    """In the step's tree: verl's own CPU tests of the changed modules (not the series' tests, ``all_moved``) and
    the step's own tests, in one process in CI order. At the last step also the isolation proof, then verl's own
    and every moved test in one process, as verl's CI runs the tree after the whole series. Returns the runs'
    summaries ("ci", "whole") and "rc"."""
    own = verl_own_tests(tree, set(all_moved))
    print(f"{step.label}: verl's own CPU tests touching the changed modules:", *own, sep="\n  ")
    print(f"{step.label}: its MTP-RL tests:", *step.moved, sep="\n  ", flush=True)
    rc, summary = run_in_ci_order(tree, pristine, python, deps, own, step.moved, f"{step.label}: {CI_RUN}")
    results = {"rc": rc, "ci": summary, "own": len(own), "probe": bool(step.moved and _probe(tree))}
    if step.number == len(series.SERIES) and rc == 0:
        env = isolated_env(tree, deps)
        done = subprocess.run([python, "-c", PROOF, str(tree)], cwd=tree, env=env, text=True, capture_output=True)
        print(done.stdout.strip() or done.stderr[-3000:])
        if done.returncode != 0:
            return {**results, "rc": done.returncode}
        rc, results["whole"] = run_in_ci_order(tree, pristine, python, deps, own, all_moved, WHOLE_RUN)
        results["rc"] = rc
    return results


@dataclass
class Step:
    """One pull request of the series, built on the previous ones: its tree (a snapshot) and its change."""

    number: int
    pr: series.PullRequest
    tree: Path
    new: list[str]
    moved: list[str]
    rows: list[tuple[str, int, int, bool]]
    results: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"PR {self.number} ({self.pr.slug})"


def build_series(args, pristine: Path, tree: Path, layout) -> list[Step]:
    """Apply the series to ``tree`` one pull request at a time; snapshot each step and write its patch."""
    owner = series.assign(layout, REPO)
    deps = test_deps(args.python, args.cache)
    out = args.out.resolve()
    (out / "series").mkdir(parents=True, exist_ok=True)
    steps, previous = [], pristine
    for number, pr in enumerate(series.SERIES, 1):
        files = {src: dest for src, dest in layout.files.items() if owner[src] == number - 1}
        new = place_files(REPO, tree, layout, files)
        package_tests(REPO, tree, layout, new, files)
        for edit in pr.edits:
            verl_edits.EDITS[edit](tree, REPO, layout, files)
        if "config" in pr.edits:
            run_python = partial(_python_output, args.python, tree, isolated_env(tree, deps))
            verl_edits.regenerate_reference_configs(tree, run_python)
        lint_new_files(tree, args.python, args.cache, new)
        snapshot = out / "steps" / f"{number:02d}-{pr.slug}"
        shutil.copytree(tree, snapshot, ignore=shutil.ignore_patterns(*CACHES))
        patch, rows = diff_trees(previous, snapshot)
        (out / "series" / f"{number:02d}-{pr.slug}.patch").write_text(patch)
        moved = sorted(d for d in files.values() if re.search(r"/test_[^/]*_on_cpu\.py$", d))
        steps.append(Step(number, pr, snapshot, new, moved, rows))
        previous = snapshot
    return steps


def print_series(steps: list[Step]) -> None:
    """Per pull request: its title and size."""
    print(f"series: {len(steps)} pull requests, each applied on the previous ones")
    for step in steps:
        print(f"  {step.label}: {step.pr.title}\n    {series_doc.size_line(step.rows)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="sdist", help="'sdist' (verl 0.9.1 from PyPI) or a bare git dir of verl")
    parser.add_argument("--out", type=Path, default=REPO / "build/verl-upstream")
    default_cache = os.environ.get("VERL_MTP_UPSTREAM_CACHE", "~/.cache/verl-mtp/upstream")
    parser.add_argument("--cache", type=Path, default=Path(default_cache).expanduser())
    parser.add_argument("--python", default=sys.executable, help="interpreter for the tests in the patched tree")
    parser.add_argument("--no-tests", action="store_true")
    parser.add_argument("--doc", type=Path, help="write the series' description into this file's generated section")
    args = parser.parse_args(argv)
    start = time.monotonic()

    pristine, tree = verl_source.fresh_copies(args.target, args.cache, args.out.resolve())
    layout = layout_mod.build_layout(REPO, tree)
    steps = build_series(args, pristine, tree, layout)
    report_whole_change(args, pristine, tree, [d for step in steps for d in step.new])
    print_series(steps)
    rc = check_example(tree, args.python, isolated_env(tree, test_deps(args.python, args.cache)))
    if not args.no_tests:
        deps = test_deps(args.python, args.cache)
        version = "import megatron.core as m; print(m.__version__)"
        print("tests on megatron-core", _python_output(args.python, tree, isolated_env(tree, deps), ["-c", version]).strip())
        all_moved = [test for step in steps for test in step.moved]
        for step in steps:
            step.results = run_tests(step.tree, pristine, args.python, deps, step, all_moved)
            rc = rc or step.results["rc"]
    if args.doc:
        series_doc.write(args.doc, steps, tested=not args.no_tests)
    print(f"{'PASSED' if rc == 0 else 'FAILED'} in {time.monotonic() - start:.0f} s")
    return rc


def report_whole_change(args, pristine: Path, tree: Path, new: list[str]) -> None:
    """The whole series as one patch, the edit of verl's pre-existing files, lint, licence and leftovers."""
    out = args.out.resolve()
    patch, rows = diff_trees(pristine, tree)
    (out / "verl-mtp-rl.patch").write_text(patch)
    generated = [rel for rel, *_ in rows if "/_generated_" in rel]
    print(f"patched verl tree: {tree}\nwhole change: {out / 'verl-mtp-rl.patch'}")
    print(f"new files: {sum(1 for row in rows if not row[3])}")
    print_diff_table(rows, generated)
    findings = lint_new_files(tree, args.python, args.cache, new)
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
    leftovers = {d: sorted(set(LEFTOVER.findall((tree / d).read_text()))) for d in new}
    leftovers = {d: words for d, words in leftovers.items() if words}
    print("plugin words left in new files (verl_mtp, verl-mtp, ours, product, upstream form):", leftovers or "none")


if __name__ == "__main__":
    sys.exit(main())
