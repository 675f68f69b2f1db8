"""The MTP policy term added to verl's actor loss (``verl.workers.utils.losses.ppo_loss``).

For each MTP head ``k`` the actor's registered policy loss (vanilla/DAPO clip-higher with dual clip, GSPO's
sequence ratio, any other in verl's ``POLICY_LOSS_REGISTRY``) is applied to the head's aligned log-probs of
the sampled tokens against the same ``old_log_probs``, with advantages multiplied by the head's coefficient:
the OCC lambda when ``occ.enable``, else the fixed ``mtp_loss_scaling_factor / K`` (split over heads like
Megatron's MTP cross-entropy). The term uses the same ``loss_agg_mode`` and global normalisation
(``global_batch_info``: dp size, global token count, global batch size) as the main policy loss, and is added
after verl's entropy and KL terms, so neither drops it. With ``detached_head_ce_coef > 0`` each head also gets
a cross-entropy term on its detached-input pass (it trains the heads only, never the trunk).
"""

from __future__ import annotations

from functools import partial

import torch
from tensordict import TensorDict

from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn
from verl.utils.metric import AggregationType, Metric
from verl.workers.config import ActorConfig
from verl.workers.utils.padding import no_padding_2_padding
from verl_mtp.models.mcore.mtp_alignment import mtp_ce_key, mtp_output_keys
from verl_mtp.trainer.ppo.mtp_occ import OCCState, occ_statistics
from verl_mtp.workers.config.mtp import MtpRLConfig, check_distillation_settings

__all__ = ["mtp_policy_loss", "with_mtp_policy_loss"]


def _num_heads(model_output) -> int:
    k = 0
    while mtp_output_keys(k + 1)[0] in model_output:
        k += 1
    return k


