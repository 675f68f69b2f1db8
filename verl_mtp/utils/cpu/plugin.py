"""Activates verl-mtp's CPU support. Load it before verl's entry-point plugins:

    VERL_PLATFORM=cpu VERL_USE_EXTERNAL_MODULES=verl_mtp.utils.cpu.plugin python -m verl_mtp.trainer.main_ppo ...

(``verl/__init__.py`` imports ``VERL_USE_EXTERNAL_MODULES`` before the ``verl.plugins`` entry points, and the
entry point ``verl_mtp.plugin`` already asks verl for the platform, so the CPU platform must be registered
first.) Ray workers inherit both variables through verl's ``runtime_env``/os environment.

What it does, only when ``VERL_PLATFORM=cpu``:
1. registers :class:`~verl_mtp.utils.cpu.platform.PlatformCPU` (``PlatformRegistry``, name ``cpu``);
2. installs the documented ``torch.cuda`` shim for Megatron-Core (:mod:`verl_mtp.utils.cpu.cuda_shim`);
3. imports ``verl_mtp.plugin`` (verl_mtp's MTP engine swap), then registers the CPU variant of each Megatron
   engine for device ``"cpu"`` in ``EngineRegistry`` (:mod:`verl_mtp.utils.cpu.engine`; verl registers them
   for ``"cuda"`` only) -- the CPU variant differs only in its optimizer;
4. registers CPU (local-spec) mbridge bridges (:mod:`verl_mtp.utils.cpu.mbridge_cpu`);
5. wraps ``verl.utils.distributed.initialize_global_process_group_ray`` so its default backend string is
   ``"cpu:gloo"`` instead of ``"cpu:gloo,cpu:gloo"`` (verl/utils/distributed.py:89 builds
   ``f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"``, which torch rejects with
   "ValueError: Duplicate device type cpu in backend string" when the device is the CPU);
6. registers the CPU rollout replica ``"hf_cpu"`` (:mod:`verl_mtp.utils.cpu.rollout`), if present.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def cpu_platform_requested() -> bool:
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == "cpu"


def patch_process_group_backend() -> None:
    """Give ``initialize_global_process_group_ray`` a valid default backend on CPU (see item 5 above)."""
    import sys

    import verl.utils.distributed as vdist

    orig = vdist.initialize_global_process_group_ray
    if getattr(orig, "_verl_mtp_cpu", False):
        return

    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        return orig(timeout_second=timeout_second, backend=backend or "cpu:gloo")

    initialize_global_process_group_ray._verl_mtp_cpu = True
    initialize_global_process_group_ray.__wrapped__ = orig
    vdist.initialize_global_process_group_ray = initialize_global_process_group_ray
    for name, mod in list(sys.modules.items()):  # verl modules that already did `from ... import` it
        if name.startswith("verl.") and vars(mod).get("initialize_global_process_group_ray") is orig:
            mod.initialize_global_process_group_ray = initialize_global_process_group_ray


def register() -> None:
    if not cpu_platform_requested():
        return
    from verl_mtp.utils.cpu import platform  # noqa: F401  (registers "cpu")
    from verl_mtp.utils.cpu.cuda_shim import install_cuda_shim

    install_cuda_shim()
    import verl.workers.engine  # noqa: F401  (import registers verl's engines)
    import verl_mtp.plugin  # noqa: F401  (swap in verl_mtp's engine first; the entry point is then a no-op)
    from verl_mtp.utils.cpu.engine import register_cpu_engines

    register_cpu_engines()
    patch_process_group_backend()
    from verl_mtp.utils.cpu.mbridge_cpu import register_cpu_bridges

    register_cpu_bridges()
    try:
        from verl_mtp.utils.cpu.rollout import register_cpu_rollout
    except ImportError:
        return
    register_cpu_rollout()


register()
