"""The MTP policy term added to verl's actor loss (``verl.workers.utils.losses.ppo_loss``).

For each MTP head ``k`` the actor's registered policy loss (vanilla/DAPO clip-higher with dual clip, GSPO's
sequence ratio, any other in verl's ``POLICY_LOSS_REGISTRY``) is applied to the head's aligned log-probs of
the sampled tokens against the same ``old_log_probs``, with advantages multiplied by the head's coefficient
(:func:`verl_mtp.trainer.ppo.mtp_occ.head_coefficient`: OCC's lambda, the fixed one, or the gradient
estimator's). The term uses the same ``loss_agg_mode`` and global normalisation (``global_batch_info``: dp size,
global token count, global batch size) as the main policy loss, and is added after verl's entropy and KL
terms, so neither drops it. With ``detached_head_ce_coef > 0`` each head also gets a cross-entropy term on its
detached-input pass (it trains the heads only, never the trunk).

No host synchronisation but one: the responses are cut out of the packed outputs by a gather built on the
device (:func:`verl_mtp.workers.utils.padding.responses_padded`), the policy losses' own metric reads
(``.item()``) are deferred while they run for the heads, and every scalar metric of every head is read back in
one device->host copy at the end of the micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from tensordict import TensorDict
from torch.overrides import TorchFunctionMode

from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn
from verl.utils.metric import AggregationType, Metric
from verl.workers.config import ActorConfig
from verl_mtp.models.mcore.mtp_alignment import mtp_ce_key, mtp_output_keys
from verl_mtp.trainer.ppo.mtp_occ import (
    HeadMetric,
    OCCState,
    calibrated_lambda,
    head_coefficient,
    occ_statistics,
    scoped_statistics,
)
from verl_mtp.workers.config import MtpRLConfig
from verl_mtp.workers.config.mtp import check_distillation_settings
from verl_mtp.workers.utils.padding import responses_padded

__all__ = ["mtp_policy_loss", "with_mtp_policy_loss", "mtp_head_only_loss"]


@dataclass
class _HeadOutputs:
    """One head's response-aligned outputs, padded ``[b, response_len]``."""

    log_prob: torch.Tensor
    valid: torch.Tensor
    top1: torch.Tensor
    ce_log_prob: torch.Tensor | None


def _num_heads(model_output) -> int:
    k = 0
    while mtp_output_keys(k + 1)[0] in model_output:
        k += 1
    if k == 0:
        raise RuntimeError(
            "actor_rollout_ref.model.mtp.mtp_loss_type=rl but the model output carries no MTP log-probs: the "
            "actor engine did not score the MTP heads (only the Megatron engine does: set "
            "actor_rollout_ref.actor.strategy=megatron; see docs/mtp_rl.md)"
        )
    return k


def _pad_outputs(model_output, data: TensorDict, num_heads: int, with_ce: bool):
    """Main and per-head outputs as padded responses, cut out together by one gather.

    The columns are stacked along a trailing dimension in a common float dtype (0/1 masks and every
    original dtype round-trip exactly) and split again afterwards.
    """
    keys = ["log_probs"]
    for k in range(1, num_heads + 1):
        keys += [*mtp_output_keys(k), *([mtp_ce_key(k)] if with_ce else [])]
    columns = [model_output[key].values() if model_output[key].is_nested else model_output[key] for key in keys]
    common = torch.float32
    for column in columns:
        if column.is_floating_point():
            common = torch.promote_types(common, column.dtype)
    padded = responses_padded(torch.stack([c.to(common) for c in columns], dim=-1), data).unbind(-1)
    padded = {key: p.to(c.dtype) for key, p, c in zip(keys, padded, columns, strict=True)}
    heads = []
    for k in range(1, num_heads + 1):
        lp_key, valid_key, top1_key = mtp_output_keys(k)
        heads.append(
            _HeadOutputs(
                log_prob=padded[lp_key],
                valid=padded[valid_key].to(bool),
                top1=padded[top1_key].to(torch.float32),
                ce_log_prob=padded[mtp_ce_key(k)] if with_ce else None,
            )
        )
    return padded["log_probs"], heads


