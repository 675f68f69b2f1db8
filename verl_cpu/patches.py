"""Every change the CPU platform makes to code it does not own (torch.cuda, Megatron-Core, verl, mbridge): one
object each, listed here with what it replaces and why.

Importing ``verl_cpu`` changes nothing. :meth:`Patch.apply` makes one change and keeps what it replaced;
:meth:`Patch.undo` puts exactly that back; both are idempotent. verl's CPU plugin applies
:data:`CPU_PATCHES` in every process of a CPU run (:mod:`verl_cpu.plugin`); :mod:`verl_cpu.testing`
applies :data:`CUDA_ON_CPU`, which is all a process needs to build and run a Megatron-Core model on CPU. A
test installs and removes them with :func:`applied`, which undoes only what it applied itself (so it nests
inside a process where the plugin ran)::

    @pytest.fixture
    def cpu_platform():
        with applied(CPU_PATCHES):
            yield

A patch changes the object its target names and nothing else: no module list is searched for other references.
Where other modules hold their own reference to a function (``from verl.utils.distributed import ...``), the
function object itself is changed (its defaults) rather than the name rebound.
"""

from __future__ import annotations

import contextlib
import importlib
from types import ModuleType
from typing import Any, Callable, Iterable, Iterator

# What the Megatron-Core patches install is imported here; the verl-level ones name theirs by path, imported on
# apply: verl's plugin loading applies them while verl itself is still being imported.
from verl_cpu import device_module
from verl_cpu.cuda import CPURNGStatesTracker

__all__ = [
    "Patch", "AttributePatch", "ItemPatch", "applied", "resolve", "CUDA_ON_CPU", "CPU_PATCHES",
    "TORCH_CUDA", "MEGATRON_RNG_TRACKER", "VERL_PLATFORM", "VERL_ENGINE_LOOKUP", "VERL_PROCESS_GROUP_BACKEND",
    "MBRIDGE_BRIDGES", "VERL_ROLLOUT_REPLICA", "VERL_ROLLOUT_ADAPTER", "MBRIDGE_BRIDGES_ON_GPU",
    "SEQUENCE_PARALLEL_TORCH_NORM", "tensor_host_reads",
]

MISSING = object()  # "there was nothing": undo removes the entry; a maker returns it to leave an entry alone


def resolve(path: str) -> Any:
    """The object ``"package.module:attr.attr"`` names (the module itself without ``:``), imported on demand."""
    module_name, _, attributes = path.partition(":")
    found = importlib.import_module(module_name)
    for name in filter(None, attributes.split(".")):
        found = getattr(found, name)
    return found


class Patch:
    """One change to third-party code: ``target`` names what is changed (see :func:`resolve`), ``replaces`` the
    behaviour it replaces, ``why`` the reason. ``requires``: modules imported before the target is read (their
    import changes it, and the patch must keep their change as the original)."""

    def __init__(self, target: str, replaces: str, why: str, requires: tuple[str, ...] = ()):
        self.target, self.replaces, self.why, self.requires = target, replaces, why, requires
        self._saved: dict | None = None

    @property
    def applied(self) -> bool:
        return self._saved is not None

    def apply(self) -> None:
        if self.applied:
            return
        for module in self.requires:
            importlib.import_module(module)
        self._saved = self._replace(resolve(self.target))

    def undo(self) -> None:
        if self.applied:
            self._restore(resolve(self.target), self._saved)
            self._saved = None

    def _replace(self, owner: Any) -> dict:
        raise NotImplementedError

    def _restore(self, owner: Any, saved: dict) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}: {self.replaces})"


class AttributePatch(Patch):
    """Sets attributes of the target (a module, a class, a function). ``makers`` maps each attribute name to a
    function of the original value (the raw class attribute, :data:`MISSING` if absent) returning its
    replacement."""

    def __init__(self, target: str, makers: dict[str, Callable[[Any], Any]], **describe):
        super().__init__(target, **describe)
        self.makers = makers

    @staticmethod
    def _raw(owner: Any, name: str) -> Any:
        if isinstance(owner, (type, ModuleType)):  # a class's own entry: classmethods come back as they were
            return vars(owner).get(name, MISSING)
        return getattr(owner, name, MISSING)

    def _replace(self, owner: Any) -> dict:
        saved = {name: self._raw(owner, name) for name in self.makers}
        for name, make in self.makers.items():
            value = make(saved[name])
            if value is not MISSING:
                setattr(owner, name, value)
        return saved

    def _restore(self, owner: Any, saved: dict) -> None:
        for name, value in saved.items():
            if value is MISSING:
                if name in vars(owner):
                    delattr(owner, name)
            else:
                setattr(owner, name, value)


