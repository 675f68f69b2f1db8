"""The environment a process needs to run verl on CPU: the one place that knows these variables.

verl picks its platform and imports ``VERL_USE_EXTERNAL_MODULES`` when ``verl`` is first imported, in the driver
and again in every Ray worker (which inherit the driver's environment), so both must be set before that import:
in ``os.environ`` of the current process (``os.environ.update(cpu_process_env())`` before ``import verl``) or in
the environment of a child process (:func:`cpu_child_env`).
"""

from __future__ import annotations

import os
import socket

PLUGIN = "verl_cpu.plugin"
# when set, the hf_cpu rollout server writes the weights it serves after each sync into this directory
# (verl_cpu.rollout); the server inherits it like every VERL_* variable
ROLLOUT_WEIGHTS_DIR = "VERL_CPU_ROLLOUT_WEIGHTS_DIR"


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def cpu_process_env(one_rank: bool = False) -> dict[str, str]:
    """The variables to add to the current environment so that ``import verl`` loads verl on CPU.

    ``VERL_PLATFORM=cpu`` and this platform's plugin first in ``VERL_USE_EXTERNAL_MODULES`` (before any other
    listed module, which may already ask verl for its platform); one intra-op thread per process, since verl
    on CPU runs several processes (driver, Ray workers, rollout server) on the same cores and spinning OpenMP
    threads then slow every one of them down. With ``one_rank`` the process is also a whole torch.distributed
    world of its own (rank 0 of 1 at ``127.0.0.1`` on a free port), as a script that builds a verl worker
    itself without a launcher needs. Values already set in the environment win, except the two above.
    """
    modules = [m for m in os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m and m != PLUGIN]
    env = {"VERL_PLATFORM": "cpu", "VERL_USE_EXTERNAL_MODULES": ",".join([PLUGIN, *modules])}
    defaults = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if one_rank:
        defaults.update({"MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                         "CUDA_DEVICE_MAX_CONNECTIONS": "1"})
    env.update({key: os.environ.get(key, value) for key, value in defaults.items()})
    if one_rank:
        env["MASTER_PORT"] = os.environ.get("MASTER_PORT") or _free_port()
    return env


# Megatron's ``LanguageModule._set_attention_backend`` exports these into ``os.environ`` when a model is built with
# a non-local backend and asserts in any later build whose backend disagrees. A CPU child always builds with
# ``attention_backend=local`` (the CPU engine's setting), so values inherited from its parent can only break it.
MEGATRON_ATTENTION_ENV = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")


def cpu_child_env(one_rank: bool = False) -> dict[str, str]:
    """The whole environment of a child process that runs verl on CPU: this one's, without Megatron's attention
    backend exports (see ``MEGATRON_ATTENTION_ENV``), plus :func:`cpu_process_env`."""
    inherited = {k: v for k, v in os.environ.items() if k not in MEGATRON_ATTENTION_ENV}
    return {**inherited, **cpu_process_env(one_rank)}
