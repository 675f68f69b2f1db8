"""The MTP policy term added to verl's actor loss (``verl.workers.utils.losses.ppo_loss``).

For each MTP head ``k`` the actor's registered policy loss (vanilla/DAPO clip-higher with dual clip, GSPO's
sequence ratio, any other in verl's ``POLICY_LOSS_REGISTRY``) is applied to the head's aligned log-probs of
the sampled tokens against the same ``old_log_probs``, with advantages multiplied by the head's coefficient:
the OCC lambda when ``occ.enable``, else the fixed ``mtp_loss_scaling_factor / K`` (split over heads like
Megatron's MTP cross-entropy). The term uses the same ``loss_agg_mode`` and global normalisation
(``global_batch_info``: dp size, global token count, global batch size) as the main policy loss, and is added
after verl's entropy and KL terms, so neither drops it. With ``detached_head_ce_coef > 0`` each head also gets
a cross-entropy term on its detached-input pass (it trains the heads only, never the trunk).

No added host synchronisation: all heads' outputs are unpadded by one call of verl's ``no_padding_2_padding``,
and every scalar metric of every head is read back in one device->host copy at the end of the micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from tensordict import TensorDict

from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn
from verl.utils.metric import AggregationType, Metric
from verl.workers.config import ActorConfig
from verl.workers.utils.padding import no_padding_2_padding
from verl_mtp.models.mcore.mtp_alignment import mtp_ce_key, mtp_output_keys
from verl_mtp.trainer.ppo.mtp_occ import OCCState, OCCStatistics, occ_lambda, occ_statistics
from verl_mtp.workers.config import MtpRLConfig
from verl_mtp.workers.config.mtp import check_distillation_settings

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
    """Main and per-head outputs as padded responses, through ONE call of verl's unpad helper.

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
    padded = no_padding_2_padding(torch.stack([c.to(common) for c in columns], dim=-1), data).unbind(-1)
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


