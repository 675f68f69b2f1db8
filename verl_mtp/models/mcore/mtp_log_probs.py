"""Scoring of the sampled tokens by each MTP head: log-probs and top-1 agreement.

:func:`score_mtp_heads` scores every head's targets from what the RL postprocess kept
(:class:`~verl_mtp.models.mcore.mtp_patch.MTPRLOutput`), either through Megatron's output layer or, with
``logprob_chunk_size > 0``, without materialising a head's full-vocabulary logits:

``log p(y | h) = (h . w_y) / T - logsumexp_v((h . w_v) / T)``, computed over chunks of tokens: each chunk's
logits ``[chunk, V/tp]`` live only inside the chunk loop, in the forward and again (recomputed) in the
backward. Autograd keeps only the hidden states, the labels and one log-sum-exp per token, so a head costs
``O(chunk * V/tp)`` transient memory instead of keeping ``T * V/tp`` logits until the backward pass.

Tensor parallelism follows Megatron's vocab-parallel output layer: each rank holds a vocabulary shard, the
max / sum-exp / target logit are all-reduced over the TP group, and the input gradient is all-reduced by
``copy_to_tensor_model_parallel_region`` (sequence parallel: gathered / reduce-scattered like the output
layer does it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from megatron.core import parallel_state as mpu
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from verl.utils.megatron.tensor_parallel import vocab_parallel_log_probs_from_logits
from verl_mtp.models.mcore.mtp_alignment import mtp_ce_key, mtp_output_keys

if TYPE_CHECKING:
    from verl_mtp.models.mcore.mtp_patch import MTPRLOutput

__all__ = ["chunked_token_log_probs", "mtp_token_log_probs", "score_mtp_heads"]


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(t, op=op, group=group)
    return t


class _ChunkedTokenLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, inv_temperature, chunk, group, vocab_start):
        n = hidden.shape[0]
        v_local = weight.shape[0]
        log_probs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        top1 = torch.empty(n, dtype=torch.long, device=hidden.device)
        local_labels = labels - vocab_start
        in_shard = (local_labels >= 0) & (local_labels < v_local)
        safe_labels = torch.where(in_shard, local_labels, torch.zeros_like(local_labels))
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            logits = (hidden[s:e] @ weight.t()).float() * inv_temperature[s:e, None]
            local_max, local_arg = logits.max(dim=-1)
            global_max = _all_reduce(local_max.clone(), torch.distributed.ReduceOp.MAX, group)
            sum_exp = _all_reduce(
                torch.exp(logits - global_max[:, None]).sum(-1), torch.distributed.ReduceOp.SUM, group
            )
            lse[s:e] = global_max + torch.log(sum_exp)
            target = logits.gather(1, safe_labels[s:e, None]).squeeze(1) * in_shard[s:e]
            target = _all_reduce(target, torch.distributed.ReduceOp.SUM, group)
            log_probs[s:e] = target - lse[s:e]
            # global argmax: the lowest vocabulary id among ranks holding the global maximum
            candidate = torch.where(
                local_max == global_max, local_arg + vocab_start, torch.full_like(local_arg, torch.iinfo(torch.long).max)
            )
            top1[s:e] = _all_reduce(candidate, torch.distributed.ReduceOp.MIN, group)
        ctx.save_for_backward(hidden, weight, safe_labels, in_shard, inv_temperature, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(top1)
        return log_probs, top1

    @staticmethod
    def backward(ctx, grad_log_probs, _grad_top1):
        hidden, weight, safe_labels, in_shard, inv_temperature, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_h else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            e = min(s + ctx.chunk, hidden.shape[0])
            g = grad_log_probs[s:e].float()
            logits = (hidden[s:e] @ weight.t()).float() * inv_temperature[s:e, None]
            # d log p_y / d logits = onehot(y) - softmax; the softmax comes from the saved global lse
            grad_logits = torch.exp(logits - lse[s:e, None]).mul_(-g[:, None])
            grad_logits.scatter_add_(1, safe_labels[s:e, None], (g * in_shard[s:e])[:, None])
            grad_logits.mul_(inv_temperature[s:e, None])
            if need_h:
                grad_hidden[s:e] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_weight.add_(grad_logits.t() @ hidden[s:e].float())
        if need_w:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def chunked_token_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    chunk_size: int,
    sequence_parallel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(labels)`` and the top-1 token id of ``softmax(hidden @ weight.T / temperature)``.

    hidden: ``[s, b, h]`` (``[s/tp, b, h]`` under sequence parallel), weight: this rank's vocabulary shard
    ``[V/tp, h]``, labels / temperature: ``[s, b]``. Returns fp32 log-probs and long top-1 ids, ``[s, b]``.
    """
    tp = mpu.get_tensor_model_parallel_world_size()
    group = mpu.get_tensor_model_parallel_group() if tp > 1 else None
    # Each rank's input gradient is only its vocabulary shard's part: the ranks' parts must be summed exactly
    # once, as Megatron's ColumnParallelLinear does: reduce-scatter (sequence parallel: the backward of the
    # all-gather) or all-reduce. Both would sum twice, a gradient tp times too large.
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    elif tp > 1:
        hidden = copy_to_tensor_model_parallel_region(hidden)
    vocab_start = mpu.get_tensor_model_parallel_rank() * weight.shape[0]
    s, b, h = hidden.shape
    log_probs, top1 = _ChunkedTokenLogProb.apply(
        hidden.reshape(s * b, h),
        weight,
        labels.reshape(-1),
        temperature.reshape(-1).float().reciprocal(),
        chunk_size,
        group,
        vocab_start,
    )
    return log_probs.view(s, b), top1.view(s, b)


