"""The upstream form of this project (a patch of verl's own tree) is generated, applies and passes its tests.

``scripts/upstream/make_verl_pr.py`` places the product's modules at verl's paths, edits verl's own files for
the integration and moves the MTP-RL tests under verl's ``tests/``; these tests run it on verl's source
distribution (downloaded once into ``VERL_MTP_UPSTREAM_CACHE``, default ``~/.cache/verl-mtp/upstream``).
The first checks the generated change; the second (long: the whole moved test suite) runs verl's own CPU
tests of the changed modules and the moved tests inside the patched tree in one process in verl's CI order,
with this repository's packages unimportable and every test module checked to leave the process unchanged.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import series_doc  # the generator's own modules (pyproject's pytest pythonpath: scripts/upstream)
from series import SERIES

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts/upstream/make_verl_pr.py"
DOC = "docs/upstream_pr.md"
DEFAULT_MCORE = subprocess.run(
    ["bash", str(REPO / "scripts/venv_path.sh"), "--default-mcore"], capture_output=True, text=True, check=True
).stdout.strip()
# The integration edits of verl's pre-existing code: two exports, the MTP-RL fields of ``MtpConfig`` (with their
# documentation and imports) and the engine's hook calls in ``MegatronEngineWithLMHead``; a change that needs
# more is a change of the upstream form and should be reviewed as such. Nothing of verl's is removed. verl's
# model YAML only gains the MTP-RL keys, however many keys there are. (102 with use_fused_kernels under MTP: the
# engine's logits processor hands verl's five switches to the fused main head, one per line.)
MAX_EDITED_CODE_LINES = 110
ENGINE = "verl/workers/engine/megatron/transformer_impl.py"
# Every line the engine edit adds calls a hook, calls verl's own method, or declares the method that does.
HOOK_LINE = re.compile(r"mtp_engine_hooks|super\(\)|^\s*(def \w+\(|@property$|return$)")  # return: a hook's guard
MODEL_YAML = "verl/trainer/config/model/hf_model.yaml"


def _generate(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *extra], capture_output=True, text=True, cwd=REPO
    )


def _edited_files(stdout: str) -> dict[str, tuple[int, int]]:
    rows = re.findall(r"^  (\S+): \+(\d+) -(\d+)$", stdout, re.M)
    return {path: (int(a), int(r)) for path, a, r in rows if path != "total"}


def _added_lines(patch: str, path: str) -> list[str]:
    """The logical lines the patch adds to ``path`` (without the leading ``+``): a call split over several lines
    by the formatter is one line."""
    section = patch.split(f"+++ b/{path}\n", 1)[1].split("\n--- ", 1)[0]
    logical, open_parens = [], 0
    for line in (line[1:] for line in section.splitlines() if line.startswith("+")):
        if open_parens:
            logical[-1] += " " + line.strip()
        else:
            logical.append(line)
        open_parens += line.count("(") - line.count(")")
    return logical


def test_upstream_patch_is_generated_with_a_small_edit_of_verl_files(tmp_path):
    proc = _generate(tmp_path, "--no-tests")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    edited = _edited_files(proc.stdout)
    assert set(edited) >= {
        MODEL_YAML,
        "verl/workers/config/__init__.py",
        "verl/workers/config/model.py",
        ENGINE,
    }, proc.stdout
    code = {path: lines for path, lines in edited.items() if path.endswith(".py")}
    assert sum(a + r for a, r in code.values()) <= MAX_EDITED_CODE_LINES, proc.stdout
    assert all(r == 0 for _, r in edited.values()), proc.stdout
    added = _added_lines((tmp_path / "verl-mtp-rl.patch").read_text(), ENGINE)
    assert added and all(HOOK_LINE.search(line) for line in added if line.strip()), added  # only hook calls
    tree = next((tmp_path / "patched").iterdir())
    model = (tree / "verl/workers/config/model.py").read_text()
    assert re.search(r"class MtpConfig\(BaseConfig\):(.|\n)*    mtp_loss_type: Optional\[str\] = None", model)
    assert "class MtpConfig" not in (tree / "verl/workers/config/mtp.py").read_text()
    for path in tree.rglob("*.py"):  # no import of this repository's packages is left anywhere in the tree
        assert not re.search(r"^\s*(from|import) (verl_mtp|verl_cpu|support)\b", path.read_text(), re.M), path
    assert (tmp_path / "verl-mtp-rl.patch").stat().st_size > 0
    assert re.search(r"^example: \d+ overrides compose with verl's ppo_megatron_trainer", proc.stdout, re.M)
    assert _undocumented_yaml_keys(_added_lines((tmp_path / "verl-mtp-rl.patch").read_text(), MODEL_YAML)) == []
    assert not re.search(r"^\+\+\+ b/\S*conftest\.py$", (tmp_path / "verl-mtp-rl.patch").read_text(), re.M)
    pristine = tmp_path / "pristine" / tree.name
    moved = [p for p in (tree / "tests").rglob("test_*_on_cpu.py") if not (pristine / p.relative_to(tree)).exists()]
    assert len(moved) > 10, moved
    for path in moved:  # each moved module that uses the CPU fixture imports it by name
        text = path.read_text()
        assert "cpu_megatron" not in text or re.search(r"pytest_fixtures import [^\n]*\bcpu_megatron\b", text), path
    _assert_series_applies_in_order(tmp_path, tree)


def _undocumented_yaml_keys(lines: list[str]) -> list[str]:
    """The keys of verl's documented config style that break it: every key has a comment line right above it, no
    comment after it on its line, and a blank line after it (verl's config-docs test for its trainer YAMLs)."""
    bad = []
    for i, line in enumerate(lines):
        if not re.match(r"^\s*\w+:", line):
            continue
        above = lines[i - 1].strip() if i else ""
        below = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if not above.startswith("#") or "#" in line.split(":", 1)[1] or below:
            bad.append(line.strip())
    return bad


def _files(root: Path) -> dict[str, bytes]:
    caches = {"__pycache__", ".pytest_cache", ".ruff_cache"}
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and not caches & set(p.parts)}


