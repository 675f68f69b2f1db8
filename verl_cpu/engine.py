"""CPU variant of whatever Megatron engine is registered for ``cuda``, for ``EngineRegistry`` device ``cpu``.

verl registers its Megatron engines for device ``"cuda"`` only (``EngineRegistry.register(..., backend=
"megatron")`` with its default ``device="cuda"``, verl 0.9.1), so ``EngineRegistry.get_engine_cls`` raises
"No engine registered for device='cpu'". The CPU entry is a subclass of the ``cuda`` engine that replaces only
the optimizer (:class:`~verl_cpu.optimizer.CPUMixedPrecisionOptimizer`) and runs its entry points inside
:func:`~verl_cpu.cuda.on_cpu` (Megatron-Core's literal ``device="cuda"``).

Which engine is the ``cuda`` one can change after this platform loaded (an extension such as an MTP engine
swaps itself in when its module is imported, and import order is the user's), so the ``cpu`` entries are not
fixed at start-up: :func:`install_cpu_engine_lookup` wraps verl's lookup to rebuild them from the current
``cuda`` entries right before verl resolves an engine (:func:`register_cpu_engines`, the platform's one write
into verl's engine registry).
"""

from __future__ import annotations

import functools

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


def register_cpu_engines() -> None:
    """Point ``EngineRegistry[model_type]["megatron"]["cpu"]`` at the CPU variant of its current ``cuda`` engine."""
    from verl.workers.engine.base import EngineRegistry

    for backends in EngineRegistry._engines.values():
        megatron = backends.get("megatron")
        if not megatron:
            continue
        src = megatron.get("cuda") or megatron.get(("cuda", "nvidia"))
        if src is not None:
            megatron["cpu"] = make_cpu_engine(src)


def install_cpu_engine_lookup() -> None:
    """Make ``EngineRegistry.get_engine_cls`` refresh the ``cpu`` entries first (see the module doc). Idempotent."""
    from verl.workers.engine.base import EngineRegistry

    lookup = EngineRegistry.__dict__["get_engine_cls"].__func__
    if getattr(lookup, "_verl_cpu", False):
        return

    @functools.wraps(lookup)
    def get_engine_cls(cls, model_type: str, backend: str):
        register_cpu_engines()
        return lookup(cls, model_type, backend)

    get_engine_cls._verl_cpu = True
    EngineRegistry.get_engine_cls = classmethod(get_engine_cls)
    register_cpu_engines()
