"""The upstream form of this project (a patch of verl's own tree) is generated, applies and passes its tests.

``scripts/upstream/make_verl_pr.py`` places the product's modules at verl's paths, edits verl's own files for
the integration and moves the MTP-RL tests under verl's ``tests/``; these tests run it on verl's source
distribution (downloaded once into ``VERL_MTP_UPSTREAM_CACHE``, default ``~/.cache/verl-mtp/upstream``).
The first checks the generated change; the second (long: the whole moved test suite) runs verl's own CPU
tests of the changed modules and the moved tests inside the patched tree, with this repository's packages
unimportable.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts/upstream/make_verl_pr.py"
# The integration edits of verl's pre-existing code (two exports, the engine registration); a change that needs
# more is a change of the upstream form and should be reviewed as such. verl's model YAML only gains the MTP-RL
# keys (one line, its config class, is replaced), however many keys there are.
MAX_EDITED_CODE_LINES = 8
MODEL_YAML = "verl/trainer/config/model/hf_model.yaml"


def _generate(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *extra], capture_output=True, text=True, cwd=REPO
    )


def _edited_files(stdout: str) -> dict[str, tuple[int, int]]:
    rows = re.findall(r"^  (\S+): \+(\d+) -(\d+)$", stdout, re.M)
    return {path: (int(a), int(r)) for path, a, r in rows if path != "total"}


def test_upstream_patch_is_generated_with_a_small_edit_of_verl_files(tmp_path):
    proc = _generate(tmp_path, "--no-tests")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    edited = _edited_files(proc.stdout)
    assert set(edited) >= {
        MODEL_YAML,
        "verl/workers/config/__init__.py",
        "verl/workers/engine/megatron/__init__.py",
        "verl/workers/engine/megatron/transformer_impl.py",
    }, proc.stdout
    code = {path: lines for path, lines in edited.items() if path.endswith(".py")}
    assert sum(a + r for a, r in code.values()) <= MAX_EDITED_CODE_LINES, proc.stdout
    assert edited[MODEL_YAML][1] <= 1, proc.stdout
    tree = next((tmp_path / "patched").iterdir())
    impl = (tree / "verl/workers/engine/megatron/transformer_impl.py").read_text()
    assert not re.search(r"^@EngineRegistry\.register\(.*\)\nclass MegatronEngineWithLMHead\(", impl, re.M)
    moved = (tree / "verl/workers/engine/megatron/mtp_rl_transformer_impl.py").read_text()
    assert "@EngineRegistry.register(" in moved and "replace_engine" not in moved
    for path in tree.rglob("*.py"):  # no import of this repository's packages is left anywhere in the tree
        assert not re.search(r"^\s*(from|import) (verl_mtp|verl_cpu|support)\b", path.read_text(), re.M), path
    assert (tmp_path / "verl-mtp-rl.patch").stat().st_size > 0


def test_upstream_tree_passes_verl_and_moved_tests(tmp_path):
    """Long (it runs every moved MTP-RL test once, inside the patched verl tree)."""
    proc = _generate(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-12000:]
    isolation = r"^isolation: verl from .*; engine MegatronMTPEngineWithLMHead; verl_mtp not importable$"
    assert re.search(isolation, out, re.M)
    summaries = dict(re.findall(r"^--- (.+?): \d+ files -> (.*)$", out, re.M))
    assert set(summaries) == {"verl's own tests", "moved MTP-RL tests"}, out[-4000:]
    for label, summary in summaries.items():
        assert re.search(r"\d+ passed", summary) and not re.search(r"failed|error", summary), (label, summary)
    assert out.rstrip().splitlines()[-1].startswith("PASSED")