class ItemPatch(Patch):
    """Sets entries of the target dict (a registry). ``makers`` maps each key to a function of the original
    entry (:data:`MISSING` if absent) returning the new one."""

    def __init__(self, target: str, makers: dict[Any, Callable[[Any], Any]], **describe):
        super().__init__(target, **describe)
        self.makers = makers

    def _replace(self, owner: dict) -> dict:
        saved = {key: owner.get(key, MISSING) for key in self.makers}
        for key, make in self.makers.items():
            value = make(saved[key])
            if value is not MISSING:
                owner[key] = value
        return saved

    def _restore(self, owner: dict, saved: dict) -> None:
        for key, value in saved.items():
            if value is MISSING:
                owner.pop(key, None)
            else:
                owner[key] = value


@contextlib.contextmanager
def applied(patches: Iterable[Patch]) -> Iterator[None]:
    """Apply ``patches`` for the block, then undo, in reverse order, those this call applied."""
    mine = [patch for patch in patches if not patch.applied]
    try:
        for patch in mine:
            patch.apply()
        yield
    finally:
        for patch in reversed(mine):
            patch.undo()


# ---------------------------------------------------------------------------------------------------------
# Megatron-Core on CPU (the trainer, the tests, the benchmarks)
# ---------------------------------------------------------------------------------------------------------
# torch.cuda functions Megatron-Core calls, answered by the CPU's device module (the one verl's platform uses)
_CUDA_FUNCTIONS = ("current_device", "synchronize", "empty_cache", "ipc_collect", "memory_allocated",
                   "max_memory_allocated", "memory_reserved", "max_memory_reserved", "reset_peak_memory_stats",
                   "mem_get_info", "get_rng_state", "set_rng_state", "current_stream")

TORCH_CUDA = AttributePatch(
    "torch.cuda", {name: (lambda original, name=name: getattr(device_module, name)) for name in _CUDA_FUNCTIONS},
    replaces="torch.cuda." + " / ".join(_CUDA_FUNCTIONS),
    why="Megatron-Core calls torch.cuda directly (device=current_device() for its buffers, synchronize in its "
        "timers, the RNG state, megatron-core 0.19's gradient sync waits on current_stream), which a CPU build "
        "refuses. On CPU: device 'cpu', no-op synchronize and caches, memory counters 0 (free/total = host "
        "memory), the CPU generator, torch's CPU stream. is_available() still answers False, and every other "
        "torch.cuda call still fails loudly.",
)

MEGATRON_RNG_TRACKER = AttributePatch(
    "megatron.core.tensor_parallel.random",
    {
        "_CUDA_RNG_STATE_TRACKER": lambda original: CPURNGStatesTracker(),
        "_CUDA_RNG_STATE_TRACKER_INITIALIZED": lambda original: True,
    },
    replaces="Megatron's global CudaRNGStatesTracker",
    why="its named streams are CUDA generator states (dropout in tensor-parallel regions forks them); the CPU "
        "tracker keeps CPU generator states. Marked initialised, so model_parallel_cuda_manual_seed keeps it and "
        "seeds it; Megatron has no hook to choose the tracker class, hence its module globals.",
)

CUDA_ON_CPU = (TORCH_CUDA, MEGATRON_RNG_TRACKER)


# ---------------------------------------------------------------------------------------------------------
# verl and mbridge on CPU (the trainer's processes)
# ---------------------------------------------------------------------------------------------------------
def _gloo_default_backend(defaults: tuple) -> tuple:
    timeout_second, backend = defaults  # initialize_global_process_group_ray(timeout_second=None, backend=None)
    return (timeout_second, backend or "cpu:gloo")


def _cpu_engine_lookup(original: Any) -> Any:
    return resolve("verl_cpu.engine:cpu_engine_lookup")(original)


def _local_spec_bridge(on_cpu: bool) -> Callable[[Any], Any]:
    """A maker: the local-spec subclass of the bridge registered for a model type (none if there is none)."""
    return lambda original: MISSING if original is MISSING else resolve("verl_cpu.bridges:make_cpu_bridge")(
        original, on_cpu)


def _cpu_rollout_replica() -> type:
    """verl's replica loader for ``hf_cpu``: the class, imported when verl asks (not when the patch is applied)."""
    return resolve("verl_cpu.rollout:CPURolloutReplica")


VERL_PLATFORM = ItemPatch(
    "verl.plugin.platform:PlatformRegistry._platforms",
    {"cpu": lambda original: resolve("verl_cpu.platform:PlatformCPU")},
    replaces="no platform named cpu",
    why="VERL_PLATFORM=cpu selects PlatformCPU (gloo, Ray logical GPU slots, the torch.cpu-like device module).",
)