def _head_coefficient(
    mtp_config: MtpRLConfig,
    occ_state: OCCState,
    k: int,
    num_heads: int,
    stats: OCCStatistics,
    dp_group,
    dtype: torch.dtype,
    given: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head ``k``'s coefficient (0-d tensor) and whether it came from this micro-batch's own signal.

    ``given`` (the gradient estimator's lambda, or 1 for its unit-coefficient pass) wins over OCC's proxy.
    """
    occ = mtp_config.occ
    device = stats.numerator.device
    if given is not None:
        return given.to(device), torch.ones((), dtype=torch.bool, device=device)
    if occ.enable:
        if occ.scope == "data_parallel" and dp_group is not None:
            stats = stats.all_reduce(dp_group)
        return occ_state.resolve(k, stats)
    coef = torch.full((), mtp_config.mtp_loss_scaling_factor / num_heads, dtype=dtype, device=device)
    return coef, torch.ones((), dtype=torch.bool, device=device)


def _detached_head_ce(config: ActorConfig, ce_log_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a head's detached-input pass on the sampled tokens, normalised like the main loss."""
    ce_mask = mask & torch.isfinite(ce_log_prob)
    return agg_loss(
        loss_mat=-torch.where(ce_mask, ce_log_prob, torch.zeros_like(ce_log_prob)),
        loss_mask=ce_mask,
        loss_agg_mode=config.loss_agg_mode,
        **config.global_batch_info,
    )


def _head_scalars(coef, informative, stats: OCCStatistics, head: _HeadOutputs, mask, scored) -> dict:
    """Head metrics as 0-d device tensors (read back later, all at once)."""
    # names must not contain "min"/"max": verl reduces such metrics with min/max across mini-batches
    return {
        "lambda": coef.detach().float(),
        "lambda_informative": informative,
        "occ_cross_sum": stats.numerator,
        "occ_dmtp_sq_sum": stats.denominator,
        "dmtp_mean": stats.dmtp_sum / stats.count.clamp_min(1),
        "top1_agreement": (head.top1 * mask).sum() / mask.sum().clamp_min(1),
        "nonfinite_tokens": (scored & ~torch.isfinite(head.log_prob)).sum(),
    }


def _read_back(scalars: dict[str, torch.Tensor]) -> dict[str, float]:
    """Every scalar to a Python float through one device->host copy."""
    stacked = torch.stack([v.detach().to(torch.float64) for v in scalars.values()])
    return dict(zip(scalars, stacked.tolist(), strict=True))


def mtp_policy_loss(
    config: ActorConfig,
    mtp_config: MtpRLConfig,
    occ_state: OCCState,
    model_output,
    data: TensorDict,
    dp_group=None,
    loss_aggregation: AggregationType = AggregationType.MEAN,
    coefficients: torch.Tensor | None = None,
    only_head: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """Sum over heads of the coefficient-scaled policy loss on the MTP log-probs, with its metrics.

    ``coefficients`` (``[K]``, the gradient estimator's lambdas) replace OCC's proxy; ``only_head`` keeps just
    that head's policy term at coefficient 1 (no head cross-entropy): the MTP loss the gradient estimator
    differentiates. Expects ``config.global_batch_info`` filled by verl's ``ppo_loss`` for this micro-batch (it
    is called first by :func:`with_mtp_policy_loss`); ``loss_aggregation`` is how verl aggregates its own
    ``pg_loss`` over micro-batches (SUM when the losses are normalised globally).
    """
    num_heads = _num_heads(model_output)
    with_ce = mtp_config.detached_head_ce_coef > 0 and only_head is None
    log_prob, heads = _pad_outputs(model_output, data, num_heads, with_ce)
    fields = ["response_mask", "old_log_probs", "advantages"] + [f for f in ("rollout_is_weights",) if f in data]
    batch = data.select(*fields).to_padded_tensor()
    batch["response_mask"] = batch["response_mask"].to(bool)
    term = partial(_head_term, config, mtp_config, occ_state, num_heads, log_prob, batch, dp_group)

    total = log_prob.new_zeros(())
    scalars, other_metrics = {}, {}
    for k, head in enumerate(heads, start=1):
        if only_head is not None and k != only_head:
            continue
        given = None if coefficients is None else coefficients[k - 1]
        if only_head is not None:
            given = torch.ones((), dtype=torch.float64)
        terms, head_scalars, head_metrics = term(k, head, given)
        for loss_term in terms:
            total = total + loss_term
        scalars.update({f"actor/mtp_{k}/{name}": value for name, value in head_scalars.items()})
        other_metrics.update({f"actor/mtp_{k}/{name}": value for name, value in head_metrics.items()})
    scalars["actor/mtp_pg_loss"] = total
    return total, _metrics(_read_back(scalars), other_metrics, loss_aggregation)


def _head_term(config, mtp_config, occ_state, num_heads, log_prob, batch, dp_group, k: int, head: _HeadOutputs, given):
    """Head ``k``'s loss terms (summed in this order), its scalar metrics (device tensors) and the policy
    loss's own metrics."""
    old_log_prob, advantages = batch["old_log_probs"], batch["advantages"]
    scored = batch["response_mask"] & head.valid
    mask = scored & torch.isfinite(head.log_prob)
    # Unscored slots take the old log-prob: ratio 1, finite, and zero gradient into the head there, so a
    # non-finite head output never reaches the optimizer (it is counted in ``nonfinite_tokens``).
    mtp_log_prob = torch.where(mask, head.log_prob, old_log_prob.detach())
    stats = occ_statistics(log_prob, mtp_log_prob, old_log_prob, mask)
    coef, informative = _head_coefficient(mtp_config, occ_state, k, num_heads, stats, dp_group, log_prob.dtype, given)
    coef = coef.to(advantages.dtype)
    policy_loss_fn = get_policy_loss_fn(config.policy_loss.get("loss_mode", "vanilla"))
    pg_loss, policy_metrics = policy_loss_fn(
        old_log_prob=old_log_prob,
        log_prob=mtp_log_prob,
        advantages=advantages * coef,
        response_mask=mask,
        loss_agg_mode=config.loss_agg_mode,
        config=config,
        rollout_is_weights=batch.get("rollout_is_weights", None),
    )
    terms, scalars = [pg_loss], {}
    if head.ce_log_prob is not None:
        head_ce = _detached_head_ce(config, head.ce_log_prob, mask)
        terms.append(mtp_config.detached_head_ce_coef / num_heads * head_ce)
        scalars["head_ce_loss"] = head_ce
    scalars.update(_head_scalars(coef, informative, stats, head, mask, scored))
    if given is not None and mtp_config.occ.enable:  # the proxy's lambda, next to the one used
        scalars["occ_proxy_lambda"] = occ_lambda(stats, mtp_config.occ.lambda_plus, mtp_config.occ.eps)
    scalars["pg_loss"] = pg_loss
    metrics = {
        name.split("/")[-1]: Metric(value=value, aggregation=AggregationType.MEAN)
        for name, value in policy_metrics.items()
    }
    return terms, scalars, metrics


def _metrics(values: dict[str, float], other_metrics: dict, loss_aggregation: AggregationType) -> dict:
    """Losses as verl ``Metric``s aggregated like verl's own ``pg_loss``; the per-head scalars as floats."""
    metrics = {}
    for key, value in values.items():
        is_loss = key.endswith(("/pg_loss", "/head_ce_loss")) or key == "actor/mtp_pg_loss"
        metrics[key] = Metric(value=value, aggregation=loss_aggregation) if is_loss else value
    metrics.update(other_metrics)
    return metrics


def _loss_with_mtp(
    model_output, data: TensorDict, dp_group=None, *, base_loss_fn, mtp_config, occ_state, coefficients=None
):
    loss, metrics = base_loss_fn(model_output=model_output, data=data, dp_group=dp_group)
    pg_metric = metrics.get("actor/pg_loss")
    aggregation = pg_metric.aggregation if isinstance(pg_metric, Metric) else AggregationType.MEAN
    mtp_loss, mtp_metrics = mtp_policy_loss(
        base_loss_fn.keywords["config"], mtp_config, occ_state, model_output, data, dp_group, aggregation,
        coefficients=coefficients,
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


def with_mtp_policy_loss(base_loss_fn, mtp_config: MtpRLConfig, occ_state: OCCState, coefficients=None):
    """Wrap verl's actor loss (``partial(ppo_loss, config=actor_config)`` or its distillation variant).

    The actor config is read from the partial's ``config`` keyword, the form verl's worker installs.
    ``coefficients`` (``[K]`` device tensor) are the gradient estimator's lambdas, used instead of OCC's proxy.
    """
    _check_base_loss(base_loss_fn)
    check_distillation_settings(mtp_config, base_loss_fn.keywords.get("distillation_config"))
    return partial(
        _loss_with_mtp, base_loss_fn=base_loss_fn, mtp_config=mtp_config, occ_state=occ_state,
        coefficients=coefficients,
    )
