"""CPU shim for the ``torch.cuda`` calls that Megatron-Core hard-codes (documented, opt-in, reversible).

Why: verl asks its platform for the device (``get_torch_device()``, ``get_device_id()``), but Megatron-Core
calls ``torch.cuda.*`` directly in ~170 places (``device=torch.cuda.current_device()`` for buffers, RoPE
``inv_freq``, the global memory buffer, MTP loss tracker, ``torch.cuda.synchronize`` in timers, the RNG
tracker ...). On a CPU-only torch build each of these raises "Torch not compiled with CUDA enabled".
There is no extension point for that in Megatron-Core, so the CPU platform installs this shim, which gives
the few functions on that path their CPU meaning:

==============================  ============================================================
``torch.cuda.current_device``   returns ``"cpu"`` (used only as ``device=`` by Megatron-Core)
``torch.cuda.synchronize``      no-op
``torch.cuda.empty_cache``      no-op
``torch.cuda.memory_*``         0 (allocated/reserved/max_*), ``mem_get_info`` = host memory
``torch.cuda.get/set_rng_state`` CPU generator state
Megatron RNG tracker            :class:`CPURNGStatesTracker` (named CPU generator states)
==============================  ============================================================

``torch.cuda.manual_seed(_all)`` are left alone (lazy no-ops on a CPU build; ``torch.manual_seed`` calls them).
``torch.cuda.is_available()`` is NOT touched (still ``False``), so code that branches on it keeps taking its
CPU branch, and everything else in ``torch.cuda`` still fails loudly. The shim is installed only when the
CPU platform is selected (``VERL_PLATFORM=cpu``, see :mod:`verl_mtp.utils.cpu.plugin`) and never on a CUDA
machine; :func:`uninstall_cuda_shim` restores the originals (tests).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from megatron.core.tensor_parallel import random as mcore_random

from verl_mtp.utils.cpu import device_module as _cpu

logger = logging.getLogger(__name__)

_PATCHES = {
    "current_device": _cpu.current_device,
    "synchronize": lambda *a, **k: None,
    "empty_cache": _cpu.empty_cache,
    "ipc_collect": _cpu.ipc_collect,
    "memory_allocated": _cpu.memory_allocated,
    "max_memory_allocated": _cpu.max_memory_allocated,
    "memory_reserved": _cpu.memory_reserved,
    "max_memory_reserved": _cpu.max_memory_reserved,
    "reset_peak_memory_stats": _cpu.reset_peak_memory_stats,
    "mem_get_info": _cpu.mem_get_info,
    "get_rng_state": _cpu.get_rng_state,
    "set_rng_state": _cpu.set_rng_state,
}
_originals: dict[str, object] = {}


def is_installed() -> bool:
    return bool(_originals)


def install_cuda_shim() -> None:
    """Install the CPU meaning of the ``torch.cuda`` functions above and the CPU RNG tracker. Idempotent."""
    if torch.cuda.is_available():
        raise RuntimeError("verl_mtp CPU shim refused: CUDA is available, use the CUDA platform")
    if _originals:
        return
    for name, fn in _PATCHES.items():
        _originals[name] = getattr(torch.cuda, name, None)
        setattr(torch.cuda, name, fn)
    install_cpu_rng_tracker()
    logger.info("verl_mtp: torch.cuda CPU shim installed (%s)", ", ".join(_PATCHES))


def uninstall_cuda_shim() -> None:
    for name, fn in _originals.items():
        if fn is None:
            delattr(torch.cuda, name)
        else:
            setattr(torch.cuda, name, fn)
    _originals.clear()


class CPURNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """Megatron's ``CudaRNGStatesTracker`` whose named streams are CPU generator states.

    ``fork(name)`` swaps torch's default CPU generator to the named stream for the block and back, which is
    what Megatron's tracker does with the CUDA generator (dropout in TP regions draws from it). Nested forks
    work because each fork saves and restores whatever state was current.
    """

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)


def install_cpu_rng_tracker() -> None:
    """Make Megatron's global RNG tracker a :class:`CPURNGStatesTracker` (kept by later initialize calls)."""
    if isinstance(mcore_random._CUDA_RNG_STATE_TRACKER, CPURNGStatesTracker):
        return
    mcore_random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
