"""Optimal Coefficient Calibration (OCC): every way the MTP policy term's coefficient is chosen, in one place.

The paper's log-probability proxy for the optimal MTP coefficient, per head and over response tokens ``m``::

    dRL  = log pi     - log pi_old        (main head, current parameters)
    dMTP = log pi_MTP - log pi_old        (MTP head, same sampled token)
    lambda = lambda_plus * sum(m * dRL * dMTP) / (sum(m * dMTP^2) + eps)

It is a ratio of masked sums (not a mean of per-token ratios), computed without gradient from tensors the
step already has. The exact-gradient estimator (:mod:`verl_mtp.trainer.ppo.mtp_occ_gradient`) has the same form
with ``<g_RL, g_MTP>`` and ``||g_MTP||^2``; :func:`calibrated_lambda` is the one place either ratio is taken
(zero where it would not be finite, then clamped). :func:`head_coefficient` chooses what a head's term is
scaled by: the fixed ``mtp_loss_scaling_factor / K``, the proxy (over the micro-batch or, all-reduced, over the
data-parallel group; carried across signal-free micro-batches), or a coefficient the engine gives.

Log-probs are floored at ``LOG_PROB_FLOOR`` first so a ``-inf`` cannot turn the sums into NaN; nothing
non-finite reaches the optimizer. Every value here stays on the device: deciding never waits for the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from verl_mtp.workers.config.mtp import OCCConfig

__all__ = [
    "LOG_PROB_FLOOR",
    "HeadMetric",
    "OCCStatistics",
    "occ_statistics",
    "calibrated_lambda",
    "OCCState",
    "scoped_statistics",
    "head_coefficient",
]

LOG_PROB_FLOOR = -1e4


class HeadMetric:
    """Names of the per-head metrics (``actor/mtp_{k}/<name>``); none may contain "min"/"max", which verl's
    metric reduction would read as the aggregation."""

    LAMBDA = "lambda"  # the coefficient, on micro-batches whose dRL carries signal
    COEF_APPLIED = "coef_applied"  # the coefficient that scaled the advantages, on every micro-batch
    INFORMATIVE = "lambda_informative"  # fraction of micro-batches whose dRL carries signal
    CROSS_SUM = "occ_cross_sum"
    DMTP_SQ_SUM = "occ_dmtp_sq_sum"
    DMTP_MEAN = "dmtp_mean"
    PROXY_LAMBDA_ON_DIAGNOSED = "occ_grad_proxy_lambda"  # the proxy's lambda where the exact one is computed
    GRAD_C = "occ_grad_c"  # the gradient estimator's <g_RL, g_MTP_k>, once per diagnosed update
    GRAD_V2 = "occ_grad_v2"
    GRAD_COS = "occ_grad_cos"
    GRAD_LAMBDA = "occ_grad_lambda"
    GRAD_NONFINITE = "occ_grad_nonfinite"
    TOP1_AGREEMENT = "top1_agreement"
    NONFINITE_TOKENS = "nonfinite_tokens"
    PG_LOSS = "pg_loss"
    HEAD_CE_LOSS = "head_ce_loss"

    @staticmethod
    def key(k: int, name: str) -> str:
        return f"actor/mtp_{k}/{name}"


@dataclass
class OCCStatistics:
    """The masked sums OCC needs, as float64 tensors so they can be all-reduced together."""

    numerator: torch.Tensor  # sum(m * dRL * dMTP)
    denominator: torch.Tensor  # sum(m * dMTP^2)
    abs_drl_sum: torch.Tensor  # sum(m * |dRL|), to tell a signal-free micro-batch
    dmtp_sum: torch.Tensor  # sum(m * dMTP), for the mean-dMTP metric
    count: torch.Tensor  # sum(m)

    def stacked(self) -> torch.Tensor:
        return torch.stack([self.numerator, self.denominator, self.abs_drl_sum, self.dmtp_sum, self.count])

    @classmethod
    def from_stacked(cls, t: torch.Tensor) -> "OCCStatistics":
        return cls(*t.unbind(0))

    def all_reduce(self, group) -> "OCCStatistics":
        """Sum over ``group`` (the data-parallel group) in one collective."""
        t = self.stacked()
        torch.distributed.all_reduce(t, group=group)
        return OCCStatistics.from_stacked(t)

    def informative(self, threshold: float) -> torch.Tensor:
        """Whether dRL carries signal (mean |dRL| above ``threshold``): not so before a step's first update,
        where log pi == log pi_old and lambda is 0 by construction."""
        return self.abs_drl_sum / self.count.clamp_min(1) > threshold


@torch.no_grad()
def occ_statistics(
    log_prob: torch.Tensor, mtp_log_prob: torch.Tensor, old_log_prob: torch.Tensor, mask: torch.Tensor
) -> OCCStatistics:
    """Masked OCC sums over ``[b, t]`` tensors; ``mask`` selects response tokens the MTP head scores."""
    m = mask.to(torch.float64)
    old = old_log_prob.to(torch.float64).clamp_min(LOG_PROB_FLOOR)
    d_rl = (log_prob.detach().to(torch.float64).clamp_min(LOG_PROB_FLOOR) - old) * m
    d_mtp = (mtp_log_prob.detach().to(torch.float64).clamp_min(LOG_PROB_FLOOR) - old) * m
    d_rl = torch.nan_to_num(d_rl, nan=0.0, posinf=0.0, neginf=0.0)
    d_mtp = torch.nan_to_num(d_mtp, nan=0.0, posinf=0.0, neginf=0.0)
    return OCCStatistics(
        numerator=(d_rl * d_mtp).sum(),
        denominator=(d_mtp * d_mtp).sum(),
        abs_drl_sum=d_rl.abs().sum(),
        dmtp_sum=d_mtp.sum(),
        count=m.sum(),
    )


def calibrated_lambda(
    cross: torch.Tensor, sq: torch.Tensor, lambda_plus: float, eps: float, max_abs: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``lambda_plus * cross / (sq + eps)`` (0 where not finite, then clamped to ``max_abs``) and where it was
    not finite. The proxy passes its log-prob sums, the gradient estimator ``c`` and ``v^2``."""
    lam = lambda_plus * cross / (sq + eps)
    nonfinite = ~(torch.isfinite(cross) & torch.isfinite(sq) & torch.isfinite(lam))
    lam = torch.where(nonfinite, torch.zeros_like(lam), lam)
    if max_abs is not None:
        lam = lam.clamp(-max_abs, max_abs)
    return lam, nonfinite