def mtp_token_log_probs(
    mtp_output: MTPRLOutput,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    trainable_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A head's log-probability of ``labels`` and whether its top-1 token equals them, both ``[b, s]``.

    ``hidden`` is the head's ``[s, b, h]`` output; ``labels`` and ``temperature`` are ``[b, s]`` in the same
    packed order as the main head's. Vocab-parallel (correct for TP > 1). Works in Megatron's ``[s, b]`` order
    so the full-vocabulary logits are never transposed into a contiguous copy; with ``logprob_chunk_size``
    they are not even kept for the backward pass.
    """
    labels_sb = labels.t().contiguous()
    weight = mtp_output.head_weight(trainable_weight)
    if mtp_output.logprob_chunk_size > 0:
        log_probs, top1 = chunked_token_log_probs(
            hidden,
            weight,
            labels_sb,
            temperature.t(),
            mtp_output.logprob_chunk_size,
            sequence_parallel=mtp_output.output_layer.sequence_parallel,
        )
        return log_probs.t(), (top1 == labels_sb).t()
    logits = mtp_output.head_logits(hidden, trainable_weight)
    logits = logits / temperature.t().unsqueeze(-1).to(logits.dtype)
    with torch.no_grad():  # before the cross-entropy, which rewrites its logits in place
        top1 = _vocab_parallel_argmax(logits)
    log_probs = vocab_parallel_log_probs_from_logits(logits, labels_sb)
    return log_probs.t(), (top1 == labels_sb).t()


def score_mtp_heads(
    mtp_output: MTPRLOutput, head_labels: list[torch.Tensor], temperature: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Every head's log-prob of its own targets, and top-1 agreement, in the model's packed order.

    ``head_labels[k-1]`` holds head ``k``'s targets (``x[i+k+1]`` at slot ``i``, see
    :func:`verl_mtp.models.mcore.mtp_head_labels.pack_head_labels`); ``temperature`` is the main head's
    ``[b, s]``.
    """
    scored = {}
    for k in range(1, mtp_output.num_heads + 1):
        labels = head_labels[k - 1]
        log_probs, top1 = mtp_token_log_probs(
            mtp_output, mtp_output.hidden_states[k - 1], labels, temperature, mtp_output.train_lm_head
        )
        lp_key, _, top1_key = mtp_output_keys(k)
        scored[lp_key] = log_probs
        scored[top1_key] = top1.to(log_probs.dtype)
        if mtp_output.detached_hidden_states is not None:  # plain next-token CE, as Megatron's (T = 1)
            ce_log_probs, _ = mtp_token_log_probs(
                mtp_output, mtp_output.detached_hidden_states[k - 1], labels, torch.ones_like(temperature), False
            )
            scored[mtp_ce_key(k)] = ce_log_probs
    return scored


def _vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Global argmax over a vocabulary split across tensor-parallel ranks."""
    tp = mpu.get_tensor_model_parallel_world_size()
    local_max, local_idx = logits.max(dim=-1)
    if tp == 1:
        return local_idx
    group = mpu.get_tensor_model_parallel_group()
    rank = mpu.get_tensor_model_parallel_rank()
    global_idx = local_idx + rank * logits.shape[-1]
    maxes = [torch.empty_like(local_max) for _ in range(tp)]
    idxs = [torch.empty_like(global_idx) for _ in range(tp)]
    torch.distributed.all_gather(maxes, local_max.contiguous(), group=group)
    torch.distributed.all_gather(idxs, global_idx.contiguous(), group=group)
    best = torch.stack(maxes).argmax(dim=0, keepdim=True)
    return torch.stack(idxs).gather(0, best).squeeze(0)
