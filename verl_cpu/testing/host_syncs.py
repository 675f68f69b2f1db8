"""Count the host synchronisations a piece of PyTorch code makes, as a GPU would pay for them.

On a GPU every host read of a device value drains the stream: ``item()`` / ``bool`` / ``int`` / ``float`` /
index use of a tensor (``aten._local_scalar_dense``), an op whose output shape depends on the data
(``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``, a boolean-mask
``index`` / ``index_put``), ``equal``, and every blocking copy between host and device (``tolist``,
``numpy``, ``cpu()``, a tensor built from Python data on the device, a host tensor moved there).

:class:`HostSyncCounter` counts them at the dispatcher, so verl's helpers and torch's nested tensors are
counted by what they do inside, not as one call each. On a CPU run host and device are the same memory and
the copies dispatch nothing, so the counter also watches the Python-level calls that would copy on a GPU
(``tolist``, ``numpy``, ``cpu``, ``to(device)``, ``torch.tensor(..., device=...)``) and remembers which
tensors were made on the host (built from Python data or by a factory without a device, and everything
computed only from those): reading or moving those costs a GPU nothing and is not counted. On CUDA the
cross-device copies are seen at the dispatcher directly.

    with HostSyncCounter() as counter:
        step()
    counter.total, counter.by_kind(), counter.by_site()
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
import traceback
import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from verl_cpu.patches import tensor_host_reads

__all__ = ["HostSync", "HostSyncCounter"]

_aten = torch.ops.aten
_DATA_DEPENDENT = {
    _aten.nonzero.default, _aten.nonzero.out, _aten.masked_select.default, _aten.masked_select.out,
    _aten._unique.default, _aten._unique2.default, _aten.unique_dim.default, _aten.unique_consecutive.default,
    _aten.unique_dim_consecutive.default,
}
_BOOL_INDEXED = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}
_FACTORIES = {
    torch.tensor, torch.as_tensor, torch.from_numpy, torch.arange, torch.zeros, torch.ones, torch.empty,
    torch.full, torch.rand, torch.randn, torch.randint, torch.linspace,
}
_MOVES = {torch.Tensor.to, torch.Tensor.cuda}
_MODE_HANDLERS = ("__torch_function__", "__torch_dispatch__")  # other modes' frames (the CPU platform's)
_OWN_FILES = (__file__, "torch/", "torch\\", "<frozen", "contextlib.py", "functools.py")


@dataclasses.dataclass(frozen=True)
class HostSync:
    kind: str  # item | data_dependent_shape | equal | device_to_host | host_to_device
    op: str
    site: str  # the first frame outside torch and this module: ``path:line in function``


def _site() -> str:
    for frame in reversed(traceback.extract_stack()[:-3]):
        if frame.name not in _MODE_HANDLERS and not any(part in frame.filename for part in _OWN_FILES):
            return f"{_short(frame.filename)}:{frame.lineno} in {frame.name}"
    return "?"


def _short(filename: str) -> str:
    """A file as the module path it is imported by (``verl/...``, ``megatron/...``), relative to the deepest
    ``sys.path`` entry holding it: the same on every machine."""
    roots = [os.path.join(os.path.abspath(entry or os.curdir), "") for entry in sys.path]
    holding = [root for root in roots if filename.startswith(root)]
    return filename[len(max(holding, key=len)) :] if holding else os.path.basename(filename)


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


class _HostTensors:
    """The tensors that live on the host during a CPU run (weakly held, so the count never keeps memory)."""

    def __init__(self):
        self._ids: dict[int, weakref.ref] = {}

    def discard(self, t: torch.Tensor) -> None:
        self._ids.pop(id(t), None)

    def add(self, tensors) -> None:
        for t in tensors:
            if not t.is_nested:
                self._ids[id(t)] = weakref.ref(t, self._forget(id(t)))

    def _forget(self, key: int):
        """The callback that drops a collected tensor's id, so that a new tensor reusing it is not taken for it."""
        return lambda _ref: self._ids.pop(key, None)

    def __contains__(self, t: torch.Tensor) -> bool:
        ref = self._ids.get(id(t))
        return ref is not None and ref() is t


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ins = _tensors((args, kwargs))
        if any(is_traceable_wrapper_subclass(t) for t in ins):
            return NotImplemented  # a nested tensor: let it run its parts, which come back here
        out = func(*args, **kwargs)
        self.counter._dispatched(func, args, kwargs, ins, out)
        return out


