"""The one CPU mechanism: what Megatron-Core's hard-coded CUDA calls mean on a CPU-only machine.

verl asks its platform for the device (``get_torch_device()``, ``get_device_id()``), but Megatron-Core calls
``torch.cuda.*`` directly (``device=torch.cuda.current_device()`` for the global memory buffer, the tensor-
parallel collectives' output buffers, the MTP loss tracker, RoPE ``inv_freq``; ``torch.cuda.synchronize`` in
timers; the RNG tracker) and writes ``device="cuda"`` literally in a few more places (the no-pipelining
schedule's counter tensor, its optimizers, ``weight.data.cuda()`` when pipeline stages tie embeddings).
Megatron-Core has no extension point for either, so the CPU platform gives both their CPU meaning, in two parts
that the trainer's CPU plugin, the tests (:mod:`verl_cpu.testing`) and the benchmarks all use alike:

1. :data:`verl_cpu.patches.CUDA_ON_CPU`, process-wide until undone: the ``torch.cuda`` functions
   Megatron-Core calls answer with the CPU's device module (:mod:`verl_cpu.device_module`: device
   ``"cpu"``, no-op ``synchronize`` / ``empty_cache``, memory counters 0 with ``mem_get_info`` the host
   memory, the CPU generator's RNG state, torch's CPU stream), and Megatron's RNG tracker becomes a
   :class:`CPURNGStatesTracker`.
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
import threading

import torch
from megatron.core.tensor_parallel import random as mcore_random
from torch.overrides import TorchFunctionMode


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