def _assert_series_applies_in_order(out: Path, tree: Path) -> None:
    """verl's tree plus the series' patches, applied one after the other with ``patch``, is the patched tree; and
    every step's snapshot is exactly the previous one plus its own patch."""
    patches = sorted((out / "series").glob("*.patch"))
    steps = sorted((out / "steps").iterdir())
    assert len(patches) == len(steps) == len(SERIES) > 1, patches
    work = out / "applied"
    shutil.copytree(next((out / "pristine").iterdir()), work)
    for patch, step in zip(patches, steps):
        done = subprocess.run(["patch", "-p1", "-s", "-f", "-i", str(patch)], cwd=work, capture_output=True, text=True)
        assert done.returncode == 0, (patch.name, done.stdout, done.stderr)
        assert _files(work) == _files(step), patch.name
    assert _files(work) == _files(tree)


def test_upstream_pr_doc_is_the_generators_output(tmp_path):
    """docs/upstream_pr.md's series section is what the generator writes now (test results aside: the slow test
    checks those are the ones the doc states)."""
    doc = tmp_path / "upstream_pr.md"
    shutil.copy(REPO / DOC, doc)
    proc = _generate(tmp_path / "out", "--no-tests", "--doc", str(doc))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    def without_test_lines(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith(series_doc.TEST_LINE)]

    assert without_test_lines(doc.read_text()) == without_test_lines((REPO / DOC).read_text()), (
        "docs/upstream_pr.md is stale: run python scripts/upstream/make_verl_pr.py --doc docs/upstream_pr.md"
    )


@pytest.mark.slow  # the fast tier's model, worker and trainer tests once more, in verl's tree
def test_upstream_tree_passes_verl_and_moved_tests(tmp_path):
    """Long (it runs every moved MTP-RL test once, each in the tree of the pull request that brings it): after each
    pull request of the series, verl's own CPU tests of the changed modules and that pull request's tests pass,
    and the results are the ones docs/upstream_pr.md states."""
    doc = tmp_path / "upstream_pr.md"
    shutil.copy(REPO / DOC, doc)
    proc = _generate(tmp_path / "out", "--doc", str(doc))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-12000:]
    isolation = r"^isolation: verl from .*; engine MegatronEngineWithLMHead; verl_mtp not importable$"
    assert re.search(isolation, out, re.M)
    mcore = os.environ.get("VERL_MTP_MCORE", DEFAULT_MCORE)
    # an overlay built from the sdist inside this checkout carries its commit as a local version (0.18.0+<sha>)
    assert re.search(rf"^tests on megatron-core {re.escape(mcore)}(\+[0-9a-f]+)?$", out, re.M), out[-4000:]
    runs = dict(re.findall(r"^--- (PR \d+ \(\S+\)): verl's own \+ its tests, CI order: \d+ files -> (.*)$", out, re.M))
    assert len(runs) == len(SERIES), out[-4000:]
    runs["whole"] = re.findall(r"^--- whole series: verl's own \+ every moved test, CI order: \d+ files -> (.*)$", out, re.M)[-1]
    for label, summary in runs.items():
        assert re.search(r"\d+ passed", summary) and not re.search(r"failed|error", summary), (label, summary)
    probe = re.findall(r"^stand-in probe: (\d+) test modules checked$", out, re.M)
    assert probe and int(probe[-1]) > 10, out[-4000:]
    assert out.rstrip().splitlines()[-1].startswith("PASSED")
    if os.environ.get("VERL_MTP_MCORE", DEFAULT_MCORE) != DEFAULT_MCORE:
        return  # the doc states the results on the default version; on another the tests above must pass
    tests = [line for line in doc.read_text().splitlines() if line.startswith(series_doc.TEST_LINE)]
    stated = [line for line in (REPO / DOC).read_text().splitlines() if line.startswith(series_doc.TEST_LINE)]
    assert tests == stated, "docs/upstream_pr.md states other results: rerun make_verl_pr.py --doc docs/upstream_pr.md"
