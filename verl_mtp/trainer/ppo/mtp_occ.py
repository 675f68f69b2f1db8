"""Optimal Coefficient Calibration (OCC) of the MTP policy loss.

The paper's log-probability proxy for the optimal MTP coefficient, per head and over response tokens ``m``::

    dRL  = log pi     - log pi_old        (main head, current parameters)
    dMTP = log pi_MTP - log pi_old        (MTP head, same sampled token)
    lambda = lambda_plus * sum(m * dRL * dMTP) / (sum(m * dMTP^2) + eps)

It is a ratio of masked sums (not a mean of per-token ratios), computed without gradient from tensors the
step already has. Log-probs are floored at ``LOG_PROB_FLOOR`` first so a ``-inf`` cannot turn the sums into
NaN; a non-finite lambda is replaced by 0 and counted, so nothing non-finite reaches the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from verl_mtp.workers.config.mtp import OCCConfig

__all__ = ["LOG_PROB_FLOOR", "OCCStatistics", "occ_statistics", "occ_lambda", "OCCState"]

LOG_PROB_FLOOR = -1e4


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


def occ_lambda(stats: OCCStatistics, lambda_plus: float, eps: float) -> torch.Tensor:
    """The paper's lambda from the sums; 0 (not NaN) when it would be non-finite."""
    lam = lambda_plus * stats.numerator / (stats.denominator + eps)
    return torch.where(torch.isfinite(lam), lam, torch.zeros_like(lam))


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
        lam = occ_lambda(stats, cfg.lambda_plus, cfg.eps)
        if cfg.max_abs_lambda is not None:
            lam = lam.clamp(-cfg.max_abs_lambda, cfg.max_abs_lambda)
        if not cfg.carry_last_lambda:
            return lam, torch.ones((), dtype=torch.bool, device=lam.device)
        informative = stats.abs_drl_sum / stats.count.clamp_min(1) > cfg.uninformative_drl
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