class _PolicyLossOnDevice(TorchFunctionMode):
    """While a head's policy loss runs, two host round trips of verl's policy losses stay on the device.

    ``Tensor.item()`` returns the detached 0-d tensor instead of a number: verl's policy losses read each metric
    back that way (three host syncs per call for vanilla / GSPO), and for the heads those values join the
    micro-batch's single read-back. ``torch.tensor(number, device=...)`` (GSPO's zero ``pg_clipfrac_lower``)
    is filled on the device instead of copied there. Any other use of a tensor as a number (``int(t)``,
    ``if t:``) still synchronises, so a loss whose arithmetic needs a host value stays correct.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.item:
            return args[0].detach()
        if func is torch.tensor and isinstance(args[0], (bool, int, float)) and kwargs.get("device") is not None:
            return torch.full((), args[0], **kwargs)
        return func(*args, **kwargs)


def _detached_head_ce(config: ActorConfig, ce_log_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a head's detached-input pass on the sampled tokens, normalised like the main loss."""
    ce_mask = mask & torch.isfinite(ce_log_prob)
    return agg_loss(
        loss_mat=-torch.where(ce_mask, ce_log_prob, torch.zeros_like(ce_log_prob)),
        loss_mask=ce_mask,
        loss_agg_mode=config.loss_agg_mode,
        **config.global_batch_info,
    )


def _read_back(scalars: dict[str, torch.Tensor]) -> dict[str, float]:
    """Every scalar to a Python float through one device->host copy."""
    stacked = torch.stack([v.detach().to(torch.float64) for v in scalars.values()])
    return dict(zip(scalars, stacked.tolist(), strict=True))


