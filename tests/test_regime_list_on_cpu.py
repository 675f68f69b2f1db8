"""One list of MTP regimes: ``verl_mtp/workers/config/mtp_regimes.yaml``, which verl-mtp's registry reads. The
example's modes and its study derive theirs (the recipes': tests/trainer/test_recipes_on_cpu.py).

Read from the source with ``ast``: no literal collection in the code names every registered regime (that would
be a second list to keep in step); the example's modes are the registry's regimes plus the two the example
declares, and the study's columns follow them.
"""

from __future__ import annotations

import ast
from pathlib import Path

from verl_mtp.workers.config.mtp import MTP_REGIME_REGISTRY

REPO = Path(__file__).resolve().parents[1]
# everything that ships or launches (benchmarks/ keep their own cost variants: see benchmarks/mtp_actor_step.py)
SCANNED = ("verl_mtp", "verl_cpu", "examples", "scripts")


def _literal_collections(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            yield node, node.elts
        elif isinstance(node, ast.Dict):
            yield node, [key for key in node.keys if key is not None]


def regime_lists(path: Path) -> list[int]:
    """Lines of ``path`` where a literal tuple / list / set / dict holds the name of every registered regime."""
    names = set(MTP_REGIME_REGISTRY)
    found = []
    for node, elements in _literal_collections(ast.parse(path.read_text(), filename=str(path))):
        strings = {e.value for e in elements if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        if names <= strings:
            found.append(node.lineno)
    return found


def test_the_scan_finds_a_list_of_regimes(tmp_path):
    source = tmp_path / "second_list.py"
    source.write_text(f"MODES = {(*MTP_REGIME_REGISTRY, 'rl_occ')!r}\nONE = ('detach',)\n")
    assert regime_lists(source) == [1]


def test_no_second_list_of_regimes_in_the_code():
    files = [p for top in SCANNED for p in sorted((REPO / top).rglob("*.py"))]
    assert len(files) > 50
    lists = {str(p.relative_to(REPO)): lines for p in files if (lines := regime_lists(p))}
    assert lists == {}, f"lists of regimes besides verl_mtp/workers/config/mtp_regimes.yaml: {lists}"


def test_the_example_reads_the_registrys_list():
    """The example reads the product's file (it does not import verl for it); it holds what the registry holds."""
    from verl_mtp_example.modes import product_regimes

    fields = [(r.name, r.detach_encoder, r.policy_loss) for r in MTP_REGIME_REGISTRY.values()]
    assert [(r.name, r.detach_encoder, r.policy_loss) for r in product_regimes()] == fields


def test_the_examples_modes_are_the_registry_plus_its_own_two():
    from verl_mtp_example.modes import MODES

    assert [m.name for m in MODES.values() if m.regime is not None and not m.occ] == list(MTP_REGIME_REGISTRY)
    own = {name: (mode.regime and mode.regime.name, mode.occ) for name, mode in MODES.items()
           if name not in MTP_REGIME_REGISTRY}
    assert own == {"rl_occ": ("rl", True), "frozen": (None, False)}


def test_the_studys_columns_follow_the_modes():
    from verl_mtp_example.study import REGIMES

    assert {r.mode for r in REGIMES.values()} == {*MTP_REGIME_REGISTRY, "rl_occ"}
    assert [r.name for r in REGIMES.values() if r.diagnosed] == ["rl_0.1", "rl_1.0", "rl_3.0", "rl_10.0", "rl_occ"]
