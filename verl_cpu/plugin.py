"""Activates verl on CPU. Load it before verl's entry-point plugins:

    VERL_PLATFORM=cpu VERL_USE_EXTERNAL_MODULES=verl_cpu.plugin python -m <your verl entry point> ...

(``verl/__init__.py`` imports ``VERL_USE_EXTERNAL_MODULES`` before the ``verl.plugins`` entry points, and an
entry-point plugin may already ask verl for the platform, so the CPU platform must be registered first.) Ray
workers inherit both variables through verl's ``runtime_env``/os environment; :func:`verl_cpu.environment.
cpu_process_env` gives them to a child process.

What it does, only when ``VERL_PLATFORM=cpu`` (and refuses to do on a machine where CUDA is available):
1. registers :class:`~verl_cpu.platform.PlatformCPU` (``PlatformRegistry``, name ``cpu``);
2. installs the CPU meaning of Megatron-Core's ``torch.cuda`` calls (:func:`verl_cpu.cuda.install_cuda_shim`);
3. makes verl's engine lookup give device ``"cpu"`` the CPU variant of whichever Megatron engine is registered
   for ``"cuda"`` when the engine is built (:mod:`verl_cpu.engine`) -- the CPU variant differs only in its
   optimizer;
4. registers CPU (local-spec) mbridge bridges (:mod:`verl_cpu.bridges`);
5. wraps ``verl.utils.distributed.initialize_global_process_group_ray`` so its default backend string is
   ``"cpu:gloo"``: verl 0.9.1 builds ``f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"``, which torch
   rejects with "ValueError: Duplicate device type cpu in backend string" when the device is the CPU;
6. registers the CPU rollout replica ``"hf_cpu"`` (:mod:`verl_cpu.rollout`).
"""

from __future__ import annotations

import os


def cpu_platform_requested() -> bool:
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == "cpu"


def patch_process_group_backend() -> None:
    """Give ``initialize_global_process_group_ray`` a valid default backend on CPU (see item 5 above)."""
    import sys

    import verl.utils.distributed as vdist

    orig = vdist.initialize_global_process_group_ray
    if getattr(orig, "_verl_cpu", False):
        return

    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        return orig(timeout_second=timeout_second, backend=backend or "cpu:gloo")

    initialize_global_process_group_ray._verl_cpu = True
    initialize_global_process_group_ray.__wrapped__ = orig
    vdist.initialize_global_process_group_ray = initialize_global_process_group_ray
    for name, mod in list(sys.modules.items()):  # verl modules that already did `from ... import` it
        if name.startswith("verl.") and vars(mod).get("initialize_global_process_group_ray") is orig:
            mod.initialize_global_process_group_ray = initialize_global_process_group_ray


def register() -> None:
    if not cpu_platform_requested():
        return
    import torch

    if torch.cuda.is_available():
        raise RuntimeError("VERL_PLATFORM=cpu refused: CUDA is available, use verl's CUDA platform")
    from verl_cpu import platform  # noqa: F401  (registers "cpu")
    from verl_cpu.bridges import register_cpu_bridges
    from verl_cpu.cuda import install_cuda_shim
    from verl_cpu.engine import install_cpu_engine_lookup
    from verl_cpu.rollout import register_cpu_rollout

    install_cuda_shim()
    install_cpu_engine_lookup()
    patch_process_group_backend()
    register_cpu_bridges()
    register_cpu_rollout()


register()
