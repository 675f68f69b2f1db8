"""Scoring given tokens against a vocab-parallel output layer without materialising fp32 logits.

Used for the MTP heads' targets (:mod:`verl_mtp.models.mcore.mtp_log_probs`) and for the main head under verl's
``use_fused_kernels`` with MTP on (:mod:`verl_mtp.models.mcore.main_head_scoring`).

``log p(y | h) = (h . w_y) / T - logsumexp_v((h . w_v) / T)``, computed over chunks of tokens: each chunk's
fp32 logits ``[chunk, V/tp]`` live only inside the forward's chunk loop. What the backward needs of them,
``exp(logits - max)``, is kept in the hidden states' dtype (``T * V/tp`` values, half the bytes of the fp32
softmax Megatron's cross-entropy keeps under bf16), so the backward never recomputes the head's matrix product:
it turns the kept exponentials into the logits' gradient in place, ``d log p_y / d logits = onehot(y) - softmax``
(and ``-p (log p + H)`` for the entropy ``H``), chunk by chunk with the input gradient's product, then makes the
weight gradient with one product over all tokens, in the weight's dtype, as the output layer's backward does.
Without a gradient to compute only one chunk's exponentials are held.

On logits an output layer already made (an MTP head with ``logprob_chunk_size = 0``) the same scoring runs once
on the fp32 logits, in place: the maximum and top-1 id in one pass, the shift, the exponential and the sum, the
buffer kept as the backward's ``exp(logits - max)`` and turned into the gradient in place (one pass).

Tensor parallelism follows Megatron's vocab-parallel output layer: each rank holds a vocabulary shard; per chunk
one all-gather brings every rank's maximum and arg-maximum, one all-reduce sums the sum-exp, the target logit and
any statistic. The input gradient is all-reduced by ``copy_to_tensor_model_parallel_region`` (sequence parallel:
gathered / reduce-scattered like the output layer does it).

The output-layer weight gradient follows Megatron's gradient-accumulation-fusion protocol when the layer uses
it (:func:`verl_mtp.models.mcore.mtp_grad_fusion.hand_over_weight_grad`), so Megatron's DDP keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from megatron.core import parallel_state as mpu
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from verl_mtp.models.mcore.mtp_grad_fusion import hand_over_weight_grad

__all__ = ["TokenScores", "chunked_token_log_probs", "chunked_token_scores", "scores_from_logits"]


def _global_max_and_argmax(local_max, local_arg, vocab_start, group):
    """Maximum over the whole vocabulary and its lowest vocabulary id, from every rank's shard (one collective)."""
    if group is None or torch.distributed.get_world_size(group) == 1:
        return local_max, local_arg + vocab_start
    pair = torch.stack([local_max.double(), (local_arg + vocab_start).double()])  # ids < 2**53: exact in fp64
    gathered = [torch.empty_like(pair) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(gathered, pair, group=group)
    maxes, ids = torch.stack(gathered).unbind(1)  # [tp, rows] each
    global_max = maxes.max(dim=0).values
    top1 = torch.where(maxes == global_max, ids, torch.full_like(ids, float("inf"))).min(dim=0).values
    return global_max.to(local_max.dtype), top1.long()


def _sum_over_shards(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=group)
    return t


@dataclass(frozen=True)
class _Statistics:
    """What a scoring call computes beyond the label's log-prob and the top-1 id (per row of tempered logits)."""

    entropy: bool = False  # -sum p log p, differentiable
    sum_pi_squared: bool = False  # sum p^2 (verl's optimal-token baseline), forward only


_LOG_PROBS_ONLY = _Statistics()


class _BlockScores(NamedTuple):
    log_probs: torch.Tensor
    top1: torch.Tensor
    inv_sum_exp: torch.Tensor
    entropy: torch.Tensor | None
    sum_pi_squared: torch.Tensor | None


def _score_block(logits, safe_labels, in_shard, exp_out, group, vocab_start, stats=_LOG_PROBS_ONLY, scratch=None):
    """Log-prob of the label, top-1 id, ``1 / sum exp`` (and ``stats``) of a block of tempered logits ``[rows, V/tp]``.

    Rewrites ``logits`` in place and leaves ``exp(logits - max)`` in ``exp_out`` (which may be ``logits``):
    one pass for the maximum and its id, one for the shift, one for the exponential, one for the sum; a
    statistic adds one pass into ``scratch`` (``[rows, V/tp]``, the exponentials' fp32 dtype) and one sum.
    All shards' sums travel in one all-reduce. With ``e = exp(z - max)`` and ``S = sum e``:
    ``H = log S - sum(e log e) / S`` and ``sum p^2 = sum(e^2) / S^2``.
    """
    local_max, local_arg = logits.max(dim=-1)
    global_max, top1 = _global_max_and_argmax(local_max, local_arg, vocab_start, group)
    target = logits.gather(1, safe_labels[:, None]).squeeze(1) * in_shard
    exp_block = exp_out if exp_out.dtype == logits.dtype else logits
    torch.exp(logits.sub_(global_max[:, None]), out=exp_block)
    sums = [exp_block.sum(-1, dtype=torch.float32), target]
    if stats.entropy:
        sums.append(torch.special.xlogy(exp_block, exp_block, out=scratch).sum(-1, dtype=torch.float32))
    if stats.sum_pi_squared:
        sums.append(torch.mul(exp_block, exp_block, out=scratch).sum(-1, dtype=torch.float32))
    sum_exp, target, *extra = _sum_over_shards(torch.stack(sums), group)
    if exp_block is not exp_out:
        exp_out.copy_(exp_block)
    inv_sum_exp = sum_exp.reciprocal()
    log_sum_exp = torch.log(sum_exp)
    entropy = log_sum_exp - extra.pop(0) * inv_sum_exp if stats.entropy else None
    sum_pi_squared = extra.pop(0) * inv_sum_exp.square() if stats.sum_pi_squared else None
    return _BlockScores(target - global_max - log_sum_exp, top1, inv_sum_exp, entropy, sum_pi_squared)


def _logits_grad_in_place(
    exp_shifted, safe_labels, in_shard, inv_temperature, inv_sum_exp, grad_log_probs,
    entropy=None, grad_entropy=None, scratch=None,
):
    """Turn the kept ``exp(logits - max)`` of some rows into the logits' gradient, in place (one pass; two and
    ``scratch``, rows x V/tp, when the entropy has a gradient). With ``z = logits / T`` and ``p = e / S``:
    ``d log p_y / dz = onehot(y) - p`` and ``dH / dz = -p (log p + H)``, each times its upstream gradient
    (``None``: none reaches it), the sum divided by ``T``."""
    g_lp = torch.zeros_like(inv_sum_exp) if grad_log_probs is None else grad_log_probs.float()
    onehot_coef = g_lp * inv_temperature
    coef = g_lp
    if grad_entropy is not None:  # p (log p + H) = e/S (log e + log(1/S) + H): the e log e part goes by scratch
        coef = coef + grad_entropy.float() * (entropy + torch.log(inv_sum_exp))
        e_log_e = torch.special.xlogy(exp_shifted, exp_shifted, out=scratch)
        e_log_e.mul_((-grad_entropy.float() * inv_sum_exp * inv_temperature).to(exp_shifted.dtype)[:, None])
    exp_shifted.mul_((-(coef * inv_temperature) * inv_sum_exp).to(exp_shifted.dtype)[:, None])
    if grad_entropy is not None:
        exp_shifted.add_(e_log_e)
    return exp_shifted.scatter_add_(1, safe_labels[:, None], (onehot_coef * in_shard).to(exp_shifted.dtype)[:, None])


def _shard_labels(labels, vocab_start, v_local):
    """This rank's label ids (0 where the label lives on another vocabulary shard) and which rows it holds."""
    local_labels = labels - vocab_start
    in_shard = (local_labels >= 0) & (local_labels < v_local)
    return torch.where(in_shard, local_labels, torch.zeros_like(local_labels)), in_shard


def _keep_for_backward(ctx, non_differentiable, *tensors) -> None:
    """Save what the backward needs, once: the scoring functions overwrite it with the gradient."""
    ctx.save_for_backward(*tensors)
    ctx.consumed = False
    ctx.mark_non_differentiable(*(t for t in non_differentiable if t is not None))


def _refuse_second_backward(ctx) -> None:
    """Both scoring functions turn their saved exponentials into the logits' gradient in place."""
    if ctx.consumed:
        raise RuntimeError(
            "MTP head log-probs back-propagate once per forward (their saved exponentials become the gradient "
            "in place): run the forward again instead of backward(retain_graph=True) twice."
        )
    ctx.consumed = True


@dataclass(frozen=True)
class _ChunkPlan:
    """The non-tensor arguments of one chunked scoring call."""

    chunk: int
    group: object  # the tensor-parallel group, None at TP = 1
    vocab_start: int
    fuse_wgrad: bool  # the output layer's gradient_accumulation_fusion
    stats: _Statistics
    keep: bool  # a backward will follow: keep every row's exponentials (else one chunk's, reused)


class _ChunkBuffers(NamedTuple):
    exp_shifted: torch.Tensor  # [n or chunk, V/tp], the hidden states' dtype
    logits: torch.Tensor | None  # the fp32 chunk buffer of a bf16 model (None: score where the exps are kept)
    scratch: torch.Tensor | None  # a statistic's pass, [chunk, V/tp] in the logits' dtype


def _chunk_buffers(hidden, v_local, plan: _ChunkPlan) -> _ChunkBuffers:
    """The matrix product lands where the chunk's exponentials will be kept, in the weights' dtype, and goes to fp32
    (at least) in the same pass as the temperature: an fp32 model scores each chunk there, a bf16 one reuses
    one fp32 chunk buffer (a fresh buffer per chunk would cost its page faults on CPU)."""
    n = hidden.shape[0]
    rows = min(plan.chunk, n)
    exp_shifted = hidden.new_empty(n if plan.keep else rows, v_local)
    logits_dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = scratch = None
    if logits_dtype != hidden.dtype:
        logits = hidden.new_empty(rows, v_local, dtype=logits_dtype)
    if plan.stats.entropy or plan.stats.sum_pi_squared:
        scratch = hidden.new_empty(rows, v_local, dtype=logits_dtype)
    return _ChunkBuffers(exp_shifted, logits, scratch)


def _per_row(hidden, n: int, wanted: bool = True) -> torch.Tensor | None:
    return torch.empty(n, dtype=torch.float32, device=hidden.device) if wanted else None


class _ChunkedTokenLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, inv_temperature, plan: _ChunkPlan):
        ctx.set_materialize_grads(False)
        n, v_local = hidden.shape[0], weight.shape[0]
        log_probs, inv_sum_exp = _per_row(hidden, n), _per_row(hidden, n)
        entropy = _per_row(hidden, n, plan.stats.entropy)
        sum_pi_squared = _per_row(hidden, n, plan.stats.sum_pi_squared)
        top1 = torch.empty(n, dtype=torch.long, device=hidden.device)
        buf = _chunk_buffers(hidden, v_local, plan)
        safe_labels, in_shard = _shard_labels(labels, plan.vocab_start, v_local)
        for s in range(0, n, plan.chunk):
            e = min(s + plan.chunk, n)
            kept = buf.exp_shifted[s:e] if plan.keep else buf.exp_shifted[: e - s]
            logits = kept if buf.logits is None else buf.logits[: e - s]
            torch.mul(torch.mm(hidden[s:e], weight.t(), out=kept), inv_temperature[s:e, None], out=logits)
            scratch = None if buf.scratch is None else buf.scratch[: e - s]
            block = _score_block(
                logits, safe_labels[s:e], in_shard[s:e], kept, plan.group, plan.vocab_start, plan.stats, scratch
            )
            for out, value in zip((log_probs, top1, inv_sum_exp, entropy, sum_pi_squared), block, strict=True):
                if out is not None:
                    out[s:e] = value
        non_differentiable = (top1, sum_pi_squared)
        if plan.keep:
            kept = (hidden, weight, buf.exp_shifted, safe_labels, in_shard, inv_temperature, inv_sum_exp, entropy)
            _keep_for_backward(ctx, non_differentiable, *kept)
        else:
            ctx.mark_non_differentiable(*(t for t in non_differentiable if t is not None))
        ctx.plan = plan
        return log_probs, top1, entropy, sum_pi_squared

    @staticmethod
    def backward(ctx, grad_log_probs, _grad_top1, grad_entropy, _grad_sum_pi_squared):
        _refuse_second_backward(ctx)
        hidden, weight, exp_shifted, safe_labels, in_shard, inv_temperature, inv_sum_exp, entropy = ctx.saved_tensors
        n, chunk = hidden.shape[0], ctx.plan.chunk
        scratch = None if grad_entropy is None else exp_shifted.new_empty(min(chunk, n), exp_shifted.shape[1])
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for s in range(0, n, chunk):  # in place, chunk by chunk: no [tokens, V/tp] buffer beyond the kept one
            e = min(s + chunk, n)
            rows = slice(s, e)
            grad_logits = _logits_grad_in_place(
                exp_shifted[rows], safe_labels[rows], in_shard[rows], inv_temperature[rows], inv_sum_exp[rows],
                None if grad_log_probs is None else grad_log_probs[rows],
                None if entropy is None else entropy[rows],
                None if grad_entropy is None else grad_entropy[rows],
                None if scratch is None else scratch[: e - s],
            )
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:  # one product over all tokens, in the weight's dtype: no fp32 accumulator
            grad_weight = hand_over_weight_grad(weight, exp_shifted.t() @ hidden, ctx.plan.fuse_wgrad)
        return grad_hidden, grad_weight, None, None, None


