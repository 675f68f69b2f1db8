"""The host-sync budget of an actor micro-batch through verl's real worker: ``rl`` and ``rl_occ`` make at most one
host synchronisation more than ``detach``, for K = 1 and 2 MTP heads, THD (packed) and BSHD (padded) input.

``benchmarks.worker_syncs`` builds verl's ``ActorRolloutRefWorker`` in-process on the CPU platform per regime and
counts every update at the dispatcher (verl's packing, the model, the logits processor and its unpacking, verl's
loss with the MTP term, backward, optimizer step), once with one and once with two micro-batches: the difference
is one micro-batch's cost. A synchronisation added to the rl path anywhere in that step fails this test.
"""

import json
import subprocess
import sys

import pytest
from verl_cpu.environment import cpu_child_env


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    out = tmp_path_factory.mktemp("syncs") / "counts.json"
    env = {k: v for k, v in cpu_child_env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "benchmarks.worker_syncs", "--heads", "1", "2", "--formats", "thd", "bshd",
           "--regimes", "detach", "rl", "rl_occ", "--sites", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    print(proc.stdout)  # the table, with each added synchronisation's site
    rows = json.loads(out.read_text())
    return {(r["heads"], r["format"], r["regime"]): r for r in rows}


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("fmt", ["thd", "bshd"])
@pytest.mark.parametrize("regime", ["rl", "rl_occ"])
def test_rl_adds_at_most_one_sync_per_micro_batch_over_detach(counts, heads, fmt, regime):
    detach, rl = counts[(heads, fmt, "detach")], counts[(heads, fmt, regime)]
    assert detach["micro_batch"] > 0, "the counter saw nothing: it is not counting"
    added = {site: n - detach["sites"].get(site, 0) for site, n in rl["sites"].items()}
    added = {site: n for site, n in added.items() if n > 0}
    assert sum(added.values()) <= 1, added
    assert rl["update"] <= detach["update"] + 1


def test_the_one_added_sync_is_the_mtp_metrics_read_back(counts):
    detach, rl = counts[(2, "thd", "detach")], counts[(2, "thd", "rl_occ")]
    added = [site for site, n in rl["sites"].items() if n > detach["sites"].get(site, 0)]
    assert len(added) == 1 and "verl_mtp/workers/utils/losses.py" in added[0] and "_read_back" in added[0], added
