"""The one CPU mechanism: what Megatron-Core's hard-coded CUDA calls mean on a CPU-only machine.

verl asks its platform for the device (``get_torch_device()``, ``get_device_id()``), but Megatron-Core calls
``torch.cuda.*`` directly (``device=torch.cuda.current_device()`` for the global memory buffer, the tensor-
parallel collectives' output buffers, the MTP loss tracker, RoPE ``inv_freq``; ``torch.cuda.synchronize`` in
timers; the RNG tracker) and writes ``device="cuda"`` literally in a few more places (the no-pipelining
schedule's counter tensor, its optimizers, ``weight.data.cuda()`` when pipeline stages tie embeddings).
Megatron-Core has no extension point for either, so this module gives both their CPU meaning, in two parts
that the trainer's CPU plugin, the tests (:mod:`verl_cpu.testing`) and the benchmarks all use alike:

1. :func:`install_cuda_shim`, process-wide and idempotent, gives these ``torch.cuda`` functions their CPU
   meaning and makes Megatron's RNG tracker a :class:`CPURNGStatesTracker`:

   ==============================  ============================================================
   ``torch.cuda.current_device``   returns ``"cpu"`` (used only as ``device=`` by Megatron-Core)
   ``torch.cuda.synchronize``      no-op
   ``torch.cuda.empty_cache``      no-op
   ``torch.cuda.memory_*``         0 (allocated/reserved/max_*), ``mem_get_info`` = host memory
   ``torch.cuda.get/set_rng_state`` CPU generator state
   ``torch.cuda.current_stream``   torch's CPU stream (megatron-core 0.19's grad sync waits on it)
   ==============================  ============================================================

   ``torch.cuda.manual_seed(_all)`` are left alone (lazy no-ops on a CPU build), ``torch.cuda.is_available()``
   still answers ``False`` (code that branches on it keeps its CPU branch) and everything else in
   ``torch.cuda`` still fails loudly.
2. :class:`CudaToCPUMode` (entered through :func:`on_cpu` / :func:`cpu_placements`), scoped: a
   ``TorchFunctionMode`` (torch's public override mechanism) in which a torch call with ``device=<cuda...>``
   gets ``device="cpu"``, ``Tensor.cuda()`` returns the tensor itself and ``Tensor.to(<cuda...>)`` targets
   the CPU. It is entered only around the calls that reach such code (the CPU engine's entry points, a
   model constructor), in the calling thread; nothing else in the process is affected.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading

import torch
from megatron.core.tensor_parallel import random as mcore_random
from torch.overrides import TorchFunctionMode

from verl_cpu import device_module as _cpu

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
    "current_stream": _cpu.current_stream,
}
_installed = False


def install_cuda_shim() -> None:
    """Install the CPU meaning of the ``torch.cuda`` functions above and the CPU RNG tracker. Idempotent."""
    global _installed
    if not _installed:
        for name, fn in _PATCHES.items():
            setattr(torch.cuda, name, fn)
        _installed = True
        logger.info("verl_cpu: torch.cuda CPU shim installed (%s)", ", ".join(_PATCHES))
    install_cpu_rng_tracker()


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
    """Make Megatron's global RNG tracker a :class:`CPURNGStatesTracker`.

    Marked initialised, so Megatron's own ``model_parallel_cuda_manual_seed`` keeps it and seeds its streams.
    There is no public hook to choose the tracker class, hence the module globals.
    """
    if isinstance(mcore_random._CUDA_RNG_STATE_TRACKER, CPURNGStatesTracker):
        return
    mcore_random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class CudaToCPUMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


_state = threading.local()


@contextlib.contextmanager
def cpu_placements():
    """Run the block inside :class:`CudaToCPUMode` unless this thread already is (nested calls)."""
    if getattr(_state, "active", False):
        yield
        return
    _state.active = True
    try:
        with CudaToCPUMode():
            yield
    finally:
        _state.active = False


def on_cpu(fn):
    """Decorator: run ``fn`` (a function or generator function) inside :func:`cpu_placements`."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            gen = fn(*args, **kwargs)
            while True:
                with cpu_placements():
                    try:
                        item = next(gen)
                    except StopIteration as stop:
                        return stop.value
                yield item

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with cpu_placements():
            return fn(*args, **kwargs)

    return wrapper