class _TokenLogProbFromLogits(torch.autograd.Function):
    """The chunked path's scoring on logits the output layer already made, rewritten in place (as Megatron's
    vocab-parallel cross-entropy rewrites its input): the buffer ends up holding ``exp(logits - max)`` for the
    backward, which turns it into the logits' gradient in place."""

    @staticmethod
    def forward(ctx, logits, labels, inv_temperature, group, vocab_start):
        safe_labels, in_shard = _shard_labels(labels, vocab_start, logits.shape[1])
        logits.mul_(inv_temperature[:, None])
        block = _score_block(logits, safe_labels, in_shard, logits, group, vocab_start)
        _keep_for_backward(ctx, (block.top1,), logits, safe_labels, in_shard, inv_temperature, block.inv_sum_exp)
        return block.log_probs, block.top1

    @staticmethod
    def backward(ctx, grad_log_probs, _grad_top1):
        _refuse_second_backward(ctx)
        return _logits_grad_in_place(*ctx.saved_tensors, grad_log_probs), None, None, None, None


class TokenScores(NamedTuple):
    """What :func:`chunked_token_scores` returns, each ``[s, b]``: fp32 log-probs, long top-1 ids, and the fp32
    entropy / sum of squared probabilities when asked for (``None`` otherwise)."""

    log_probs: torch.Tensor
    top1: torch.Tensor
    entropy: torch.Tensor | None
    sum_pi_squared: torch.Tensor | None


