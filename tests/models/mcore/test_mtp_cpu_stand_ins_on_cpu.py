"""The MTP tests leave nothing behind in a shared pytest process (verl's CI runs every ``*_on_cpu.py`` in one).

A child pytest runs the MTP patch's tests (real tiny Megatron models on CPU through the ``cpu_megatron`` fixture,
which replaces ``torch.cuda`` functions and Megatron's RNG tracker) with the :mod:`support.stand_in_probe`
plugin, which records the process state before any test module is imported and fails the run if a module leaves
any of it changed.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import support.stand_in_probe as stand_in_probe

MOVED_TEST = Path(__file__).with_name("test_mtp_patch_on_cpu.py")


def _import_root() -> Path:
    """The directory the probe's dotted module name is importable from (``tests`` here, verl's root upstream)."""
    return Path(stand_in_probe.__file__).parents[len(stand_in_probe.__name__.split(".")) - 1]


def test_moved_tests_restore_torch_cuda_and_megatron_state():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_import_root()), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", stand_in_probe.__name__]
    proc = subprocess.run([*command, str(MOVED_TEST)], env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    leaks = sorted(set(re.findall(r"[\w.]+ left the process changed: [^{\n]+", output)))
    assert proc.returncode == 0, "\n".join(leaks) or output[-6000:]
    assert "stand-in probe: 1 test modules checked" in output, output[-3000:]
