"""``CudaToCPUMode``: a ``TorchFunctionMode`` that turns hard-coded CUDA placements into CPU ones.

Megatron-Core writes ``device="cuda"`` literally in places no ``torch.cuda`` shim can reach, e.g.
``forward_backward_no_pipelining``: ``torch.zeros([], dtype=torch.int, device="cuda")``
(megatron/core/pipeline_parallel/schedules.py:596, also :983, :2138), ``MTPLossLoggingHelper`` and the
optimizers. Inside this mode every torch call with ``device=<cuda...>`` gets ``device="cpu"``,
``Tensor.cuda()`` returns the tensor itself and ``Tensor.to(<cuda...>)`` targets the CPU.

Scope: the CPU engine (:mod:`verl_mtp.utils.cpu.engine`) enters it only around its own entry points
(initialize / forward-backward / optimizer step / checkpoint / weight export), in the calling thread;
nothing else in the process is affected. Uses torch's public override mechanism (``torch.overrides``).
"""

from __future__ import annotations

import functools
import inspect
import threading

import torch
from torch.overrides import TorchFunctionMode


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


class _scoped:
    """Enter CudaToCPUMode unless this thread is already inside it (nested engine calls)."""

    def __enter__(self):
        self.mode = None
        if not getattr(_state, "active", False):
            _state.active = True
            self.mode = CudaToCPUMode()
            self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self.mode is not None:
            self.mode.__exit__(*exc)
            _state.active = False
        return False


def on_cpu(fn):
    """Decorator: run ``fn`` (a function or generator function) inside :class:`CudaToCPUMode`."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            gen = fn(*args, **kwargs)
            while True:
                with _scoped():
                    try:
                        item = next(gen)
                    except StopIteration as stop:
                        return stop.value
                yield item

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _scoped():
            return fn(*args, **kwargs)

    return wrapper
