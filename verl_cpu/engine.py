"""CPU variant of whatever Megatron engine is registered for ``cuda``, answered by ``EngineRegistry`` on CPU.

verl registers its Megatron engines for device ``"cuda"`` only (``EngineRegistry.register(..., backend=
"megatron")`` with its default ``device="cuda"``, verl 0.9.1), so ``EngineRegistry.get_engine_cls`` raises
"No engine registered for device='cpu'". The CPU variant is a subclass of the ``cuda`` engine that replaces only
the optimizer (:class:`~verl_cpu.optimizer.CPUMixedPrecisionOptimizer`) and runs its entry points inside
:func:`~verl_cpu.cuda.on_cpu` (Megatron-Core's literal ``device="cuda"``).

Which engine is the ``cuda`` one can change after this platform loaded (an extension such as an MTP engine
swaps itself in when its module is imported, and import order is the user's), so the variant is made at lookup
time: :func:`cpu_engine_lookup` is verl's lookup (``verl_cpu.patches.VERL_ENGINE_LOOKUP`` installs it) that
answers a Megatron lookup on CPU with the variant of the engine registered for ``cuda`` at that moment. The
registry itself is never written.
"""

from __future__ import annotations

import functools
import os

import torch

_cache: dict[type, type] = {}


class CPUMegatronEngineMixin:
    def _build_optimizer(self):
        from verl.utils.megatron.optimizer import init_megatron_optim_config
        from verl.utils.megatron_utils import register_megatron_training_hooks

        from verl_cpu.optimizer import CPUMixedPrecisionOptimizer

        config = init_megatron_optim_config(
            self.optimizer_config,
            use_distributed_optimizer=False,
            fp16=self.param_dtype == torch.float16,
            bf16=self.param_dtype == torch.bfloat16,
        )
        # verl's default use_distributed_optimizer=True stays on for DDP: it keeps the contiguous param buffer
        # verl's load/offload and weight export read (verl.utils.megatron_utils.load_megatron_model_to_gpu reads
        # buffer.param_data, None otherwise) and reduce-scatters the gradients; the CPU optimizer, never sharded,
        # gathers the reduced shards back before its step (verl_cpu.optimizer.gather_reduced_grad_shards).
        optimizer = CPUMixedPrecisionOptimizer(self.module, config)
        register_megatron_training_hooks(self.module, optimizer)
        return optimizer


# Engine methods that reach Megatron-Core and so run inside CudaToCPUMode.
_REDIRECTED = (
    "initialize", "train_batch", "infer_batch", "forward_backward_batch", "forward_step", "optimizer_step",
    "optimizer_zero_grad", "lr_scheduler_step", "to", "save_checkpoint", "load_checkpoint",
    "get_per_tensor_param",
)


def make_cpu_engine(base: type) -> type:
    """The CPU variant of engine class ``base`` (one class per ``base``; a CPU variant is its own variant)."""
    from verl_cpu.cuda import on_cpu

    if issubclass(base, CPUMegatronEngineMixin):
        return base
    if base not in _cache:
        ns = {"__module__": __name__}
        for name in _REDIRECTED:
            fn = getattr(base, name, None)
            if callable(fn):
                ns[name] = on_cpu(fn)
        ns["_build_optimizer"] = CPUMegatronEngineMixin._build_optimizer
        _cache[base] = type(f"CPU{base.__name__}", (CPUMegatronEngineMixin, base), ns)
    return _cache[base]


def _engine_device() -> str:
    """The device verl looks an engine up for (its own rule: the platform's, unless ``VERL_ENGINE_DEVICE``)."""
    from verl.utils.device import get_device_name

    return os.getenv("VERL_ENGINE_DEVICE") or get_device_name()


def cpu_engine_lookup(original: classmethod) -> classmethod:
    """``EngineRegistry.get_engine_cls`` answering the Megatron backend on CPU with the CPU variant of the
    ``cuda`` engine, unless a ``cpu`` engine is registered; every other lookup is ``original``'s."""
    lookup = original.__func__

    @functools.wraps(lookup)
    def get_engine_cls(cls, model_type: str, backend: str):
        engines = cls._engines.get(model_type, {}).get(backend, {})
        cuda = engines.get("cuda") or engines.get(("cuda", "nvidia"))
        if backend == "megatron" and cuda is not None and "cpu" not in engines and _engine_device() == "cpu":
            return make_cpu_engine(cuda)
        return lookup(cls, model_type, backend)

    return classmethod(get_engine_cls)
