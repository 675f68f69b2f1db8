"""``scripts/gpu_check.sh --cpu``: the GPU check's flow on CPU at tiny size, so the script cannot rot.

The CPU mode runs what the GPU mode runs (import check, a model-level test file, the device check of both
``rl`` scoring paths, the ratios) in the current environment; the install step (``--wheels``) is GPU-only.
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
                          text=True, timeout=900)


@pytest.mark.slow  # four fresh interpreters: a model test file of the fast tier again, the check, the benchmark
def test_cpu_mode_runs_the_whole_flow_and_prints_checks_and_ratios():
    proc = run_script("--cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(r"^\d+ passed", out, re.M), out
    assert re.search(r"^check head 1 log-probs chunked vs output layer: .* ok$", out, re.M), out
    assert re.search(r"^check gradients chunked vs output layer: .* ok$", out, re.M), out
    spread = r"\d+\.\d+x \(IQR \d+\.\d+-\d+\.\d+, 95% CI of the median \d+\.\d+-\d+\.\d+\)"
    assert re.search(r"^ratio step_time rl_chunked/rl_output_layer: " + spread, out, re.M), out
    assert re.search(r"rl/detach: step_time \d+\.\d+x", out), out


def test_unknown_argument_is_a_clear_error():
    proc = run_script("--gpu")
    assert proc.returncode == 2 and "unknown argument --gpu" in proc.stderr
