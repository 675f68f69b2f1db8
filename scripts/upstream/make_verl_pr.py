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
CONFTEST_LINE = "from tests.mtp_rl_support.pytest_fixtures import *  # noqa: F401,F403\n"
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


def package_tests(repo: Path, tree: Path, layout, new: list[str], files: dict[Path, str]) -> None:
    """verl's test directories are packages; the moved tests get this repository's fixtures via conftest once the
    series has brought the helper package."""
    fixtures = tree / "tests/mtp_rl_support/pytest_fixtures.py"
    if (tree / "tests/mtp_rl_support/tiny_gpt.py").exists() and not fixtures.exists():
        fixtures.write_text(LICENSE_HEADER + layout.rewrite((repo / "tests/conftest.py").read_text()))
        new.append("tests/mtp_rl_support/pytest_fixtures.py")
    test_dirs = {(tree / d).parent for d in files.values() if d.startswith("tests/")}
    for test_dir in sorted(test_dirs):
        for pkg in [test_dir, *test_dir.parents]:
            if pkg == tree / "tests" or tree not in pkg.parents:
                break
            if not (pkg / "__init__.py").exists():
                (pkg / "__init__.py").write_text(LICENSE_HEADER)
                new.append(str((pkg / "__init__.py").relative_to(tree)))
        conftest = test_dir / "conftest.py"
        if test_dir.name != "mtp_rl_support" and fixtures.exists():
            text = conftest.read_text() if conftest.exists() else LICENSE_HEADER + "\n"
            if not conftest.exists():
                new.append(str(conftest.relative_to(tree)))
            if CONFTEST_LINE not in text:
                conftest.write_text(text + CONFTEST_LINE)


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
assert MtpConfig(enable=True, mtp_loss_type="rl").is_rl
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


def pytest_run(tree: Path, python: str, env: dict, tests: list[str], label: str) -> tuple[int, str]:
    """Run ``tests`` in the tree as verl's CPU CI does (``--asyncio-mode=auto``); print the summary line."""
    if not tests:
        print(f"--- {label}: none")
        return 0, ""
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--asyncio-mode=auto", "-rfE"]
    cmd.append("--continue-on-collection-errors")
    proc = subprocess.run([*cmd, *tests], cwd=tree, env=env, capture_output=True, text=True)
    print(f"--- {label}: {len(tests)} files -> {_summary(proc.stdout)}", flush=True)
    if proc.returncode != 0:
        print(proc.stdout[-8000:], proc.stderr[-3000:], sep="\n")
    return proc.returncode, proc.stdout


def _summary(stdout: str) -> str:
    """pytest's last line (counts and time)."""
    return stdout.strip().splitlines()[-1] if stdout.strip() else "(no output)"


def _failing(stdout: str) -> set[str]:
    return set(re.findall(r"^(?:FAILED|ERROR) (\S+)", stdout, re.M))


def run_verl_own_tests(
    tree: Path, pristine: Path, python: str, env: dict, deps: Path, tests: list[str], label: str
) -> tuple[int, str]:
    """verl's own tests in the patched tree, and pytest's summary; a failure counts only if the same test passes
    in unpatched verl (the patch broke it), not if it fails there too (this machine lacks one of verl's
    dependencies)."""
    rc, stdout = pytest_run(tree, python, env, tests, label)
    if rc == 0:
        return 0, _summary(stdout)
    failing = _failing(stdout)
    files = sorted({test_id.split("::")[0] for test_id in failing})
    _, base_stdout = pytest_run(pristine, python, isolated_env(pristine, deps), files, "same files in unpatched verl")
    caused = failing - _failing(base_stdout)
    print(
        f"failing in the patched tree: {len(failing)}; failing in unpatched verl too: {len(failing - caused)};",
        f"caused by the change: {sorted(caused) or 'none'}",
    )
    return (1 if caused or not failing else 0), _summary(stdout)


def run_tests(tree: Path, pristine: Path, python: str, deps: Path, step, all_moved: set[str]) -> dict:
    """verl's own CPU tests of the changed modules (not the series' tests, ``all_moved``), then the step's own
    tests, in the step's tree; at the last step first the isolation proof. Returns label -> pytest's summary
    line, and "rc"."""
    moved, label = step.moved, step.label
    env = isolated_env(tree, deps)
    if step.number == len(series.SERIES):
        done = subprocess.run([python, "-c", PROOF, str(tree)], cwd=tree, env=env, text=True, capture_output=True)
        print(done.stdout.strip() or done.stderr[-3000:])
        if done.returncode != 0:
            return {"rc": done.returncode}
    own = verl_own_tests(tree, all_moved)
    print(f"{label}: verl's own CPU tests touching the changed modules:", *own, sep="\n  ")
    print(f"{label}: its MTP-RL tests:", *moved, sep="\n  ", flush=True)
    rc_own, own_summary = run_verl_own_tests(tree, pristine, python, env, deps, own, f"{label}: verl's own tests")
    rc_moved, stdout = pytest_run(tree, python, env, moved, f"{label}: its MTP-RL tests")
    results = {"verl's own tests": own_summary if own else None, "its tests": _summary(stdout) if moved else None}
    return {**results, "rc": rc_own or rc_moved}


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
        all_moved = {test for step in steps for test in step.moved}
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
