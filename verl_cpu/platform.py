"""``PlatformCPU``: verl's platform abstraction (``verl.plugin.platform``) for a machine without accelerator.

Registered as platform ``"cpu"`` in ``verl.plugin.platform.PlatformRegistry`` by :data:`verl_cpu.patches.
VERL_PLATFORM` (the CPU plugin applies it); selected with ``VERL_PLATFORM=cpu`` (verl's own override of
auto-detection). It answers ``get_device_name() == "cpu"``,
``get_nccl_backend() == "gloo"``, Ray logical ``"GPU"`` slots (see :meth:`PlatformCPU.ray_resource_name`) and a
``torch.cpu``-like device module (:mod:`verl_cpu.device_module`).
"""

from __future__ import annotations

import contextlib
import os
from types import ModuleType
from typing import Any, Optional

from verl.plugin.platform import PlatformBase

from verl_cpu import device_module as _cpu_device_module

class PlatformCPU(PlatformBase):
    """CPU-only platform: gloo collectives, Ray ``CPU`` resources, no IPC, no profiler ranges."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return _cpu_device_module

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        # Never auto-detected: a CPU run is asked for explicitly with VERL_PLATFORM=cpu.
        return False

    def current_device(self):
        # torch accepts "cpu" wherever verl passes get_device_id() as a device.
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: Optional[int] = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        _cpu_device_module.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        _cpu_device_module.manual_seed_all(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0):
        return (None, None)

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # verl sets/reads this per worker; nothing reads it on CPU.
        return "VERL_CPU_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        # Device slots are Ray *logical* "GPU" resources: start Ray with `+ray_kwargs.ray_init.num_gpus=N`
        # (no physical GPU is needed or used). verl's resource check counts only "GPU"/"NPU" keys
        # (verl 0.9.1 ResourcePoolManager._check_resource_available: "Total available GPUs 0 is less than
        # total desired GPUs 1"), and a placement bundle of verl's RayResourcePool is
        # {"CPU": max_colocate_count, <resource>: 1}, so "CPU" itself cannot be the slot.
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def get_device_uuid(self, device_id):
        return f"cpu-{os.getpid()}-{device_id}"

    def cudart(self) -> Any:
        return None