def mtp_policy_loss(
    config: ActorConfig,
    mtp_config: MtpRLConfig,
    occ_state: OCCState | None,
    model_output,
    data: TensorDict,
    dp_group=None,
    loss_aggregation: AggregationType = AggregationType.MEAN,
    coefficients: torch.Tensor | None = None,
    only_head: int | None = None,
    diagnosed: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Sum over heads of the coefficient-scaled policy loss on the MTP log-probs, with its metrics.

    ``coefficients`` (``[K]``, the gradient estimator's lambdas) replace OCC's proxy; ``only_head`` keeps just
    that head's policy term at coefficient 1 (no head cross-entropy): the MTP loss the gradient estimator
    differentiates; ``diagnosed`` (an update the gradient estimator also measures) logs the proxy's lambda next
    to it. Expects ``config.global_batch_info`` filled by verl's ``ppo_loss`` for this micro-batch (it is
    called first by :func:`with_mtp_policy_loss`); ``loss_aggregation`` is how verl aggregates its own
    ``pg_loss`` over micro-batches (SUM when the losses are normalised globally).
    """
    num_heads = _num_heads(model_output)
    with_ce = mtp_config.detached_head_ce_coef > 0 and only_head is None
    log_prob, heads = _pad_outputs(model_output, data, num_heads, with_ce)
    fields = ["response_mask", "old_log_probs", "advantages"] + [f for f in ("rollout_is_weights",) if f in data]
    batch = data.select(*fields).to_padded_tensor()
    batch["response_mask"] = batch["response_mask"].to(bool)
    term = partial(_head_term, config, mtp_config, occ_state, num_heads, log_prob, batch, dp_group, diagnosed)

    total = log_prob.new_zeros(())
    scalars, host_metrics, heads_run = {}, {}, []
    for k, head in enumerate(heads, start=1):
        if only_head is not None and k != only_head:
            continue
        given = None if coefficients is None else coefficients[k - 1]
        if only_head is not None:
            given = torch.ones((), dtype=torch.float64, device=log_prob.device)
        terms, head_scalars, head_host_metrics = term(k, head, given)
        for loss_term in terms:
            total = total + loss_term
        scalars.update({HeadMetric.key(k, name): value for name, value in head_scalars.items()})
        host_metrics.update({HeadMetric.key(k, name): value for name, value in head_host_metrics.items()})
        heads_run.append(k)
    scalars["actor/mtp_pg_loss"] = total
    return total, _metrics({**_read_back(scalars), **host_metrics}, heads_run, loss_aggregation)


def _head_term(
    config, mtp_config, occ_state, num_heads, log_prob, batch, dp_group, diagnosed, k: int, head: _HeadOutputs,
    given,
):
    """Head ``k``'s loss terms (summed in this order), its metrics as 0-d device tensors, and the policy loss's
    metrics it returned as numbers."""
    old_log_prob, advantages = batch["old_log_probs"], batch["advantages"]
    scored = batch["response_mask"] & head.valid
    mask = scored & torch.isfinite(head.log_prob)
    # Unscored slots take the old log-prob: ratio 1, finite, and zero gradient into the head there, so a
    # non-finite head output never reaches the optimizer (it is counted in ``nonfinite_tokens``).
    mtp_log_prob = torch.where(mask, head.log_prob, old_log_prob.detach())
    stats = scoped_statistics(mtp_config, occ_statistics(log_prob, mtp_log_prob, old_log_prob, mask), dp_group)
    coef, informative = head_coefficient(mtp_config, occ_state, k, num_heads, stats, given)
    with _PolicyLossOnDevice():
        pg_loss, policy_metrics = get_policy_loss_fn(config.policy_loss.get("loss_mode", "vanilla"))(
            old_log_prob=old_log_prob,
            log_prob=mtp_log_prob,
            advantages=advantages * coef.to(advantages.dtype),
            response_mask=mask,
            loss_agg_mode=config.loss_agg_mode,
            config=config,
            rollout_is_weights=batch.get("rollout_is_weights", None),
        )
    terms = [pg_loss]
    scalars, host_metrics = {}, {}
    for name, value in policy_metrics.items():
        (scalars if isinstance(value, torch.Tensor) else host_metrics)[name.split("/")[-1]] = value
    if head.ce_log_prob is not None:
        head_ce = _detached_head_ce(config, head.ce_log_prob, mask)
        terms.append(mtp_config.detached_head_ce_coef / num_heads * head_ce)
        scalars[HeadMetric.HEAD_CE_LOSS] = head_ce
    if diagnosed:
        occ = mtp_config.occ
        scalars[HeadMetric.PROXY_LAMBDA_ON_DIAGNOSED] = calibrated_lambda(
            stats.numerator, stats.denominator, occ.lambda_plus, occ.eps
        )[0]
    scalars.update({
        HeadMetric.COEF_APPLIED: coef.detach(),
        HeadMetric.INFORMATIVE: informative,
        HeadMetric.CROSS_SUM: stats.numerator,
        HeadMetric.DMTP_SQ_SUM: stats.denominator,
        HeadMetric.DMTP_MEAN: stats.dmtp_sum / stats.count.clamp_min(1),
        HeadMetric.TOP1_AGREEMENT: (head.top1 * mask).sum() / mask.sum().clamp_min(1),
        HeadMetric.NONFINITE_TOKENS: (scored & ~torch.isfinite(head.log_prob)).sum(),
        HeadMetric.PG_LOSS: pg_loss,
    })
    return terms, scalars, host_metrics


_LOSSES = (HeadMetric.PG_LOSS, HeadMetric.HEAD_CE_LOSS)
_PER_MICRO_BATCH = (
    HeadMetric.COEF_APPLIED, HeadMetric.INFORMATIVE, HeadMetric.CROSS_SUM, HeadMetric.DMTP_SQ_SUM,
    HeadMetric.DMTP_MEAN, HeadMetric.TOP1_AGREEMENT, HeadMetric.NONFINITE_TOKENS, HeadMetric.PROXY_LAMBDA_ON_DIAGNOSED,
)


def _metrics(values: dict[str, float], heads: list[int], loss_aggregation: AggregationType) -> dict:
    """The read-back values as verl metrics: losses aggregated like verl's own ``pg_loss``, the policy losses'
    own metrics as means, the rest as floats; ``lambda`` only where dRL carried signal."""
    metrics = {}
    for key, value in values.items():
        name = key.split("/")[-1]
        if key == "actor/mtp_pg_loss" or name in _LOSSES:
            metrics[key] = Metric(value=value, aggregation=loss_aggregation)
        elif name in _PER_MICRO_BATCH:
            metrics[key] = value
        else:
            metrics[key] = Metric(value=value, aggregation=AggregationType.MEAN)
    for k in heads:
        if values[HeadMetric.key(k, HeadMetric.INFORMATIVE)] > 0.5:  # lambda is 0 by construction before an update
            metrics[HeadMetric.key(k, HeadMetric.LAMBDA)] = values[HeadMetric.key(k, HeadMetric.COEF_APPLIED)]
    return metrics


def _loss_with_mtp(
    model_output, data: TensorDict, dp_group=None, *, base_loss_fn, mtp_config, occ_state, coefficients=None,
    diagnosed=False,
):
    loss, metrics = base_loss_fn(model_output=model_output, data=data, dp_group=dp_group)
    pg_metric = metrics.get("actor/pg_loss")
    aggregation = pg_metric.aggregation if isinstance(pg_metric, Metric) else AggregationType.MEAN
    mtp_loss, mtp_metrics = mtp_policy_loss(
        base_loss_fn.keywords["config"], mtp_config, occ_state, model_output, data, dp_group, aggregation,
        coefficients=coefficients, diagnosed=diagnosed,
    )
    metrics.update(mtp_metrics)
    return loss + mtp_loss, metrics


def _head_only_loss(model_output, data: TensorDict, dp_group=None, *, base_loss_fn, mtp_config, head):
    # verl's loss runs first only to fill the actor config's global normalisation for this micro-batch
    base_loss_fn(model_output=model_output, data=data, dp_group=dp_group)
    return mtp_policy_loss(
        base_loss_fn.keywords["config"], mtp_config, None, model_output, data, dp_group, only_head=head
    )


def _check_base_loss(base_loss_fn) -> None:
    if not isinstance(base_loss_fn, partial) or not isinstance(base_loss_fn.keywords.get("config"), ActorConfig):
        raise TypeError(
            "mtp_loss_type=rl needs the actor loss as functools.partial(loss, config=ActorConfig) (what verl's "
            f"ActorRolloutRefWorker installs); got {base_loss_fn!r}"
        )


def mtp_head_only_loss(base_loss_fn, mtp_config: MtpRLConfig, head: int):
    """Head ``head``'s MTP policy loss at coefficient 1 alone (no RL term): what the gradient estimator
    differentiates to get ``g_MTP_k``. Same normalisation as the term it calibrates."""
    _check_base_loss(base_loss_fn)
    return partial(_head_only_loss, base_loss_fn=base_loss_fn, mtp_config=mtp_config, head=head)


def with_mtp_policy_loss(
    base_loss_fn, mtp_config: MtpRLConfig, occ_state: OCCState, coefficients=None, diagnosed: bool = False
):
    """Wrap verl's actor loss (``partial(ppo_loss, config=actor_config)`` or its distillation variant).

    The actor config is read from the partial's ``config`` keyword, the form verl's worker installs.
    ``coefficients`` (``[K]`` device tensor) are the gradient estimator's lambdas, used instead of OCC's proxy;
    ``diagnosed``: the gradient estimator measures this update too (the proxy's lambda is logged beside it).
    """
    _check_base_loss(base_loss_fn)
    check_distillation_settings(mtp_config, base_loss_fn.keywords.get("distillation_config"))
    return partial(
        _loss_with_mtp, base_loss_fn=base_loss_fn, mtp_config=mtp_config, occ_state=occ_state,
        coefficients=coefficients, diagnosed=diagnosed,
    )
