"""A Megatron-Core ``MegatronOptimizer`` that runs on CPU: fp32 master weights + ``torch.optim.AdamW``.

Blocker it replaces: every Megatron-Core 0.16.1 optimizer creates CUDA tensors in its constructor or step
(``MixedPrecisionOptimizer.__init__``: ``torch.tensor([1.0], device='cuda')``; ``FP32Optimizer``;
``Float16OptimizerWithFloat16Params`` only accepts ``'torch.cuda.BFloat16Tensor'`` params; the gradient clipping
helpers in ``megatron.core.optimizer.clip_grads``; the grad scalers) and verl 0.9.1's Megatron engine only
accepts bf16/fp16 params (``McoreEngineConfig``), so there is no CPU-capable Megatron optimizer to pick.

This one keeps Megatron's optimizer interface (``step() -> (ok, grad_norm, num_zeros)``, ``zero_grad``,
``scale_loss``, ``param_groups`` for ``OptimizerParamScheduler``, ``state_dict``) and Megatron's numerics for a
bf16 model: gradients are read from the DDP fp32 ``main_grad`` buffers, clipped by the global L2 norm
(all-reduced over the model-parallel group), applied to fp32 master copies with AdamW, and copied back to
the bf16 parameters. No loss scaling (bf16). Not supported: sharded optimizer state, CPU offload of optimizer
state. ``sharded_state_dict`` follows Megatron's Float16 optimizer layout.

Megatron's DDP built for a distributed optimizer (verl's default, which also keeps the contiguous param buffer
verl's weight export reads) reduce-scatters the gradients: after the backward pass each data-parallel rank holds
the reduced gradient of its own shard of every bucket only. :func:`gather_reduced_grad_shards` completes that
with an all-gather of the shards over the same group, so every rank reads the full reduced gradient and makes
the same (replicated) update -- the numerics of a plain all-reduce, with optimizer state kept whole on each rank.
"""

from __future__ import annotations

import math

import torch
from megatron.core.optimizer.optimizer import MegatronOptimizer


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim == 1 or name.endswith(".bias")


def gather_reduced_grad_shards(model_chunks) -> None:
    """All-gather the reduce-scattered gradient shards of every DDP bucket (see the module doc); a no-op for
    a DDP without distributed optimizer (it all-reduces) or with one data-parallel rank."""
    for chunk in model_chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is None or not ddp_config.use_distributed_optimizer:
            continue
        for group in [*chunk.bucket_groups, *chunk.expert_parallel_bucket_groups]:
            size = group.intra_distributed_optimizer_instance_size
            if size == 1:
                continue
            rank = group.intra_distributed_optimizer_instance_rank
            for bucket in group.buckets:
                shard = bucket.grad_data.numel() // size
                own = bucket.grad_data[rank * shard:(rank + 1) * shard].clone()
                torch.distributed.all_gather_into_tensor(
                    bucket.grad_data, own, group=group.intra_distributed_optimizer_instance_group)