VERL_ENGINE_LOOKUP = AttributePatch(
    "verl.workers.engine.base:EngineRegistry", {"get_engine_cls": _cpu_engine_lookup},
    replaces="EngineRegistry.get_engine_cls's error 'No engine registered for device=cpu' for the Megatron backend",
    why="verl registers its Megatron engines for cuda only; on CPU the lookup answers the CPU variant of the "
        "engine registered for cuda at that moment (an extension may replace it after this platform loaded).",
)

VERL_PROCESS_GROUP_BACKEND = AttributePatch(
    "verl.utils.distributed:initialize_global_process_group_ray", {"__defaults__": _gloo_default_backend},
    replaces="initialize_global_process_group_ray's default backend f'cpu:gloo,{device}:{nccl backend}'",
    why="on the CPU that is 'cpu:gloo,cpu:gloo', which torch refuses ('Duplicate device type cpu in backend "
        "string'). The function's own default becomes 'cpu:gloo', so every module that imported it sees it.",
)

_BRIDGED = ("qwen2", "llama", "qwen3", "mimo")
MBRIDGE_BRIDGES = ItemPatch(
    "mbridge.core.bridge:_MODEL_REGISTRY", {model_type: _local_spec_bridge(True) for model_type in _BRIDGED},
    requires=("verl.models.mcore.mbridge",),
    replaces="mbridge's bridges for these model types (TransformerEngine layer spec, chunks moved with .cuda())",
    why="TransformerEngine needs CUDA; the CPU bridges (verl_cpu.bridges) build Megatron's local spec.",
)

VERL_ROLLOUT_REPLICA = ItemPatch(
    "verl.workers.rollout.replica:RolloutReplicaRegistry._registry",
    {"hf_cpu": lambda original: _cpu_rollout_replica},
    replaces="no rollout replica named hf_cpu",
    why="vLLM / SGLang need a GPU; actor_rollout_ref.rollout.name=hf_cpu samples with HF transformers on CPU.",
)

VERL_ROLLOUT_ADAPTER = ItemPatch(
    "verl.workers.rollout.base:_ROLLOUT_REGISTRY",
    {("hf_cpu", "async"): lambda original: "verl_cpu.rollout.CPUServerAdapter"},
    replaces="no hybrid-worker rollout adapter for hf_cpu",
    why="the adapter pushes verl's weight stream into the hf_cpu server; verl 0.9.1 has no public way to add one.",
)

CPU_PATCHES = (*CUDA_ON_CPU, VERL_PLATFORM, VERL_ENGINE_LOOKUP, VERL_PROCESS_GROUP_BACKEND, MBRIDGE_BRIDGES,
               VERL_ROLLOUT_REPLICA, VERL_ROLLOUT_ADAPTER)


# ---------------------------------------------------------------------------------------------------------
# the GPU check only (scripts/gpu_check_worker.py), on a GPU machine without TransformerEngine
# ---------------------------------------------------------------------------------------------------------
MBRIDGE_BRIDGES_ON_GPU = ItemPatch(
    "mbridge.core.bridge:_MODEL_REGISTRY", {model_type: _local_spec_bridge(False) for model_type in _BRIDGED},
    requires=("verl.models.mcore.mbridge",),
    replaces="mbridge's bridges for these model types (TransformerEngine layer spec)",
    why="without TransformerEngine mbridge cannot build its spec; these build Megatron's local spec and leave "
        "the model's placement on CUDA to mbridge.",
)


# ---------------------------------------------------------------------------------------------------------
# verl_cpu.testing only: around one model build, and the host-sync counter's duration
# ---------------------------------------------------------------------------------------------------------
TENSOR_HOST_READS = ("tolist", "numpy", "cpu", "__array__")


def tensor_host_reads(wrap: Callable[[str, Callable], Callable]) -> AttributePatch:
    """``torch.Tensor``'s host reads, each ``wrap(name, the method in effect)``: the host-sync counter's
    (:mod:`verl_cpu.testing.host_syncs`), made per counter since its wrappers are its own."""
    return AttributePatch(
        "torch:Tensor",
        {name: (lambda original, name=name: wrap(name, getattr(resolve("torch:Tensor"), name)))
         for name in TENSOR_HOST_READS},
        replaces="torch.Tensor." + " / ".join(TENSOR_HOST_READS),
        why="on CPU these copies dispatch nothing, but on a GPU each is a blocking device-to-host copy; torch's "
            "own Python code calls them too, so the counter wraps the methods rather than one call site.",
    )


SEQUENCE_PARALLEL_TORCH_NORM = AttributePatch(
    "megatron.core.transformer.torch_norm:WrappedTorchNorm",
    {"__new__": lambda original: resolve("verl_cpu.testing.tiny_gpt:tag_sequence_parallel_norms")(original)},
    replaces="WrappedTorchNorm's refusal of sequence_parallel=True",
    why="Megatron's fallback norm (the local spec without Apex) refuses sequence parallelism only because it does "
        "not tag its parameters; the build tags them as the fused norms do.",
)
