"""The upstream form of this project (a patch of verl's own tree) is generated, applies and passes its tests.

``scripts/upstream/make_verl_pr.py`` places the product's modules at verl's paths, edits verl's own files for
the integration and moves the MTP-RL tests under verl's ``tests/``; these tests run it on verl's source
distribution (downloaded once into ``VERL_MTP_UPSTREAM_CACHE``, default ``~/.cache/verl-mtp/upstream``).
The first checks the generated change; the second (long: the whole moved test suite) runs verl's own CPU
tests of the changed modules and the moved tests inside the patched tree in one process in verl's CI order,
with this repository's packages unimportable and every test module checked to leave the process unchanged.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts/upstream/make_verl_pr.py"
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
    assert not re.search(r"^\+\+\+ b/\S*conftest\.py$", (tmp_path / "verl-mtp-rl.patch").read_text(), re.M)
    pristine = tmp_path / "pristine" / tree.name
    moved = [p for p in (tree / "tests").rglob("test_*_on_cpu.py") if not (pristine / p.relative_to(tree)).exists()]
    assert len(moved) > 10, moved
    for path in moved:  # each moved module imports the fixtures and warning filters it uses, by name
        text = path.read_text()
        assert "from tests.mtp_rl_support.pytest_fixtures import " in text, path
        assert "cpu_megatron" not in text or re.search(r"pytest_fixtures import [^\n]*\bcpu_megatron\b", text), path


@pytest.mark.slow  # the fast tier's model, worker and trainer tests once more, in verl's tree
def test_upstream_tree_passes_verl_and_moved_tests(tmp_path):
    """Long (it runs every moved MTP-RL test once, inside the patched verl tree)."""
    proc = _generate(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-12000:]
    isolation = r"^isolation: verl from .*; engine MegatronEngineWithLMHead; verl_mtp not importable$"
    assert re.search(isolation, out, re.M)
    runs = re.findall(r"^--- verl's own \+ moved tests, CI order: \d+ files -> (.*)$", out, re.M)
    assert runs and re.search(r"\d+ passed", runs[-1]) and not re.search(r"failed|error", runs[-1]), out[-4000:]
    probe = re.findall(r"^stand-in probe: (\d+) test modules checked$", out, re.M)
    assert probe and int(probe[-1]) > 10, out[-4000:]
    assert out.rstrip().splitlines()[-1].startswith("PASSED")