@dataclass
class OCCState:
    """Per-worker OCC state: the last informative lambda of each head (for ``carry_last_lambda``).

    The carried lambda stays a device tensor (a plain float only after a checkpoint load) and is selected
    with ``torch.where``, so resolving a head's lambda never waits for the device.
    """

    config: OCCConfig
    last_lambda: dict[int, torch.Tensor | float] = field(default_factory=dict)

    def resolve(self, head: int, stats: OCCStatistics) -> tuple[torch.Tensor, torch.Tensor]:
        """Lambda for ``head`` on this micro-batch and whether it came from this micro-batch's own signal
        (a 0-d bool tensor)."""
        cfg = self.config
        lam, _ = calibrated_lambda(stats.numerator, stats.denominator, cfg.lambda_plus, cfg.eps, cfg.max_abs_lambda)
        informative = stats.informative(cfg.uninformative_drl)
        if not cfg.carry_last_lambda:
            return lam, informative
        last = self.last_lambda.get(head, cfg.initial_lambda)
        if not isinstance(last, torch.Tensor):
            last = torch.full_like(lam, last)
        lam = torch.where(informative, lam, last)
        self.last_lambda[head] = lam
        return lam, informative

    def state_dict(self) -> dict:
        return {"last_lambda": {str(k): float(v) for k, v in self.last_lambda.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.last_lambda = {int(k): float(v) for k, v in state.get("last_lambda", {}).items()}


def scoped_statistics(mtp_config, stats: OCCStatistics, dp_group=None) -> OCCStatistics:
    """The sums OCC calibrates on: this micro-batch's, or with ``occ.scope=data_parallel`` their sum over
    ``dp_group`` (one collective of 5 floats), so every rank uses the same lambda."""
    occ = mtp_config.occ
    if occ.enable and occ.scope == "data_parallel" and dp_group is not None:
        return stats.all_reduce(dp_group)
    return stats


def head_coefficient(
    mtp_config, occ_state: OCCState | None, k: int, num_heads: int, stats: OCCStatistics,
    given: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head ``k``'s coefficient on this micro-batch (a 0-d float64 tensor) and whether its dRL carries signal.

    ``stats`` come from :func:`scoped_statistics`. ``given`` (the gradient estimator's lambda, or 1 for its
    unit-coefficient pass) wins; else OCC's proxy when ``occ.enable``; else the fixed
    ``mtp_loss_scaling_factor / K``, split over heads like Megatron's MTP cross-entropy.
    """
    informative = stats.informative(mtp_config.occ.uninformative_drl)
    if given is not None:
        return given.to(stats.numerator), informative
    if mtp_config.occ.enable:
        return occ_state.resolve(k, stats)
    return torch.full_like(stats.numerator, mtp_config.mtp_loss_scaling_factor / num_heads), informative
