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

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from verl.utils.metric import AggregationType, Metric

__all__ = [
    "shared_trunk_parameters",
    "GradientSnapshot",
    "head_products",
    "GradientOCC",
    "gradient_occ",
    "gradient_occ_metrics",
    "proxy_lambda_metrics",
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
        lam = lambda_plus * self.c / (self.v2 + eps)
        nonfinite = ~(torch.isfinite(self.c) & torch.isfinite(self.v2) & torch.isfinite(lam))
        lam = torch.where(nonfinite, torch.zeros_like(lam), lam)
        if max_abs is not None:
            lam = lam.clamp(-max_abs, max_abs)
        return lam, nonfinite

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
    """Per-head ``actor/mtp_{k}/occ_grad_*`` metrics as verl ``Metric``s, read back in one device->host copy."""
    names = ("occ_grad_c", "occ_grad_v2", "occ_grad_cos", "occ_grad_lambda", "occ_grad_nonfinite")
    columns = (stats.c, stats.v2, stats.cosine(), lam, nonfinite)
    values = torch.stack([c.detach().to(torch.float64) for c in columns], dim=1).tolist()  # [K, 5]
    return {
        f"actor/mtp_{k}/{name}": Metric(value=value, aggregation=AggregationType.MEAN)
        for k, row in enumerate(values, start=1)
        for name, value in zip(names, row, strict=True)
    }


def proxy_lambda_metrics(metrics: dict, num_heads: int, lambda_plus: float, eps: float) -> dict:
    """Per-head ``actor/mtp_{k}/occ_grad_proxy_lambda``: the proxy's lambda of each micro-batch of this update,
    from the OCC sums it already logged (host floats, no device access).

    On a diagnosed update it pairs with ``occ_grad_lambda`` of the same tokens and weights, whatever coefficient
    the update used (a fixed one, the proxy's, or the estimator's), so the two estimators can be compared
    update by update; verl's step metric averages both over the step's diagnosed updates only.
    """
    out = {}
    for k in range(1, num_heads + 1):
        cross = metrics.get(f"actor/mtp_{k}/occ_cross_sum")
        dmtp_sq = metrics.get(f"actor/mtp_{k}/occ_dmtp_sq_sum")
        if cross is None or dmtp_sq is None:  # a pipeline stage without the output layer logs no loss metrics
            continue
        values = [lambda_plus * c / (s + eps) for c, s in zip(_values(cross), _values(dmtp_sq), strict=True)]
        metric = Metric(aggregation=AggregationType.MEAN)
        metric.extend([v if math.isfinite(v) else 0.0 for v in values])
        out[f"actor/mtp_{k}/occ_grad_proxy_lambda"] = metric
    return out


def _values(metric) -> list[float]:
    """The per-micro-batch values of a merged metric (a verl ``Metric`` or a plain list)."""
    return list(metric.values if isinstance(metric, Metric) else metric)