class CPUMixedPrecisionOptimizer(MegatronOptimizer):
    def __init__(self, model_chunks, config):
        self.model_chunks = list(model_chunks)
        self.model_params: list[list[torch.nn.Parameter]] = []
        self.main_params: list[list[torch.nn.Parameter]] = []
        groups = {True: ([], []), False: ([], [])}  # no_wd -> (model params, main params)
        for chunk in self.model_chunks:
            for name, p in chunk.named_parameters():
                if not p.requires_grad:
                    continue
                main = torch.nn.Parameter(p.detach().clone().float())
                for attr in ("tensor_model_parallel", "partition_dim", "partition_stride", "shared"):
                    if hasattr(p, attr):
                        setattr(main, attr, getattr(p, attr))
                g = groups[_no_weight_decay(name, p)]
                g[0].append(p)
                g[1].append(main)
        param_groups = []
        for no_wd, (model_ps, main_ps) in groups.items():
            if not main_ps:
                continue
            self.model_params.append(model_ps)
            self.main_params.append(main_ps)
            param_groups.append({
                "params": main_ps, "wd_mult": 0.0 if no_wd else 1.0, "lr_mult": 1.0,
                "is_expert_parallel": False, "is_decoupled_lr": False,
                "weight_decay": 0.0 if no_wd else config.weight_decay,
            })
        if config.optimizer != "adam":
            raise NotImplementedError(f"CPU optimizer: only adam(w) is implemented, got {config.optimizer}")
        base = torch.optim.AdamW(param_groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                 eps=config.adam_eps, weight_decay=config.weight_decay)
        super().__init__(base, config)
        self.is_stub_optimizer = False
        self._loss_scale = torch.tensor([1.0])

    # --- gradients -------------------------------------------------------------------------------------
    def _pairs(self):
        for model_ps, main_ps in zip(self.model_params, self.main_params):
            yield from zip(model_ps, main_ps)

    def prepare_grads(self) -> bool:
        gather_reduced_grad_shards(self.model_chunks)
        for p, main in self._pairs():
            grad = getattr(p, "main_grad", None)
            if grad is None:
                grad = p.grad
            main.grad = None if grad is None else grad.detach().float().clone()
        return False  # no inf/nan detection needed beyond the norm check in step()

    def get_main_grads_for_grad_norm(self):
        return [m.grad for _, m in self._pairs() if m.grad is not None]

    def _grad_norm(self) -> float:
        from megatron.core import parallel_state as mpu

        sq = torch.zeros(1, dtype=torch.float64)
        for p, main in self._pairs():
            if main.grad is None:
                continue
            # count TP-duplicated (non-partitioned) params only once across the TP group
            if getattr(p, "tensor_model_parallel", False) or mpu.get_tensor_model_parallel_rank() == 0:
                sq += main.grad.double().pow(2).sum()
        if mpu.get_model_parallel_group() is not None and torch.distributed.get_world_size(
            mpu.get_model_parallel_group()
        ) > 1:
            torch.distributed.all_reduce(sq, group=mpu.get_model_parallel_group())
        return float(sq.sqrt())

    def step_with_ready_grads(self) -> bool:
        self.optimizer.step()
        with torch.no_grad():
            for p, main in self._pairs():
                p.data.copy_(main.data.to(p.dtype))
        return True

    @torch.no_grad()
    def step(self):
        self.prepare_grads()
        grad_norm = self._grad_norm()
        if not math.isfinite(grad_norm):
            return False, grad_norm, None
        if self.config.clip_grad and self.config.clip_grad > 0:
            coef = self.config.clip_grad / (grad_norm + 1.0e-6)
            if coef < 1.0:
                for main in self.get_main_grads_for_grad_norm():
                    main.mul_(coef)
        ok = self.step_with_ready_grads()
        return ok, grad_norm, None

    def zero_grad(self, set_to_none: bool = True):
        for p, main in self._pairs():
            main.grad = None
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    # --- misc interface --------------------------------------------------------------------------------
    def get_loss_scale(self) -> torch.Tensor:
        return self._loss_scale

    @torch.no_grad()
    def reload_model_params(self, state_dict=None):
        for p, main in self._pairs():
            main.data.copy_(p.data.float())

    def state_dict(self):
        # Same layout as Megatron's Float16OptimizerWithFloat16Params: per-group fp32 master params.
        return {"optimizer": self.optimizer.state_dict(),
                "fp32_from_fp16_params": [list(group) for group in self.main_params]}

    def load_state_dict(self, state_dict):
        opt_state = state_dict["optimizer"]
        step = opt_state["state"].pop("common_step", None) if "state" in opt_state else None
        if step is not None:
            self._restore_common_per_param_step(opt_state, step)
        self.optimizer.load_state_dict(opt_state)
        with torch.no_grad():
            for main_group, saved_group, model_group in zip(
                self.main_params, state_dict["fp32_from_fp16_params"], self.model_params
            ):
                for main, saved, p in zip(main_group, saved_group, model_group):
                    main.data.copy_(saved)
                    p.data.copy_(main.data.to(p.dtype))

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata=None, **kwargs):
        """Megatron dist-checkpointing layout of Float16OptimizerWithFloat16Params (master params + Adam
        moments as ShardedTensors keyed like the model params; one common step)."""
        from itertools import chain

        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            make_sharded_optimizer_tensor,
            optim_state_to_sharding_state,
        )

        if is_loading:  # materialise Adam state so there is something to load into
            for group in self.optimizer.param_groups:
                for main in group["params"]:
                    if len(self.optimizer.state[main]) == 0:
                        self.optimizer.state[main]["step"] = torch.tensor(0.0)
                        self.optimizer.state[main]["exp_avg"] = torch.zeros_like(main.data)
                        self.optimizer.state[main]["exp_avg_sq"] = torch.zeros_like(main.data)
        state_dict = self.state_dict()
        id_to_sharded = get_param_id_to_sharded_param_map(model_sharded_state_dict,
                                                          chain.from_iterable(self.model_params))
        state_dict["fp32_from_fp16_params"] = [
            [make_sharded_optimizer_tensor(id_to_sharded[pid], main, prefix="optimizer.state.fp32_param")
             for pid, main in zip(sgroup["params"], group)]
            for group, sgroup in zip(state_dict["fp32_from_fp16_params"], state_dict["optimizer"]["param_groups"])
        ]
        step = self._extract_common_per_param_step(state_dict["optimizer"])
        optim_state_to_sharding_state(state_dict["optimizer"], id_to_sharded, exclude_keys="step")
        if step:
            state_dict["optimizer"]["state"]["common_step"] = step
        return state_dict
