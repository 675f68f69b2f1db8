"""verl's ``use_fused_kernels=True`` with MTP adds no host synchronisation to an actor micro-batch through verl's
real worker, in ``detach`` and ``rl_occ``, K = 1 and 2, THD and BSHD: the fused main head reads nothing back to
the host, and it takes away the reads of verl's unfused logits processor (its temperature check, Megatron's
cross-entropy masks). Counted by ``benchmarks.worker_syncs`` (one and two micro-batches per update: the
difference is one micro-batch's cost).
"""

import json
import subprocess
import sys

import pytest
from verl_cpu.environment import cpu_child_env

REGIMES = ("detach", "rl_occ")


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    out = tmp_path_factory.mktemp("fused_syncs") / "counts.json"
    env = {k: v for k, v in cpu_child_env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")}
    regimes = [name for regime in REGIMES for name in (regime, f"{regime}_fused")]
    cmd = [sys.executable, "-m", "benchmarks.worker_syncs", "--heads", "1", "2", "--formats", "thd", "bshd",
           "--regimes", *regimes, "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = json.loads(out.read_text())
    return {(r["heads"], r["format"], r["regime"]): r for r in rows}


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("fmt", ["thd", "bshd"])
@pytest.mark.parametrize("regime", REGIMES)
def test_the_fused_main_head_adds_no_sync_and_removes_the_unfused_processors(counts, heads, fmt, regime):
    plain, fused = counts[(heads, fmt, regime)], counts[(heads, fmt, f"{regime}_fused")]
    assert plain["micro_batch"] > 0, "the counter saw nothing: it is not counting"
    added = {site: n - plain["sites"].get(site, 0) for site, n in fused["sites"].items()}
    assert not {site: n for site, n in added.items() if n > 0}
    assert fused["update"] <= plain["update"]
    gone = [site for site, n in plain["sites"].items() if n > fused["sites"].get(site, 0)]
    assert any("_lm_head_logits_processor" in site for site in gone), gone
