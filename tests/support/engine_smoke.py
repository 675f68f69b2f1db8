"""verl's real Megatron actor on CPU, in a subprocess (``verl_cpu.engine_smoke``) with verl-mtp's trainer config."""

from __future__ import annotations

import subprocess
import sys

from verl_cpu.environment import cpu_child_env


def run_engine_smoke(model_dir: str, *overrides: str, timeout: int = 900) -> tuple[subprocess.CompletedProcess, str]:
    """Two actor updates on ``model_dir`` with Hydra ``overrides``: the process and its whole output.

    The smoke makes its own one-rank gloo world (which must not leak into the test process); a rank inherited
    from this process would override it, so none is passed on.
    """
    env = {k: v for k, v in cpu_child_env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "verl_cpu.engine_smoke", "--model", model_dir, "--steps", "2",
           "--config-module", "verl_mtp.trainer.config", "--config-name", "mtp_ppo_megatron_trainer", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, proc.stdout + proc.stderr
