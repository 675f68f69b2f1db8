"""Activates verl on CPU. Load it before verl's entry-point plugins:

    VERL_PLATFORM=cpu VERL_USE_EXTERNAL_MODULES=verl_cpu.plugin python -m <your verl entry point> ...

(``verl/__init__.py`` imports ``VERL_USE_EXTERNAL_MODULES`` before the ``verl.plugins`` entry points, and an
entry-point plugin may already ask verl for the platform, so the CPU platform must be registered first.) Ray
workers inherit both variables through verl's ``runtime_env``/os environment; :func:`verl_cpu.environment.
cpu_process_env` gives them to a child process.

Only when ``VERL_PLATFORM=cpu`` (and refused on a machine where CUDA is available), it applies every patch of
:data:`verl_cpu.patches.CPU_PATCHES`, where each is listed with what it replaces and why: the CPU meaning of
Megatron-Core's ``torch.cuda`` calls and its RNG tracker, the ``cpu`` platform, the CPU variant of the Megatron
engine at verl's engine lookup, a process-group backend torch accepts on CPU, the local-spec mbridge bridges and
the ``hf_cpu`` rollout.
"""

from __future__ import annotations

import os


def cpu_platform_requested() -> bool:
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == "cpu"


def register() -> None:
    if not cpu_platform_requested():
        return
    import torch

    if torch.cuda.is_available():
        raise RuntimeError("VERL_PLATFORM=cpu refused: CUDA is available, use verl's CUDA platform")
    from verl_cpu.patches import CPU_PATCHES

    for patch in CPU_PATCHES:
        patch.apply()


register()