def mtp_policy_loss(
    config: ActorConfig,
    mtp_config: MtpRLConfig,
    occ_state: OCCState,
    model_output,
    data: TensorDict,
    dp_group=None,
    loss_aggregation: AggregationType = AggregationType.MEAN,
) -> tuple[torch.Tensor, dict]:
    """Sum over heads of the coefficient-scaled policy loss on the MTP log-probs, with its metrics.

    Expects ``config.global_batch_info`` filled by verl's ``ppo_loss`` for this micro-batch (it is called
    first by :func:`with_mtp_policy_loss`); ``loss_aggregation`` is how verl aggregates its own ``pg_loss``
    over micro-batches (SUM when the losses are normalised globally).
    """
    num_heads = _num_heads(model_output)
    if num_heads == 0:
        raise RuntimeError(
            "mtp_loss_type=rl but the model output carries no MTP log-probs: the actor engine is not "
            "verl_mtp's (is the verl_mtp plugin loaded? see docs/mtp_rl.md)"
        )
    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    fields = ["response_mask", "old_log_probs", "advantages"] + [
        f for f in ("rollout_is_weights",) if f in data
    ]
    padded = data.select(*fields).to_padded_tensor()
    response_mask = padded["response_mask"].to(bool)
    old_log_prob = padded["old_log_probs"]
    advantages = padded["advantages"]
    rollout_is_weights = padded.get("rollout_is_weights", None)

    policy_loss_fn = get_policy_loss_fn(config.policy_loss.get("loss_mode", "vanilla"))
    occ = mtp_config.occ
    total = log_prob.new_zeros(())
    metrics = {}
    for k in range(1, num_heads + 1):
        lp_key, valid_key, top1_key = mtp_output_keys(k)
        mtp_log_prob = no_padding_2_padding(model_output[lp_key], data)
        valid = no_padding_2_padding(model_output[valid_key], data).to(bool)
        finite = torch.isfinite(mtp_log_prob)
        mask = response_mask & valid & finite
        # Unscored slots take the old log-prob: ratio 1, finite, and zero gradient into the head there, so a
        # non-finite head output never reaches the optimizer (it is counted in ``nonfinite_tokens``).
        mtp_log_prob = torch.where(mask, mtp_log_prob, old_log_prob.detach())

        stats = occ_statistics(log_prob, mtp_log_prob, old_log_prob, mask)
        if occ.enable and occ.scope == "data_parallel" and dp_group is not None:
            stats = stats.all_reduce(dp_group)
        if occ.enable:
            coef, informative = occ_state.resolve(k, stats)
        else:
            coef, informative = log_prob.new_tensor(mtp_config.mtp_loss_scaling_factor / num_heads), True
        coef = coef.to(advantages.dtype)

        head_loss, head_metrics = policy_loss_fn(
            old_log_prob=old_log_prob,
            log_prob=mtp_log_prob,
            advantages=advantages * coef,
            response_mask=mask,
            loss_agg_mode=config.loss_agg_mode,
            config=config,
            rollout_is_weights=rollout_is_weights,
        )
        total = total + head_loss
        if mtp_config.detached_head_ce_coef > 0:
            ce_log_prob = no_padding_2_padding(model_output[mtp_ce_key(k)], data)
            ce_mask = mask & torch.isfinite(ce_log_prob)
            head_ce = agg_loss(
                loss_mat=-torch.where(ce_mask, ce_log_prob, torch.zeros_like(ce_log_prob)),
                loss_mask=ce_mask,
                loss_agg_mode=config.loss_agg_mode,
                **config.global_batch_info,
            )
            total = total + mtp_config.detached_head_ce_coef / num_heads * head_ce
            metrics[f"actor/mtp_{k}/head_ce_loss"] = Metric(value=head_ce.detach(), aggregation=loss_aggregation)
        top1 = no_padding_2_padding(model_output[top1_key], data).to(torch.float32)
        count = mask.sum().clamp_min(1)
        scalars = {  # one device->host copy for all of them, below
            "lambda": coef.detach().float(),
            "lambda_informative": torch.tensor(float(informative)),
            # names must not contain "min"/"max": verl reduces such metrics with min/max across mini-batches
            "occ_cross_sum": stats.numerator,
            "occ_dmtp_sq_sum": stats.denominator,
            "dmtp_mean": stats.dmtp_sum / stats.count.clamp_min(1),
            "top1_agreement": (top1 * mask).sum() / count,
            "nonfinite_tokens": (response_mask & valid & ~finite).sum(),
        }
        values = torch.stack([v.detach().to(torch.float64).cpu() for v in scalars.values()]).tolist()
        prefix = f"actor/mtp_{k}"
        metrics.update({f"{prefix}/{name}": value for name, value in zip(scalars, values, strict=True)})
        metrics[f"{prefix}/pg_loss"] = Metric(value=head_loss.detach(), aggregation=loss_aggregation)
        for name, value in head_metrics.items():
            metrics[f"{prefix}/{name.split('/')[-1]}"] = Metric(value=value, aggregation=AggregationType.MEAN)
    metrics["actor/mtp_pg_loss"] = Metric(value=total.detach(), aggregation=loss_aggregation)
    return total, metrics


def _loss_with_mtp(model_output, data: TensorDict, dp_group=None, *, base_loss_fn, mtp_config, occ_state):
    loss, metrics = base_loss_fn(model_output=model_output, data=data, dp_group=dp_group)
    pg_metric = metrics.get("actor/pg_loss")
    aggregation = pg_metric.aggregation if isinstance(pg_metric, Metric) else AggregationType.MEAN
    mtp_loss, mtp_metrics = mtp_policy_loss(
        base_loss_fn.keywords["config"], mtp_config, occ_state, model_output, data, dp_group, aggregation
    )
    metrics.update(mtp_metrics)
    return loss + mtp_loss, metrics


def with_mtp_policy_loss(base_loss_fn, mtp_config: MtpRLConfig, occ_state: OCCState):
    """Wrap verl's actor loss (``partial(ppo_loss, config=actor_config)`` or its distillation variant).

    The actor config is read from the partial's ``config`` keyword, the form verl's worker installs.
    """
    if not isinstance(base_loss_fn, partial) or not isinstance(base_loss_fn.keywords.get("config"), ActorConfig):
        raise TypeError(
            "mtp_loss_type=rl needs the actor loss as functools.partial(loss, config=ActorConfig) (what verl's "
            f"ActorRolloutRefWorker installs); got {base_loss_fn!r}"
        )
    check_distillation_settings(mtp_config, base_loss_fn.keywords.get("distillation_config"))
    return partial(_loss_with_mtp, base_loss_fn=base_loss_fn, mtp_config=mtp_config, occ_state=occ_state)
