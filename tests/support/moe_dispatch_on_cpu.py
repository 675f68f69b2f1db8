"""Megatron's all-to-all MoE token dispatcher on CPU: its device-to-host side stream answered by the CPU.

``MoEAlltoAllTokenDispatcher`` (megatron-core 0.16.1, ``megatron.core.transformer.moe.token_dispatcher``)
creates a class-wide ``torch.cuda.Stream`` at construction and, at its ``cuda_dtoh_point``, copies the token
counts to the host on that stream, records an event and waits on it at its ``cuda_sync_point``. On CPU there
are no streams and every tensor already lives on the host, so :func:`cpu_token_dispatcher_streams` gives that
one module a ``torch.cuda`` whose stream is a single CPU stand-in (the current stream and the side stream are
the same, so no cross-stream wait or ``record_stream`` is asked for) and whose events are complete at once;
and its ``maybe_move_tensor_to_cpu`` hands back what the GPU path hands back (the host copy, as a NumPy array
where asked), since Megatron's version converts only CUDA tensors and the split sizes would otherwise reach
``all_to_all_single`` as tensors, which it does not accept.
The all-to-all collectives themselves, the permutation and the split sizes are Megatron's, over gloo.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
from megatron.core.transformer.moe import token_dispatcher

__all__ = ["cpu_token_dispatcher_streams"]


class _DoneEvent:
    def synchronize(self) -> None:
        """Host work is finished when it returns: nothing to wait for."""


class _CPUStream:
    def wait_stream(self, stream) -> None:
        """One stream only: ordering is program order."""

    def record_event(self, event=None) -> _DoneEvent:
        return _DoneEvent()


_THE_STREAM = _CPUStream()


class _CudaStreamsOnCPU:
    Stream = staticmethod(lambda *args, **kwargs: _THE_STREAM)
    current_stream = staticmethod(lambda *args, **kwargs: _THE_STREAM)
    stream = staticmethod(lambda *args, **kwargs: contextlib.nullcontext())

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchWithCPUStreams(types.ModuleType):
    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaStreamsOnCPU()

    def __getattr__(self, name):
        return getattr(torch, name)


def _host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """``maybe_move_tensor_to_cpu`` as for a CUDA tensor: the host tensor, or its NumPy array."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


@contextlib.contextmanager
def cpu_token_dispatcher_streams() -> Iterator[None]:
    """Build and run ``MoEAlltoAllTokenDispatcher`` on CPU (see the module docstring)."""
    dispatcher = token_dispatcher.MoEAlltoAllTokenDispatcher
    saved = (token_dispatcher.torch, dispatcher.cuda_dtoh_stream, token_dispatcher.maybe_move_tensor_to_cpu)
    token_dispatcher.torch = _TorchWithCPUStreams()
    dispatcher.cuda_dtoh_stream = None
    token_dispatcher.maybe_move_tensor_to_cpu = _host_copy
    try:
        yield
    finally:
        token_dispatcher.torch, dispatcher.cuda_dtoh_stream, token_dispatcher.maybe_move_tensor_to_cpu = saved
