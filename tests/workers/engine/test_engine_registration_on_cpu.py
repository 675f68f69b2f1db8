"""verl builds verl-mtp's engine whatever order a user script imports things in.

Each case runs in a fresh interpreter (registration is process state): it imports in one order a user
script can have, then asks verl's own ``EngineRegistry.get_engine_cls`` for the Megatron LM engine on the
``cuda`` device key. The check names the class instead of importing verl_mtp's engine module, which would
register it by itself. A negative control (verl's plugin loading switched off, nothing of verl_mtp
imported) must get verl's engine, so the check can tell the two apart.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

MTP_ENGINE = "verl_mtp.workers.engine.megatron.transformer_impl.MegatronMTPEngineWithLMHead"
VERL_ENGINE = "verl.workers.engine.megatron.transformer_impl.MegatronEngineWithLMHead"

# name -> (import lines of the user script, extra environment, the engine verl must build)
ORDERS = {
    "config_then_verl": ("import verl_mtp.workers.config.mtp\nimport verl\n", {}, MTP_ENGINE),
    "config_package_then_regime": (
        "from verl_mtp.workers.config import MtpRLConfig\nMtpRLConfig(enable=True, enable_train=True, mtp_loss_type='rl')\n",
        {},
        MTP_ENGINE,
    ),
    "verl_then_config": ("import verl\nimport verl_mtp.workers.config\n", {}, MTP_ENGINE),
    "engine_module_first": ("import verl_mtp.workers.engine.megatron.transformer_impl\n", {}, MTP_ENGINE),
    "verl_entry_point_only": ("import verl\n", {}, MTP_ENGINE),
    "main_ppo": ("import verl_mtp.trainer.main_ppo\n", {}, MTP_ENGINE),
    "control_no_plugin": ("import verl\n", {"VERL_USE_EXTERNAL_PLUGINS": "none"}, VERL_ENGINE),
}

CHECK = """
from verl.workers.engine.base import EngineRegistry
cls = EngineRegistry.get_engine_cls("language_model", "megatron")
print("ENGINE=" + cls.__module__ + "." + cls.__qualname__)
"""


@pytest.fixture(scope="module")
def runs():
    """Run every case (each a cold interpreter importing verl), two at a time, and collect their outputs."""
    base_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VERL_USE_EXTERNAL_MODULES", "VERL_USE_EXTERNAL_PLUGINS", "VERL_PLATFORM")
    }
    base_env["VERL_ENGINE_DEVICE"] = "cuda"

    def run(name):
        script, env, _ = ORDERS[name]
        proc = subprocess.run(
            [sys.executable, "-c", script + CHECK],
            env={**base_env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=900,
        )
        return proc.stdout, proc.returncode

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(ORDERS, pool.map(run, ORDERS)))


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_verl_builds_the_expected_engine(runs, order):
    out, returncode = runs[order]
    assert returncode == 0, out[-3000:]
    engines = [line for line in out.splitlines() if line.startswith("ENGINE=")]
    assert engines == [f"ENGINE={ORDERS[order][2]}"], out[-3000:]
    assert "deferred" not in out and "failed to load" not in out, out[-3000:]
