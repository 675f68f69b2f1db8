"""``scripts/gpu_check.sh --cpu``: the GPU check's three sections on CPU at tiny size, on a simulated bare machine.

The CPU mode runs exactly what the GPU mode runs (scoring paths, every regime's actor step with its host syncs,
one real actor update through verl's worker for detach and rl_occ) with only the GPU machine's stack
(``scripts/gpu_check_stack.txt`` and what it requires) and the carried wheels (``scripts/gpu_check_wheels.txt``)
importable, and ray / wandb / datasets / ... as import-only stand-ins. So this test proves the wheel list covers
every module the check imports, and that nothing the check runs calls a stand-in.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1500)


@pytest.fixture(scope="module")
def cpu_run():
    return run_script("--cpu")


@pytest.mark.slow  # the check's sections in fresh interpreters, a model test file again among them
def test_every_section_passes_on_the_simulated_bare_machine(cpu_run):
    assert cpu_run.returncode == 0, (cpu_run.stdout + cpu_run.stderr)[-6000:]
    assert "FAILED" not in cpu_run.stdout
    assert "absent on the simulated bare machine" in cpu_run.stderr  # the simulation was on
    assert "import-only stand-ins used for" in cpu_run.stderr and "ray" in cpu_run.stderr


@pytest.mark.slow  # the check's sections in fresh interpreters, a model test file again among them
def test_each_section_prints_its_results(cpu_run):
    out = cpu_run.stdout
    assert re.search(r"^check head 1 log-probs chunked vs output layer: .* ok$", out, re.M), out
    assert re.search(r"^check gradients chunked vs output layer: .* ok$", out, re.M), out
    spread = r"\d+\.\d+x \(IQR \d+\.\d+-\d+\.\d+, 95% CI of the median \d+\.\d+-\d+\.\d+\)"
    assert re.search(r"^ratio step_time rl_chunked/rl_output_layer: " + spread, out, re.M), out
    for regime in ("ce", "rl", "rl_occ", "rl_materialised", "rl_occ_gradient"):
        assert re.search(rf"{regime}/detach: step_time {spread}.* peak_mem \d+\.\d+x", out), regime
    syncs = dict(re.findall(r"vocab=\d+ seq=\d+ (\w+): host_syncs (\d+)", out))
    assert set(syncs) >= {"detach", "rl", "rl_occ"} and int(syncs["rl_occ"]) <= int(syncs["detach"]) + 1, syncs
    for regime in ("detach", "rl_occ"):
        assert re.search(rf"^check worker {regime}: actor/pg_loss .* finite ok$", out, re.M), out
        assert re.search(rf"^check worker {regime}: mtp\.layers\.0\.eh_proj\.weight changed by .* ok$", out, re.M)
    assert re.search(r"^check worker rl_occ: actor/mtp_1/coef_applied .* finite ok$", out, re.M), out


def test_unknown_argument_is_a_clear_error():
    proc = run_script("--gpu")
    assert proc.returncode == 2 and "unknown argument --gpu" in proc.stderr


def test_every_carried_wheel_is_pinned():
    lines = [line.split("#")[0].strip() for line in (REPO / "scripts/gpu_check_wheels.txt").read_text().splitlines()]
    entries = [line for line in lines if line]
    assert entries and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", e) for e in entries), entries
