"""A ``torch.<device>``-like namespace for the CPU, returned by :class:`PlatformCPU.device_module`.

verl calls ``get_torch_device().<fn>`` (``empty_cache``, ``synchronize``, ``mem_get_info``, ``get_rng_state``,
``current_stream`` ...); ``torch.cpu`` has only part of that API, so this module fills in the rest with the
CPU meaning of each call (memory counters report host memory / 0, caches are no-ops, RNG is the CPU generator).
"""

from __future__ import annotations

import contextlib
import os

import torch

# Re-export what torch.cpu already provides.
Stream = torch.cpu.Stream
Event = torch.cpu.Event
StreamContext = torch.cpu.StreamContext
current_stream = torch.cpu.current_stream
stream = torch.cpu.stream
synchronize = torch.cpu.synchronize
is_initialized = torch.cpu.is_initialized


def is_available() -> bool:
    return True


def device_count() -> int:
    return 1


def current_device() -> str:
    return "cpu"


def set_device(device=None) -> None:  # noqa: ARG001 - one CPU "device"
    return None


def get_device_name(device=None) -> str:  # noqa: ARG001
    return "cpu"


def get_device_capability(device=None):  # noqa: ARG001
    return (None, None)


def empty_cache() -> None:
    return None


def ipc_collect() -> None:
    return None


def set_per_process_memory_fraction(fraction, device=None) -> None:  # noqa: ARG001
    return None


def _host_memory() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return 0, 0


def mem_get_info(device=None):  # noqa: ARG001
    """(free, total) host memory in bytes."""
    return _host_memory()


def memory_allocated(device=None) -> int:  # noqa: ARG001
    return 0


def max_memory_allocated(device=None) -> int:  # noqa: ARG001
    return 0


def memory_reserved(device=None) -> int:  # noqa: ARG001
    return 0


def max_memory_reserved(device=None) -> int:  # noqa: ARG001
    return 0


def reset_peak_memory_stats(device=None) -> None:  # noqa: ARG001
    return None


def manual_seed(seed: int) -> None:
    torch.manual_seed(seed)


def manual_seed_all(seed: int) -> None:
    torch.manual_seed(seed)


def get_rng_state(device=None):  # noqa: ARG001
    return torch.get_rng_state()


def set_rng_state(state, device=None) -> None:  # noqa: ARG001
    torch.set_rng_state(state)


@contextlib.contextmanager
def device(index=None):  # noqa: ARG001
    yield