def chunked_token_scores(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    chunk_size: int,
    *,
    entropy: bool = False,
    sum_pi_squared: bool = False,
    sequence_parallel: bool = False,
    gradient_accumulation_fusion: bool = False,
) -> TokenScores:
    """Scores of ``labels`` under ``softmax(hidden @ weight.T / temperature)``, never holding fp32 logits.

    hidden: ``[s, b, h]`` (``[s/tp, b, h]`` under sequence parallel), weight: this rank's vocabulary shard
    ``[V/tp, h]``, labels / temperature: ``[s, b]``. ``entropy`` is differentiable (exactly, like the log-probs);
    ``sum_pi_squared`` is computed without gradient only. ``gradient_accumulation_fusion``: the output layer's
    setting (its weight gradient then goes to ``main_grad``). Without a gradient to compute, only one chunk's
    exponentials are held at a time.
    """
    keep = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if sum_pi_squared and keep:
        raise ValueError("sum_pi_squared is scored without gradient only: compute it under torch.no_grad()")
    tp = mpu.get_tensor_model_parallel_world_size()
    group = mpu.get_tensor_model_parallel_group() if tp > 1 else None
    # Each rank's input gradient is only its vocabulary shard's part: the ranks' parts must be summed exactly
    # once, as Megatron's ColumnParallelLinear does: reduce-scatter (sequence parallel: the backward of the
    # all-gather) or all-reduce. Both would sum twice, a gradient tp times too large.
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    elif tp > 1:
        hidden = copy_to_tensor_model_parallel_region(hidden)
    s, b, h = hidden.shape
    plan = _ChunkPlan(
        chunk_size, group, mpu.get_tensor_model_parallel_rank() * weight.shape[0], gradient_accumulation_fusion,
        _Statistics(entropy, sum_pi_squared), keep,
    )
    scores = _ChunkedTokenLogProb.apply(
        hidden.reshape(s * b, h), weight, labels.reshape(-1), temperature.reshape(-1).float().reciprocal(), plan
    )
    return TokenScores(*(None if t is None else t.view(s, b) for t in scores))


def chunked_token_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    chunk_size: int,
    sequence_parallel: bool = False,
    gradient_accumulation_fusion: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(labels)`` and the top-1 token id of ``softmax(hidden @ weight.T / temperature)``, both ``[s, b]``
    (see :func:`chunked_token_scores`)."""
    scores = chunked_token_scores(
        hidden, weight, labels, temperature, chunk_size,
        sequence_parallel=sequence_parallel, gradient_accumulation_fusion=gradient_accumulation_fusion,
    )
    return scores.log_probs, scores.top1


def scores_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(labels)`` and the top-1 token id of ``softmax(logits / temperature)``, from fp32 logits
    ``[n, V/tp]`` (this rank's vocabulary shard), rewritten in place; labels / temperature: ``[n]``."""
    tp = mpu.get_tensor_model_parallel_world_size()
    return _TokenLogProbFromLogits.apply(
        logits,
        labels,
        temperature.float().reciprocal(),
        mpu.get_tensor_model_parallel_group() if tp > 1 else None,
        mpu.get_tensor_model_parallel_rank() * logits.shape[-1],
    )
