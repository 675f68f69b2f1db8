"""The exact-gradient OCC estimator: the paper's "Full-model" calibration against which the proxy stands.

For head ``k``, with ``g_RL`` the gradient of the RL loss and ``g_MTP_k`` that of head k's MTP policy loss at
unit coefficient, both with respect to the parameters both losses reach (the trunk: embedding and decoder; the
output layer only with ``train_lm_head``)::

    c_k = <g_RL, g_MTP_k>      v_k^2 = ||g_MTP_k||^2      lambda_k = lambda_plus_gradient * c_k / (v_k^2 + eps)

The gradients are read after Megatron's ``finalize_model_grads``, i.e. as the optimizer would see them: averaged
over the data-parallel (and context-parallel) ranks, so every DP rank holds the same values and the sums are not
reduced over DP. Each parameter is counted once over the model-parallel ranks (TP shards summed, TP-replicated
parameters on TP rank 0 only, the MTP stage's word-embedding copy and a tied output weight, which
``finalize_model_grads`` makes equal to the first stage's, left out) and the partial sums are all-reduced over
the model-parallel (TP x PP) group. A non-finite ``c`` or ``v^2`` gives lambda 0 and is counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from verl.utils.metric import AggregationType, Metric
from verl_mtp.trainer.ppo.mtp_occ import HeadMetric, calibrated_lambda

__all__ = [
    "shared_trunk_parameters",
    "GradientSnapshot",
    "head_products",
    "GradientOCC",
    "gradient_occ",
    "gradient_occ_metrics",
]


def _counted_once(param: torch.nn.Parameter) -> bool:
    """False for the copies of a parameter whose gradient another model-parallel rank already counts."""
    if not (param_is_not_tensor_parallel_duplicate(param) and param_is_not_shared(param)):
        return False
    is_embedding_copy = getattr(param, "shared_embedding", False)
    return not (is_embedding_copy and not parallel_state.is_pipeline_first_stage(ignore_virtual=True))


def shared_trunk_parameters(models: Iterable[torch.nn.Module], train_lm_head: bool) -> list[torch.nn.Parameter]:
    """This rank's parameters that both the RL loss and the MTP policy loss reach, each counted once.

    ``models`` are the unwrapped GPTModel chunks. The MTP layers only get the MTP loss; the output layer gets the
    MTP loss only with ``train_lm_head`` (otherwise the heads run it with detached weights).
    """
    params = []
    for model in models:
        for name, param in model.named_parameters():
            if not param.requires_grad or name.startswith("mtp."):
                continue
            if name.startswith("output_layer.") and not train_lm_head:
                continue
            if _counted_once(param):
                params.append(param)
    return params


def _grad(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """The accumulated gradient: Megatron DDP's ``main_grad`` when wrapped, else ``.grad``."""
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad


@dataclass
class GradientSnapshot:
    """Copies of the gradients of ``params`` (``None`` where a loss did not reach a parameter)."""

    grads: list[Optional[torch.Tensor]]

    @classmethod
    def take(cls, params: list[torch.nn.Parameter]) -> "GradientSnapshot":
        return cls([None if (g := _grad(p)) is None else g.detach().clone() for p in params])


def head_products(rl: GradientSnapshot, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """``[<g_RL, g>, ||g||^2, ||g_RL||^2]`` over this rank's counted parameters in float64, ``g`` being the
    gradients ``params`` hold now (those of one head's MTP loss)."""
    sums = torch.zeros(3, dtype=torch.float64, device=params[0].device if params else "cpu")
    for g_rl, param in zip(rl.grads, params, strict=True):
        g_mtp = _grad(param)
        a = None if g_rl is None else g_rl.double()
        b = None if g_mtp is None else g_mtp.detach().double()
        if a is not None and b is not None:
            sums[0] += (a * b).sum()
        if b is not None:
            sums[1] += (b * b).sum()
        if a is not None:
            sums[2] += (a * a).sum()
    return sums


@dataclass
class GradientOCC:
    """The gradient estimator's statistics of every head, as device tensors ``[K]``."""

    c: torch.Tensor
    v2: torch.Tensor
    rl_sq: torch.Tensor  # ||g_RL||^2 (same for every head), for the cosine

    def lambdas(self, lambda_plus: float, eps: float, max_abs: Optional[float] = None):
        """Per-head lambda (0 where non-finite, clamped to ``max_abs``) and the non-finite flags."""
        return calibrated_lambda(self.c, self.v2, lambda_plus, eps, max_abs)

    def cosine(self) -> torch.Tensor:
        norm = (self.rl_sq * self.v2).sqrt()
        cos = self.c / norm
        return torch.where((norm > 0) & torch.isfinite(cos), cos, torch.zeros_like(cos))


def gradient_occ(per_head: list[torch.Tensor], group=None) -> GradientOCC:
    """The statistics from each head's local :func:`head_products`, summed over ``group`` (by default the
    model-parallel group) in one collective."""
    sums = torch.stack(per_head)  # [K, 3]
    if torch.distributed.is_initialized():
        if group is None:
            group = parallel_state.get_model_parallel_group()
        torch.distributed.all_reduce(sums, group=group)
    return GradientOCC(c=sums[:, 0], v2=sums[:, 1], rl_sq=sums[0, 2])


def gradient_occ_metrics(stats: GradientOCC, lam: torch.Tensor, nonfinite: torch.Tensor) -> dict:
    """Per-head gradient-estimator metrics as verl ``Metric``s (one per update), read back in one device->host
    copy."""
    names = (HeadMetric.GRAD_C, HeadMetric.GRAD_V2, HeadMetric.GRAD_COS, HeadMetric.GRAD_LAMBDA,
             HeadMetric.GRAD_NONFINITE)
    columns = (stats.c, stats.v2, stats.cosine(), lam, nonfinite)
    values = torch.stack([c.detach().to(torch.float64) for c in columns], dim=1).tolist()  # [K, 5]
    return {
        HeadMetric.key(k, name): Metric(value=value, aggregation=AggregationType.MEAN)
        for k, row in enumerate(values, start=1)
        for name, value in zip(names, row, strict=True)
    }