class _Function(TorchFunctionMode):
    """CPU runs only: the Python-level calls that copy between host and device on a GPU."""

    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.counter._called(func, args, kwargs, out)
        return out


class HostSyncCounter:
    """Context manager recording every host synchronisation of the code run inside it (see module doc).

    ``device``: the device the step computes on; ``cpu`` turns on the emulation of a GPU's copies.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.emulate = torch.device(device).type == "cpu"
        self.syncs: list[HostSync] = []
        self._host = _HostTensors()
        self._reading_now = False
        self._modes = [_Function(self), _Dispatch(self)] if self.emulate else [_Dispatch(self)]

    def __enter__(self) -> HostSyncCounter:
        if self.emulate:
            self._host_reads = tensor_host_reads(
                lambda name, original: self._reading(name.strip("_").replace("array", "numpy"), original))
            self._host_reads.apply()
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        if self.emulate:
            self._host_reads.undo()

    @property
    def total(self) -> int:
        return len(self.syncs)

    def by_kind(self) -> dict[str, int]:
        return dict(collections.Counter(s.kind for s in self.syncs))

    def by_site(self) -> dict[str, int]:
        return dict(collections.Counter(f"{s.kind} {s.op} at {s.site}" for s in self.syncs).most_common())

    def _record(self, kind: str, op) -> None:
        self.syncs.append(HostSync(kind, str(op), _site()))

    def _dispatched(self, func, args, kwargs, ins, out) -> None:
        on_host = self.emulate and ins and all(t in self._host for t in ins)
        if on_host:
            self._host.add(_tensors(out))
            return
        if func is _aten._local_scalar_dense.default:
            self._record("item", func)
        elif func in _DATA_DEPENDENT or (func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None):
            self._record("data_dependent_shape", func)
        elif func in _BOOL_INDEXED and any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1])):
            self._record("data_dependent_shape", func)
        elif func is _aten.equal.default:
            self._record("equal", func)
        elif not self.emulate and func in (_aten._to_copy.default, _aten.copy_.default):
            self._cross_device_copy(func, args, kwargs, ins, out)

    def _cross_device_copy(self, func, args, kwargs, ins, out) -> None:
        src = args[1] if func is _aten.copy_.default else args[0]
        dst = args[0] if func is _aten.copy_.default else out
        blocking = not kwargs.get("non_blocking", args[2] if func is _aten.copy_.default and len(args) > 2 else False)
        if blocking and src.device.type != dst.device.type:
            self._record("device_to_host" if dst.device.type == "cpu" else "host_to_device", func)

    def _called(self, func, args, kwargs, out) -> None:
        if func in _FACTORIES:
            if kwargs.get("device") is None:
                self._host.add(_tensors(out))
            elif func in (torch.tensor, torch.as_tensor) and not isinstance(args[0], torch.Tensor):
                self._record("host_to_device", func.__name__)  # Python data written to the device
        elif func in _MOVES and args[0] in self._host and (func is torch.Tensor.cuda or _names_device(args[1:], kwargs)):
            self._record("host_to_device", func.__name__)
            self._host.discard(out)  # on CPU the same tensor, now standing for the device copy

    def _reading(self, name: str, original):
        def read(tensor, *args, **kwargs):
            if self._reading_now:  # the C method hands itself to the function mode as this patched method
                return original(tensor, *args, **kwargs)
            self._reading_now = True
            try:
                out = original(tensor, *args, **kwargs)
            finally:
                self._reading_now = False
            if tensor not in self._host and not tensor.is_nested:
                self._record("device_to_host", name)
                if name == "cpu":  # on CPU the same tensor: what is read of it later is on the host
                    self._host.add([out])
            return out

        return read


def _names_device(args, kwargs) -> bool:
    """Whether a ``Tensor.to`` / ``cuda`` call names a device (a dtype-only ``to`` moves nothing)."""
    if "device" in kwargs:
        return True
    return any(isinstance(a, str | torch.device | int) and not isinstance(a, bool) for a in args)
